"""Stream lag across instances: subscribers on instance B of a job running on instance A.

Two `klipstream serve` processes (tests/serve_test_pipeline.py: three stages of timed steps) share
a throwaway PostgreSQL; A runs jobs, B is API-only. For each job, `--subscribers` event streams
are opened on B and, in the same run as the baseline, as many on A (the instance that runs it).
The lag of a `stage` event is its receipt time minus the `started_at` of the stage it announces
(the owner's clock; same machine), taken once per stage per subscriber.

Usage: python bench/bench_sse_cluster.py [--subscribers 500] [--owner-subscribers N] [--rounds 2]

`--owner-subscribers` (default: as many as on B) opens fewer baseline streams on A, so that the one
client process reading every stream is less of what a stream on B waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start(root: Path, name: str, url: str, running: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "KLIPSTREAM_DATABASE_URL": url,
        "KLIPSTREAM_INSTANCE_ID": name,
        "TEST_MAX_RUNNING_JOBS": str(running),
        "TEST_STEP_SECONDS": "0.3",
        "KLIPSTREAM_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "tests.serve_test_pipeline", str(root / "data"), str(port), str(root / "m")]
    log = (root / f"{name}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220 (once, at start)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(60):
            while True:
                try:
                    async with http.get(f"{base}/health/ready") as resp:
                        if resp.status == 200:
                            return proc, base
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)


async def follow(http: aiohttp.ClientSession, url: str, lags: list[float]) -> None:
    seen: set[str] = set()
    event = ""
    async with http.get(url) as stream:
        async for raw in stream.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "stage":
                received = time.time()
                for stage in json.loads(line[6:])["stages"]:
                    if stage["status"] == "running" and stage.get("started_at") and stage["name"] not in seen:
                        seen.add(stage["name"])
                        started = datetime.fromisoformat(stage["started_at"].replace("Z", "+00:00")).timestamp()
                        lags.append(received - started)
            elif event in ("completed", "failed", "cancelled") and line.startswith("data: "):
                return


async def one_round(a: str, b: str, subscribers: int, owner_subscribers: int) -> tuple[list[float], list[float]]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with http.post(f"{a}/api/v1/analysis", json={"url": f"https://example.com/{time.time_ns()}.mp4"}) as r:
            job_id = (await r.json())["job_id"]
        remote: list[float] = []
        local: list[float] = []
        tasks = [follow(http, f"{b}/api/v1/analysis/{job_id}/stream", remote) for _ in range(subscribers)]
        tasks += [follow(http, f"{a}/api/v1/analysis/{job_id}/stream", local) for _ in range(owner_subscribers)]
        await asyncio.gather(*tasks)
    return remote, local


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=500, help="per instance")
    parser.add_argument("--owner-subscribers", type=int, default=None, help="on A (default: --subscribers)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from tests.pg_server import running_server

    root = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    with running_server() as server:
        url = server.create_database("sse")
        (pa, a), (pb, b) = await asyncio.gather(start(root, "a", url, 1), start(root, "b", url, 0))
        try:
            remote: list[float] = []
            local: list[float] = []
            for n in range(args.rounds):
                owners = args.subscribers if args.owner_subscribers is None else args.owner_subscribers
                r, l_ = await one_round(a, b, args.subscribers, owners)
                remote += r
                local += l_
                print(f"round {n + 1}: {len(r)} remote and {len(l_)} local stage events")
        finally:
            for proc in (pa, pb):
                proc.kill()
                proc.wait()
    print()
    print(
        f"subscribers: {args.subscribers} on B and {args.owner_subscribers or args.subscribers} on A per job; "
        f"{args.rounds} jobs; "
        f"1-min load average {os.getloadavg()[0]:.1f}"
    )
    print("| stream opened on | events | p50 lag ms | p99 lag ms | goal |")
    print("|---|---|---|---|---|")
    print(f"| A (runs the job; baseline) | {len(local)} | {p(local, 0.5):.0f} | {p(local, 0.99):.0f} | |")
    print(f"| B (API only; notified) | {len(remote)} | {p(remote, 0.5):.0f} | {p(remote, 0.99):.0f} | p99 ≤ 250 |")
    print(f"median lag B - A: {(statistics.median(remote) - statistics.median(local)) * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
