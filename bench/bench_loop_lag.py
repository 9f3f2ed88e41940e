"""Event-loop lag while a job's stages run.

The app runs in this process on uvloop (the same `create_app` that `klipstream serve` runs), so
the lag monitors' raw samples are at hand: the shipped `LoopLagMonitor` (100 ms tick, the one
behind `klipstream_event_loop_lag_seconds`) and a second one ticking every 10 ms for finer
resolution. One job runs the shipped pipeline on the 31 s speech fixture (repeated `--repeat`
times with sox for a longer job), fetched from a static file server in another process on
loopback, while an SSE subscriber follows it. Only samples taken while the job ran count.

`--pipeline bench` runs the BENCH-ONLY stages of bench/sse_server.py instead (used when the
shipped pipeline does not import).

With `--chat-messages N` the job also gets a chat archive of N messages (TwitchDownloader JSON,
served by the same file server) as its chat_url, so the chat stage's conversion and the chat
analysis run while the lag is measured.

Run: `python bench/bench_loop_lag.py [--repeat 4] [--pipeline real|bench] [--chat-messages 500000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

from bench.bench_sse import SPEECH, serve_media
from bench.common import machine_note, percentile, real_pipeline_available, table, verdict
from klipstream.api.context import LAG
from klipstream.config import Settings
from klipstream.metrics import LoopLagMonitor, Metrics
from klipstream.server import create_app

TERMINAL = ("completed", "failed", "cancelled")


def make_chat(directory: Path, messages: int, hours: float = 8.0) -> str:
    """A TwitchDownloader chat archive: `messages` over `hours`, 20,000 chatters, repeated emotes and
    unique lines as real chat has them."""
    rng = random.Random(5)
    words = ["KEKW", "Pog", "LUL", "gg", "nice", "what", "no way", "monkaS", "F", "lol", "W", "omg"]
    path = directory / "chat.json"
    with open(path, "w", encoding="utf-8") as out:
        out.write(json.dumps({"video": {"id": "1", "length": int(hours * 3600)}})[:-1] + ',"comments":[')
        for i in range(messages):
            t = round(i * hours * 3600 / messages + rng.random(), 2)
            text = rng.choice(words) if rng.random() < 0.7 else f"{rng.choice(words)} message {i}"
            user = f"viewer{rng.randrange(20000)}"
            out.write(
                ("," if i else "")
                + json.dumps(
                    {
                        "_id": f"c{i}",
                        "content_offset_seconds": t,
                        "commenter": {"name": user, "display_name": user, "_id": str(i % 20000)},
                        "message": {"body": text, "fragments": [{"text": text, "emoticon": None}]},
                    }
                )
            )
        out.write("]}")
    return path.name


def make_fixture(directory: Path, repeat: int, pipeline: str) -> str:
    if pipeline == "bench":
        target = directory / "media.bin"
        with target.open("wb") as out:
            for i in range(48):
                out.write((f"block {i} " * 120_000)[: 1 << 20].encode())
        return target.name
    if repeat <= 1:
        (directory / "speech.ogg").write_bytes(SPEECH.read_bytes())
        return "speech.ogg"
    target = directory / f"speech_x{repeat}.ogg"
    subprocess.run(["sox", *[str(SPEECH)] * repeat, str(target)], check=True, timeout=120)
    return target.name


async def follow(http: aiohttp.ClientSession, url: str) -> tuple[str, dict[str, int]]:
    """Read the job's event stream to its terminal event; returns it and the event counts."""
    counts: dict[str, int] = {}
    event = ""
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=3600, sock_read=120)) as resp:
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
                counts[event] = counts.get(event, 0) + 1
                if event in TERMINAL:
                    return event, counts
    return "stream ended early", counts


