"""Claims per second from one shared PostgreSQL queue, by one and by three instances.

Each "instance" is a process with its own PostgresStore (its own pool), claiming with
`WORKERS` claimers at once (one per worker slot, as `KLIPSTREAM_MAX_RUNNING_JOBS` would run) until
the queue is empty. The baseline is one such process on the same server in the same run; the
figure is three processes together. Afterwards the database is checked: every job was claimed
exactly once (one lease token each, and the processes' lists of claimed ids are disjoint and
cover the queue).

With `--limit N` (KLIPSTREAM_CLUSTER_MAX_RUNNING_JOBS) each round also measures three instances
whose claimers finish every job they claim (one more write, so that running jobs stay few, as they
do in service), without and with the cluster-wide running limit, which serialises the claims of
all instances on one advisory lock. N must be at least 3 × workers, so that the limit itself never
refuses a claim here: what is measured is the price of checking it.

Usage: python bench/bench_claims.py [--jobs 6000] [--workers 4] [--rounds 3] [--limit 12]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from klipstream.jobs.store import JobRow
from klipstream.jobs.store.postgres import PostgresStore
from klipstream.models import Job

AGING = 300.0


async def _fill(url: str, jobs: int) -> None:
    store = PostgresStore(url, timeout=60)
    await store.open()
    try:
        for start in range(0, jobs, 500):
            await asyncio.gather(
                *(
                    store.insert_job(JobRow.of(Job(job_id=f"b{n:07d}", video_id=f"{n}", url=f"https://x/{n}")))
                    for n in range(start, min(jobs, start + 500))
                )
            )
    finally:
        await store.close()


_FINISH = "UPDATE jobs SET status = 'completed', finished_at = extract(epoch from now()) WHERE job_id = $1"


async def _claim_all(
    url: str, owner: str, workers: int, start_at: float, finish: bool, limit: int | None
) -> tuple[list[str], float, float]:
    store = PostgresStore(url, pool_size=workers + 2, timeout=60, max_running=limit)
    await store.open()
    await asyncio.gather(*(store.ping() for _ in range(workers)))  # the pool's connections, before the clock
    await asyncio.sleep(max(0.0, start_at - time.time()))
    began = time.perf_counter()
    taken: list[str] = []

    async def worker() -> None:
        while (claimed := await store.claim(owner, 300, AGING)) is not None:
            taken.append(claimed[0])
            if finish:
                await store._with_connection(lambda c: c.execute(_FINISH, claimed[0]))

    await asyncio.gather(*(worker() for _ in range(workers)))
    ended = time.perf_counter()
    await store.close()
    return taken, began, ended


def _instance(
    url: str, owner: str, workers: int, start_at: float, finish: bool, limit: int | None, out: multiprocessing.Queue
) -> None:
    taken, began, ended = asyncio.run(_claim_all(url, owner, workers, start_at, finish, limit))
    out.put((owner, taken, ended - began))


def run_round(
    url: str, jobs: int, instances: int, workers: int, *, finish: bool = False, limit: int | None = None
) -> tuple[float, int]:
    """(claims per second, jobs claimed twice) for `instances` processes draining `jobs`."""
    asyncio.run(_fill(url, jobs))
    out: multiprocessing.Queue = multiprocessing.Queue()
    start_at = time.time() + 1.5
    procs = [
        multiprocessing.Process(target=_instance, args=(url, f"i{n}", workers, start_at, finish, limit, out))
        for n in range(instances)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    everything = [job_id for _, taken, _ in results for job_id in taken]
    assert len(everything) == jobs, (len(everything), jobs)
    twice = len(everything) - len(set(everything))
    wall = max(seconds for _, _, seconds in results)
    asyncio.run(_check_and_clear(url, jobs, "completed" if finish else "running"))
    return jobs / wall, twice


async def _check_and_clear(url: str, jobs: int, status: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT lease_token) AS tokens,"
            " count(*) FILTER (WHERE status = $1) AS running FROM jobs",
            status,
        )
        assert (row["n"], row["tokens"], row["running"]) == (jobs, jobs, jobs), dict(row)
        await conn.execute("TRUNCATE jobs")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=4, help="claimers per instance")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="also measure a cluster-wide running limit")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 3 * args.workers:
        parser.error("--limit must be at least 3 × --workers (the limit must not refuse claims here)")
    from tests.pg_server import running_server

    with running_server() as server:
        url = server.create_database("claims")
        asyncio.run(PostgresStore(url).open())  # migrations once
        one: list[float] = []
        three: list[float] = []
        finishing: list[float] = []
        limited: list[float] = []
        duplicates = 0
        for n in range(args.rounds):  # alternating, so load on this shared machine hits both alike
            rate, twice = run_round(url, args.jobs, 1, args.workers)
            one.append(rate)
            duplicates += twice
            rate, twice = run_round(url, args.jobs, 3, args.workers)
            three.append(rate)
            duplicates += twice
            print(f"round {n + 1}: one instance {one[-1]:,.0f} claims/s, three instances {three[-1]:,.0f} claims/s")
            if args.limit is not None:
                rate, twice = run_round(url, args.jobs, 3, args.workers, finish=True)
                finishing.append(rate)
                duplicates += twice
                rate, twice = run_round(url, args.jobs, 3, args.workers, finish=True, limit=args.limit)
                limited.append(rate)
                duplicates += twice
                print(
                    f"  claim and finish, three instances: no limit {finishing[-1]:,.0f} claims/s,"
                    f" cluster limit {args.limit} {limited[-1]:,.0f} claims/s"
                )
    load = os.getloadavg()[0]
    print()
    print(f"jobs per round: {args.jobs:,}; claimers per instance: {args.workers}; 1-min load average {load:.1f}")
    print("| figure | median | rounds | goal |")
    print("|---|---|---|---|")
    print(
        f"| one instance, claims/s (baseline) | {statistics.median(one):,.0f} | "
        f"{', '.join(f'{r:,.0f}' for r in one)} | |"
    )
    print(
        f"| three instances, claims/s | {statistics.median(three):,.0f} | "
        f"{', '.join(f'{r:,.0f}' for r in three)} | ≥ 500 |"
    )
    print(f"| three × one | {statistics.median(three) / statistics.median(one):.2f}× | | |")
    if args.limit is not None:
        print(
            f"| three instances, claim and finish, no limit (baseline) | {statistics.median(finishing):,.0f} | "
            f"{', '.join(f'{r:,.0f}' for r in finishing)} | |"
        )
        print(
            f"| three instances, claim and finish, cluster limit {args.limit} | {statistics.median(limited):,.0f} | "
            f"{', '.join(f'{r:,.0f}' for r in limited)} | ≥ 500 |"
        )
        print(f"| limit × no limit | {statistics.median(limited) / statistics.median(finishing):.2f}× | | |")
    print(f"| jobs claimed twice | {duplicates} | | 0 |")


if __name__ == "__main__":
    main()
