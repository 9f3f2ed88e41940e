"""All analysis for a 1 h VOD with ~50,000 chat messages: wall time of each analysis stage.

    python bench/bench_analysis.py [--duration 3600] [--messages 50000] [--unique 0.3]

Generates a synthetic stream (tests.synthetic) with the requested chat volume, a
share of unique messages (real chat is not all copy-pasted emotes), writes the artifacts the
earlier stages would write, then runs the chat_analysis, transcript_analysis and highlights stages
exactly as the runner does (through a StageContext, work in threads), one after the other.
Goal (issue 5): the three together <= 10 s on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from klipstream.stages.chat_analysis import CHAT_ANALYSIS
from klipstream.stages.highlights import HIGHLIGHTS
from klipstream.stages.transcript_analysis import TRANSCRIPT_ANALYSIS
from tests import synthetic
from tests.stage_helpers import make_context


async def run(duration: float, messages: int, unique: float) -> None:
    background_rate = max(0.1, messages / duration / 1.14)  # the generator adds bursts on top
    t0 = time.perf_counter()
    stream = synthetic.generate(1, duration, chat_rate=background_rate, users=5000, unique_fraction=unique)
    generated = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        inputs = stream.write(Path(tmp) / "in")
        n_messages = len(stream.chat["comments"])
        distinct = len({c["message"]["body"] for c in stream.chat["comments"]})
        chat_mb = inputs["chat_json"].stat().st_size / 1e6
        timings: list[tuple[str, float]] = []
        async with aiohttp.ClientSession() as http:
            for stage in (CHAT_ANALYSIS, TRANSCRIPT_ANALYSIS, HIGHLIGHTS):
                ctx, _sink = make_context(stage, Path(tmp) / "job", http, inputs=dict(inputs))
                started = time.perf_counter()
                await stage.run(ctx)
                timings.append((stage.name, time.perf_counter() - started))
                inputs.update(ctx.outputs)
        top = json.loads(inputs["highlights_json"].read_text())["highlights"][:3]
    print(
        f"1 stream: {duration:.0f} s, {n_messages} chat messages ({distinct} distinct texts, {chat_mb:.1f} MB JSON), "
        f"{len(stream.transcript['segments'])} transcript segments; generated in {generated:.1f} s"
    )
    print()
    print("| stage | wall time (s) |")
    print("|---|---:|")
    for name, seconds in timings:
        print(f"| {name} | {seconds:.2f} |")
    total = sum(s for _, s in timings)
    print(f"| **all analysis** | **{total:.2f}** |")
    print()
    print(
        f"goal <= 10 s: {'met' if total <= 10 else 'NOT met'}; top 3 at "
        + ", ".join(f"{h['start_time']:.0f}s" for h in top)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--unique", type=float, default=0.3, help="share of background messages made unique")
    args = parser.parse_args()
    asyncio.run(run(args.duration, args.messages, args.unique))


if __name__ == "__main__":
    main()
