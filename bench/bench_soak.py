"""Soak: 20,000 SSE connect/disconnect cycles over 2,000 jobs on one server.

The real `klipstream serve` runs on core 0 with its queue paused; 2,000 jobs are submitted and
half of them cancelled, so streams open on both live (queued) and finished jobs. This process,
on core 1, then opens and drops streams with raw asyncio sockets: each cycle sends the GET,
reads the response head and the first event (the snapshot; a finished job's stream also ends),
and closes the socket; one cycle in ten reconnects with a Last-Event-ID.

A warm-up pass of the same cycles comes first, so allocator pools and caches are in the
baseline. After the run the script waits out the server's stream heartbeat (which ends the
streams of clients that went away) and the idle window of event topics
(KLIPSTREAM_STREAM_IDLE_SECONDS), then reads, through the admin queue stats, how many topics,
subscribers and asyncio tasks remain, and the server's resident memory (VmRSS).

Targets: RSS growth over the run <= 50 MB; no topic, subscriber or task left behind (tasks back
to the count before the run).

Run: `python bench/bench_soak.py [--jobs 2000] [--cycles 20000] [--concurrency 64]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.common import (
    CLIENT_CORE,
    klipstream_server,
    machine_note,
    raise_nofile,
    rss_kib,
    sched_seconds,
    table,
    verdict,
)

IDLE_SECONDS = 5  # KLIPSTREAM_STREAM_IDLE_SECONDS for the run
HEARTBEAT_SECONDS = 15  # klipstream.server.SSE_HEARTBEAT_SECONDS
RSS_LIMIT_MB = 50.0


async def open_and_drop(port: int, job_id: str, last_event_id: int | None) -> str:
    """One cycle: GET the stream, read its head and first event, close. Returns the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
        writer.write(
            f"GET /api/v1/analysis/{job_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = head.split(b"\r\n", 1)[0].decode()
        if " 200 " in status:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # chunk size line + first frame
        return status
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def cycles(port: int, jobs: list[str], count: int, concurrency: int, start: int = 0) -> dict[str, int]:
    statuses: dict[str, int] = {}
    next_cycle = start
    end = start + count

    async def worker() -> None:
        nonlocal next_cycle
        while next_cycle < end:
            cycle = next_cycle
            next_cycle += 1
            job_id = jobs[cycle % len(jobs)]
            last_id = 0 if cycle % 10 == 9 else None
            try:
                status = await open_and_drop(port, job_id, last_id)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                status = type(exc).__name__
            key = status.split(" ", 2)[1] if status.startswith("HTTP/") else status
            statuses[key] = statuses.get(key, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def streams_stats(http: aiohttp.ClientSession, base: str) -> dict[str, int]:
    async with http.get(base + "/api/v1/queue/stats") as resp:
        return (await resp.json())["streams"]


async def soak(args: argparse.Namespace) -> int:
    with contextlib_server(args) as svc:
        base = svc.base
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(base, connector=connector, trust_env=False) as http:
            async with http.post("/api/v1/queue/pause") as resp:
                assert resp.status == 200, await resp.text()

            async def submit(i: int) -> str:
                body = {"url": f"https://example.com/soak/{i}.mp4"}
                async with http.post("/api/v1/analysis", json=body) as resp:
                    assert resp.status == 202, await resp.text()
                    return (await resp.json())["job_id"]

            jobs = await asyncio.gather(*(submit(i) for i in range(args.jobs)))
            for job_id in jobs[::2]:  # half finished: cancelled while queued
                async with http.delete(f"/api/v1/analysis/{job_id}") as resp:
                    assert resp.status == 200, await resp.text()
            rss_start = rss_kib(svc.pid)
            warm = await cycles(svc.port, jobs, args.warmup, args.concurrency)
            await asyncio.sleep(HEARTBEAT_SECONDS + IDLE_SECONDS + 2)
            before = await streams_stats(http, "")
            rss_before = rss_kib(svc.pid)
            cpu_before = sched_seconds(svc.pid)
            started = time.monotonic()
            statuses = await cycles(svc.port, jobs, args.cycles, args.concurrency, start=args.warmup)
            elapsed = time.monotonic() - started
            cpu_after = sched_seconds(svc.pid)
            during = await streams_stats(http, "")
            rss_end = rss_kib(svc.pid)
            # Streams of clients that left end at the next heartbeat; unwatched topics go after the idle window.
            await asyncio.sleep(2 * HEARTBEAT_SECONDS + IDLE_SECONDS + 2)
            after = await streams_stats(http, "")
            rss_after = rss_kib(svc.pid)
    growth_mb = (rss_after - rss_before) / 1024
    ok_rss = growth_mb <= RSS_LIMIT_MB
    ok_left = after["topics"] == 0 and after["subscribers"] == 0 and after["tasks"] <= before["tasks"]
    served = sum(v for k, v in statuses.items() if k in ("200", "204"))
    print(f"# Soak: {args.cycles:,} SSE connect/disconnect cycles over {args.jobs:,} jobs\n")
    print(machine_note())
    print(
        f"\nHalf the jobs queued (live streams), half cancelled (finished streams); {args.concurrency} cycles at "
        f"once; warm-up {args.warmup:,} cycles; run took {elapsed:.1f} s ({args.cycles / elapsed:,.0f} cycles/s); "
        f"server CPU {cpu_after[0] - cpu_before[0]:.1f} s on-CPU, {cpu_after[1] - cpu_before[1]:.1f} s waiting "
        f"for a core (other load). Answers: {dict(sorted(statuses.items()))} (warm-up {dict(sorted(warm.items()))}).\n"
    )
    print(
        table(
            ["measure", "value", "target", "verdict"],
            [
                ["cycles answered 200/204", f"{served:,} / {args.cycles:,}", "all", verdict(served == args.cycles)],
                ["RSS at start (MB)", rss_start / 1024, "", ""],
                ["RSS after warm-up (MB)", rss_before / 1024, "", ""],
                ["RSS right after the run (MB)", rss_end / 1024, "", ""],
                ["RSS after the idle window (MB)", rss_after / 1024, "", ""],
                ["RSS growth over the run (MB)", growth_mb, f"<= {RSS_LIMIT_MB:.0f}", verdict(ok_rss)],
                [
                    "topics before / right after / after idle",
                    f"{before['topics']} / {during['topics']} / {after['topics']}",
                    "0 after",
                    verdict(after["topics"] == 0),
                ],
                [
                    "subscribers before / after",
                    f"{before['subscribers']} / {after['subscribers']}",
                    "0",
                    verdict(after["subscribers"] == 0),
                ],
                [
                    "asyncio tasks before / right after / after idle",
                    f"{before['tasks']} / {during['tasks']} / {after['tasks']}",
                    "not above before",
                    verdict(after["tasks"] <= before["tasks"]),
                ],
            ],
        )
    )
    return 0 if ok_rss and ok_left and served == args.cycles else 1


def contextlib_server(args: argparse.Namespace) -> Any:
    return klipstream_server(
        real=True,
        KLIPSTREAM_STREAM_IDLE_SECONDS=str(IDLE_SECONDS),
        KLIPSTREAM_MAX_QUEUED_JOBS=str(max(1000, args.jobs * 2)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--cycles", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    raise_nofile()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(CLIENT_CORE)})
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