async def run(
    args: argparse.Namespace, media_url: str, data_dir: Path, pipeline: str, chat_url: str | None = None
) -> None:
    settings = Settings.from_env(
        {}, data_dir=data_dir, host="127.0.0.1", port=0, allow_private_urls=True, log_level="warning"
    )
    stages = None
    if pipeline == "bench":
        from bench.sse_server import bench_pipeline

        stages = bench_pipeline()
    app = create_app(settings, stages=stages)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    fine = LoopLagMonitor(Metrics(), interval=0.01, keep=10**6)
    shipped: LoopLagMonitor = app[LAG]
    shipped.keep = 10**6
    try:
        async with aiohttp.ClientSession(trust_env=False) as http:
            await asyncio.sleep(1.0)  # start-up work (store, workers) is not what is measured
            fine.start()
            fine.samples.clear()
            shipped.samples.clear()
            started = time.monotonic()
            body = {"url": media_url, **({"chat_url": chat_url} if chat_url else {})}
            async with http.post(f"{base}/api/v1/analysis", json=body) as resp:
                job = await resp.json()
                assert resp.status == 202, job
            outcome, counts = await follow(http, base + job["stream_url"])
            seconds = time.monotonic() - started
            async with http.get(f"{base}/api/v1/analysis/{job['job_id']}") as resp:
                final = await resp.json()
            await fine.stop()
    finally:
        await runner.cleanup()
    report(args, pipeline, outcome, final, counts, seconds, shipped.samples, fine.samples)


def report(
    args: argparse.Namespace,
    pipeline: str,
    outcome: str,
    final: dict,
    counts: dict[str, int],
    seconds: float,
    shipped: list[float],
    fine: list[float],
) -> None:
    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000

    stages = ", ".join(
        f"{s['name']} {s['status']}"
        + (
            f" {(_ts(s['finished_at']) - _ts(s['started_at'])):.1f} s"
            if s.get("started_at") and s.get("finished_at")
            else ""
        )
        for s in final.get("stages", [])
    )
    what = (
        f"shipped default_pipeline on speech.ogg x{args.repeat} ({31.5 * args.repeat:.0f} s of audio)"
        if pipeline == "real"
        else "BENCH-ONLY stages of bench/sse_server.py on 48 MB"
    ) + (f", chat_url archive of {args.chat_messages:,} messages" if args.chat_messages else "")
    print("\n### Event-loop lag while a job runs\n")
    print(
        f"Machine: {machine_note()}; not pinned (stages use threads and worker processes). Pipeline: {what}. "
        f"Job `{outcome}` in {seconds:.1f} s; stages: {stages}. Events streamed: {json.dumps(counts)}.\n"
    )
    print(
        table(
            ["monitor", "samples", "p50 ms", "p99 ms", "max ms", "> 20 ms", "> 100 ms"],
            [
                [
                    name,
                    len(v),
                    ms(v, 50),
                    ms(v, 99),
                    max(v, default=0) * 1000,
                    sum(x > 0.02 for x in v),
                    sum(x > 0.1 for x in v),
                ]
                for name, v in (("shipped LoopLagMonitor (100 ms tick)", shipped), ("10 ms tick", fine))
            ],
        )
    )
    p99 = max(ms(shipped, 99), ms(fine, 99))
    print()
    print(
        table(
            ["target", "measured", "goal", "verdict"],
            [["event-loop lag p99 while stages run", f"{p99:.1f} ms", "≤ 20 ms", verdict(p99 <= 20)]],
        )
    )


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="how many copies of the 31 s speech fixture")
    parser.add_argument("--pipeline", choices=("real", "bench"), help="default: real when it imports")
    parser.add_argument("--chat-messages", type=int, default=0, help="also analyse a chat archive this big")
    args = parser.parse_args()
    pipeline = args.pipeline or ("real" if real_pipeline_available() else "bench")
    import uvloop

    with tempfile.TemporaryDirectory(prefix="bench-lag-") as tmp:
        media = Path(tmp) / "media"
        media.mkdir()
        name = make_fixture(media, args.repeat, pipeline)
        chat = make_chat(media, args.chat_messages) if args.chat_messages else None
        proc, port = serve_media(media)
        try:
            chat_url = f"http://127.0.0.1:{port}/{chat}" if chat else None
            uvloop.run(run(args, f"http://127.0.0.1:{port}/{name}", Path(tmp) / "data", pipeline, chat_url))
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
