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
import json
import resource
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


def child_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


async def run(duration: float, messages: int, unique: float, chat: Path | None) -> None:
    background_rate = max(0.1, messages / duration / 1.14)  # the generator adds bursts on top
    t0 = time.perf_counter()
    stream = synthetic.generate(
        1, duration, chat_rate=0.1 if chat else background_rate, users=max(5000, messages // 20), unique_fraction=unique
    )
    if chat is not None:
        stream.chat = real_chat(chat, duration)
    generated = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        inputs = stream.write(Path(tmp) / "in")
        n_messages = len(stream.chat["comments"])
        distinct = len({c["message"]["body"] for c in stream.chat["comments"]})
        del stream.chat["comments"]
        chat_mb = inputs["chat_json"].stat().st_size / 1e6
        timings: list[tuple[str, float, float]] = []
        archive = inputs.pop("chat_json")  # what a user supplies as chat_url; the chat stage converts it
        async with aiohttp.ClientSession() as http:
            for stage in (CHAT, CHAT_ANALYSIS, TRANSCRIPT_ANALYSIS, HIGHLIGHTS):
                ctx, _sink = make_context(
                    stage, Path(tmp) / "job", http, inputs=dict(inputs), chat_url=str(archive), allow_local_files=True
                )
                started = time.perf_counter()
                await stage.run(ctx)
                timings.append((stage.name, time.perf_counter() - started, child_peak_mb()))
                inputs.update(ctx.outputs)
        top = json.loads(inputs["highlights_json"].read_text())["highlights"][:3]
    source = f"real chat {chat.name}" if chat else "synthetic chat"
    print(
        f"1 stream: {duration / 3600:.1f} h, {n_messages:,} chat messages ({source}, {distinct:,} distinct texts, "
        f"{chat_mb:.1f} MB JSON), {len(stream.transcript['segments'])} transcript segments; "
        f"generated in {generated:.1f} s"
    )
    print()
    print("| stage | wall time (s) | peak memory of its child processes so far (MB) |")
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
    args = parser.parse_args()
    asyncio.run(run(args.duration, args.messages, args.unique, args.chat))


if __name__ == "__main__":
    main()
