"""Bench-only entry: `klipstream.server.serve` with publication timestamps and, optionally,
bench-only stages. Never part of the shipped service.

* Every broadcaster event gets its publication time (CLOCK_REALTIME, shared with the client
  process on this machine) recorded, and `GET /bench/published/{job_id}` returns them, so the SSE
  benchmark measures delivery lag from publication to receipt, not from some earlier timestamp.
* `KLIPSTREAM_BENCH_PIPELINE=bench` (the default) runs the BENCH-ONLY stages below instead of the
  shipped pipeline. They are not simulations: they fetch the job URL over HTTP, hash, scan and
  compress it in threads and write every artifact, reporting real progress as they go.
  `KLIPSTREAM_BENCH_PIPELINE=real` runs `klipstream.stages.default_pipeline()`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any

from aiohttp import web

from klipstream import server
from klipstream.api.context import BROADCASTER
from klipstream.api.openapi import Route
from klipstream.config import Settings
from klipstream.errors import NetworkError
from klipstream.jobs.broadcaster import Broadcaster, Event, Topic
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.logs import configure_logging
from klipstream.models import DisplayStage

BLOCK = 1 << 20


# --- publication timestamps ---
class TimedTopic(Topic):
    def __init__(self, buffer_size: int, last_id: int = 0) -> None:
        super().__init__(buffer_size, last_id)
        self.published: dict[int, tuple[str, float]] = {}

    def put(self, event_id: int, type_: str, data: str) -> Event | None:
        # Stamped before publishing: put() itself writes to every caught-up subscriber's socket.
        published = time.time()
        event = super().put(event_id, type_, data)
        if event is not None:
            self.published[event.id] = (type_, published)
        return event


class TimedBroadcaster(Broadcaster):
    def _new_topic(self, last_id: int) -> Topic:
        return TimedTopic(self.buffer_size, last_id)


async def published(request: web.Request) -> web.Response:
    topic = request.app[BROADCASTER].topics.get(request.match_info["job_id"])
    times = topic.published if isinstance(topic, TimedTopic) else {}
    return web.json_response(
        {"events": {str(k): v for k, v in times.items()}, "subscribers": topic.subscribers if topic else 0}
    )


PUBLISHED_ROUTE = Route(
    "GET",
    "/bench/published/{job_id}",
    published,
    "Bench only: event publication times",
    responses={200: "application/json"},
)


# --- bench-only stages: real I/O and CPU work on the fetched bytes ---
async def fetch(ctx: StageContext) -> None:
    """Stream the job URL to disk (the bench serves a file on loopback)."""
    path = ctx.output_path("media")
    async with ctx.http.get(ctx.url) as resp:
        if resp.status != 200:
            raise NetworkError(f"bench fetch got HTTP {resp.status}")
        total = resp.content_length or 0
        done = 0
        with path.open("wb") as out:
            async for chunk in resp.content.iter_chunked(BLOCK):
                await ctx.to_thread(out.write, chunk)
                done += len(chunk)
                if total:
                    ctx.progress(done / total, f"{done >> 20} of {total >> 20} MB")
    ctx.add_artifact("media", path)


def _write_chat(ctx: StageContext, path: Path, messages: int) -> None:
    rows = [{"time": i * 0.5, "user": f"viewer{i % 97}", "text": f"message {i} PogChamp"} for i in range(messages)]
    path.write_text(json.dumps(rows))


async def chat(ctx: StageContext) -> None:
    path = ctx.output_path("chat_json")
    await ctx.to_thread(_write_chat, ctx, path, 20_000)
    ctx.progress(1.0)
    ctx.add_artifact("chat_json", path)


def _scan(ctx: StageContext, loop: asyncio.AbstractEventLoop, source: Path, pcm: Path, waveform: Path) -> None:
    size = max(1, source.stat().st_size)
    peaks: list[int] = []
    digest = hashlib.blake2b()
    with source.open("rb") as src, pcm.open("wb") as dst:
        while block := src.read(BLOCK):
            if ctx.cancelled.is_set():
                return
            digest.update(block)
            peaks.append(max(block[::4096]))
            dst.write(block)
            ctx.progress_threadsafe(loop, src.tell() / size, "scanning")
    waveform.write_text(json.dumps({"peaks": peaks, "blake2b": digest.hexdigest()}))


async def audio(ctx: StageContext) -> None:
    pcm, waveform = ctx.output_path("pcm"), ctx.output_path("waveform")
    await ctx.to_thread(_scan, ctx, asyncio.get_running_loop(), ctx.input("media"), pcm, waveform)
    ctx.add_artifact("pcm", pcm)
    ctx.add_artifact("waveform", waveform)


def _compress(ctx: StageContext, loop: asyncio.AbstractEventLoop, source: Path, out: Path) -> None:
    size = max(1, source.stat().st_size)
    ratios = []
    with source.open("rb") as src:
        while block := src.read(BLOCK):
            if ctx.cancelled.is_set():
                return
            ratios.append(len(zlib.compress(block, 6)) / len(block))
            ctx.progress_threadsafe(loop, src.tell() / size, "compressing")
    out.write_text(json.dumps({"segments": [{"index": i, "ratio": r} for i, r in enumerate(ratios)]}))


async def transcribe(ctx: StageContext) -> None:
    out = ctx.output_path("transcript_json")
    await ctx.to_thread(_compress, ctx, asyncio.get_running_loop(), ctx.input("pcm"), out)
    ctx.add_artifact("transcript_json", out)


def _rank(inputs: dict[str, Path], out: Path) -> None:
    peaks = json.loads(inputs["waveform"].read_text())["peaks"]
    ranked = sorted(range(len(peaks)), key=lambda i: -peaks[i])[:10]
    out.write_text(json.dumps({"highlights": ranked, "inputs": sorted(inputs)}))


async def highlights(ctx: StageContext) -> None:
    out = ctx.output_path("highlights_json")
    await ctx.to_thread(_rank, dict(ctx.inputs), out)
    ctx.add_artifact("highlights_json", out)


def bench_pipeline() -> list[Stage]:
    """BENCH-ONLY pipeline, same shape as the shipped one: two network stages side by side, then a
    chain of thread-pool work, then a join."""
    return [
        Stage("download", DisplayStage.DOWNLOADING, fetch, provides=("media",), resource=Resource.NETWORK),
        Stage("chat", DisplayStage.FETCHING_CHAT, chat, provides=("chat_json",), resource=Resource.NETWORK),
        Stage("audio", DisplayStage.PROCESSING_AUDIO, audio, needs=("media",), provides=("pcm", "waveform")),
        Stage(
            "transcribe",
            DisplayStage.TRANSCRIBING,
            transcribe,
            needs=("pcm",),
            provides=("transcript_json",),
            resource=Resource.TRANSCRIPTION,
            weight=3.0,
        ),
        Stage(
            "highlights",
            DisplayStage.FINDING_HIGHLIGHTS,
            highlights,
            needs=("waveform",),
            uses=("transcript_json", "chat_json"),
            provides=("highlights_json",),
        ),
    ]


def instrumented_create_app(original: Any, pipeline: str) -> Any:
    @functools.wraps(original)
    def create_app(
        settings: Settings, *, stages: list[Stage] | None = None, extra_routes: list[Route] | None = None
    ) -> web.Application:
        if stages is None and pipeline == "bench":
            stages = bench_pipeline()
        app = original(settings, stages=stages, extra_routes=[*(extra_routes or []), PUBLISHED_ROUTE])
        app[BROADCASTER] = TimedBroadcaster()
        return app

    return create_app


def main() -> None:
    import os

    import uvloop

    from bench.common import raise_nofile

    raise_nofile(20000)  # thousands of event streams, one socket each
    pipeline = os.environ.get("KLIPSTREAM_BENCH_PIPELINE", "bench")
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    # serve() builds its app with create_app(settings); swap in the instrumented builder.
    server.create_app = instrumented_create_app(server.create_app, pipeline)
    uvloop.run(server.serve(settings))


if __name__ == "__main__":
    main()
