"""Chat replay throughput: 100,000 comments from the fake Twitch GQL endpoint with 4 concurrent ranges.

The fake endpoint (tests/fake_twitch_gql.py) runs in its own process pinned to one core and the
chat stage runs here pinned to the other, so the figure is the client's (fetch, parse, de-duplicate,
spool and write both artifacts), not the fake's. Target from issue 3: <= 10 s.

    python bench/bench_chat.py [--comments 100000] [--duration 36000] [--ranges 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
from stage_helpers import make_context  # noqa: E402

from klipstream.stages.chat import CHAT  # noqa: E402


def start_fake(comments: int, duration: int) -> tuple[subprocess.Popen[str], str]:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = {cpus[-1]} if len(cpus) > 1 else None
    command = [sys.executable, str(ROOT / "tests" / "fake_twitch_gql.py"), "--uvloop"]
    command += ["--comments", str(comments), "--duration", str(duration)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, server_cpu)) if server_cpu else None,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise SystemExit(f"fake GQL server did not start: {line!r}")
    if server_cpu:
        os.sched_setaffinity(0, {cpus[0]})
    return proc, line.split(" ", 1)[1]


def load_comments(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)["comments"]


async def run_once(url: str, ranges: int, workdir: Path) -> tuple[float, int, int, float]:
    async with aiohttp.ClientSession() as http:
        ctx, sink = make_context(CHAT, workdir, http, twitch_gql_url=url, chat_ranges=ranges)
        started = time.perf_counter()
        await CHAT.run(ctx)
        elapsed = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    comments = load_comments(ctx.outputs["chat_json"])
    offsets = [c["content_offset_seconds"] for c in comments]
    assert offsets == sorted(offsets), "comments out of order"
    assert len({c["_id"] for c in comments}) == len(comments), "duplicate comments"
    requests = int(sink.progress[-1][2].split(" in ")[1].split()[0].replace(",", ""))
    return elapsed, len(comments), requests, rss_mb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comments", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=36_000, help="VOD length in seconds")
    parser.add_argument("--ranges", type=int, default=4)
    args = parser.parse_args()
    proc, url = start_fake(args.comments, args.duration)
    rows = []
    try:
        for loop_name in ("uvloop", "asyncio"):
            with tempfile.TemporaryDirectory() as tmp:
                if loop_name == "uvloop":
                    import uvloop

                    elapsed, count, requests, rss = uvloop.run(run_once(url, args.ranges, Path(tmp)))
                else:
                    elapsed, count, requests, rss = asyncio.run(run_once(url, args.ranges, Path(tmp)))
            assert count == args.comments, f"got {count} comments, expected {args.comments}"
            rows.append((loop_name, elapsed, count, requests, rss))
    finally:
        proc.terminate()
        proc.wait(5)
    print(f"\n### Chat replay: {args.comments:,} comments over {args.duration:,} s, {args.ranges} ranges\n")
    print("| event loop | seconds | comments/s | requests | peak RSS after fetch | target ≤ 10 s |")
    print("|---|---:|---:|---:|---:|---|")
    for loop_name, elapsed, count, requests, rss in rows:
        verdict = "pass" if elapsed <= 10 else "FAIL"
        print(f"| {loop_name} | {elapsed:.2f} | {count / elapsed:,.0f} | {requests:,} | {rss:.0f} MB | {verdict} |")
    print("\nPeak RSS is the process maximum so far (the second row includes the first run's verification).")


if __name__ == "__main__":
    main()
