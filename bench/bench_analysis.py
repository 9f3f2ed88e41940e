"""All analysis for a long VOD with a big chat: wall time of each analysis stage and peak memory.

    python bench/bench_analysis.py [--duration 28800] [--messages 100000] [--unique 0.3] [--chat REAL.jsonl]

Generates a synthetic stream (tests.synthetic) with the requested chat volume and a share of
unique messages (real chat is not all copy-pasted emotes), writes the artifacts the earlier
stages would write, then runs the chat_analysis, transcript_analysis and highlights stages
exactly as the runner does (through a StageContext; the chat and highlight work in their child
processes), one after the other, after the chat stage has converted the chat as a supplied
chat_url archive (TwitchDownloader JSON). --chat replaces the generated chat with a real one (JSON Lines
{t, user, text}, e.g. from bench/real_data.py) on the same timeline.
Goals: chat analysis of an 8-hour, 100,000-message VOD <= 10 s; 1,000,000 messages in <= 1 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from klipstream.stages.chat import CHAT
from klipstream.stages.chat_analysis import CHAT_ANALYSIS
from klipstream.stages.highlights import HIGHLIGHTS
from klipstream.stages.transcript_analysis import TRANSCRIPT_ANALYSIS
from tests import synthetic
from tests.stage_helpers import make_context


def real_chat(path: Path, duration: float) -> dict:
    """A JSON Lines chat as the TwitchDownloader document the chat stage would have written."""
    comments = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            if row["t"] < duration:
                text = str(row.get("text") or "")
                comments.append(
                    {
                        "_id": f"m{i}",
                        "content_offset_seconds": row["t"],
                        "commenter": {"name": row.get("user") or "", "display_name": row.get("user") or ""},
                        "message": {"body": text, "fragments": [{"text": text, "emoticon": None}]},
                    }
                )
    return {"video": {"id": "123456789", "length": duration}, "comments": comments}


class ChildPeak:
    """Peak resident memory of this process's children while a stage runs, read from each child's
    /proc/<pid>/status (VmHWM of the executed program; getrusage's child maximum would also count
    the pages a child shares with this process between fork and exec)."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._task: asyncio.Task[None] | None = None

    def _scan(self) -> None:
        me = str(os.getpid())
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
                    self.peak_kb = max(self.peak_kb, int(fields["VmHWM"].split()[0]))

    async def _watch(self) -> None:
        while True:
            await asyncio.to_thread(self._scan)
            await asyncio.sleep(0.2)

    def __enter__(self) -> ChildPeak:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


def generate(directory: Path, duration: float, messages: int, unique: float, chat: Path | None) -> dict:
    """Write the artifacts (in a child process: `--generate-into`); returns counts for the report."""
    background_rate = max(0.1, messages / duration / 1.14)  # the generator adds bursts on top
    stream = synthetic.generate(
        1, duration, chat_rate=0.1 if chat else background_rate, users=max(5000, messages // 20), unique_fraction=unique
    )
    if chat is not None:
        stream.chat = real_chat(chat, duration)
    paths = stream.write(directory)
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "messages": len(stream.chat["comments"]),
        "distinct": len({c["message"]["body"] for c in stream.chat["comments"]}),
        "segments": len(stream.transcript["segments"]),
    }


async def run(duration: float, messages: int, unique: float, chat: Path | None) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--generate-into", str(Path(tmp) / "in"), "--duration", str(duration), "--messages", str(messages)]
        argv += ["--unique", str(unique), *(["--chat", str(chat)] if chat else [])]
        child = await asyncio.create_subprocess_exec(sys.executable, __file__, *argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError("generating the stream failed")
        made = json.loads(out)
        generated = time.perf_counter() - t0
        inputs = {k: Path(v) for k, v in made["paths"].items()}
        n_messages, distinct = made["messages"], made["distinct"]
        chat_mb = inputs["chat_json"].stat().st_size / 1e6
        timings: list[tuple[str, float, float]] = []
        archive = inputs.pop("chat_json")  # what a user supplies as chat_url; the chat stage converts it
        async with aiohttp.ClientSession() as http:
            for stage in (CHAT, CHAT_ANALYSIS, TRANSCRIPT_ANALYSIS, HIGHLIGHTS):
                ctx, _sink = make_context(
                    stage,
                    Path(tmp) / "job",
                    http,
                    inputs=dict(inputs),
                    chat_url=str(archive),
                    allow_local_files=True,
                    max_chat_bytes=2**31,
                )
                started = time.perf_counter()
                with ChildPeak() as peak:
                    await stage.run(ctx)
                timings.append((stage.name, time.perf_counter() - started, peak.peak_kb / 1024))
                inputs.update(ctx.outputs)
        top = json.loads(inputs["highlights_json"].read_text())["highlights"][:3]
    source = f"real chat {chat.name}" if chat else "synthetic chat"
    print(
        f"1 stream: {duration / 3600:.1f} h, {n_messages:,} chat messages ({source}, {distinct:,} distinct texts, "
        f"{chat_mb:.1f} MB JSON), {made['segments']} transcript segments; "
        f"generated in {generated:.1f} s"
    )
    print()
    print("| stage | wall time (s) | peak memory of its child process (MB) |")
    print("|---|---:|---:|")
    for name, seconds, peak in timings:
        print(f"| {name} | {seconds:.2f} | {peak:.0f} |")
    total = sum(s for _, s, _ in timings)
    print(f"| **all analysis** | **{total:.2f}** | |")
    print()
    chat_seconds = timings[1][1]
    print(
        f"chat analysis {chat_seconds:.1f} s for {n_messages:,} messages; top 3 at "
        + ", ".join(f"{h['start_time']:.0f}s" for h in top)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8 * 3600.0)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--unique", type=float, default=0.3, help="share of background messages made unique")
    parser.add_argument("--chat", type=Path, help="a real chat (JSON Lines t, user, text) instead of the generated one")
    parser.add_argument("--generate-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_into:
        print(json.dumps(generate(args.generate_into, args.duration, args.messages, args.unique, args.chat)))
        return
    asyncio.run(run(args.duration, args.messages, args.unique, args.chat))


if __name__ == "__main__":
    main()
