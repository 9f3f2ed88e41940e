"""PostgreSQL restarted under load (issue 14, "Operations"): two real `klipstream serve` instances
on a throwaway PostgreSQL server of this test's own, with submissions, polls and readiness probes
running while the server is stopped and started again. Every answer is 2xx, 4xx or 503 with
Retry-After; `/health/ready` says 503 during the outage and 200 after; the instances recover
without a restart; every accepted job completes; and a job whose stage was running when the
database went away goes on and completes in that same run (the outage is shorter than a lease),
its checkpoints written once the database is back."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.pg_server import PostgresServer
from tests.test_cluster import URL, Instance, post
from tests.test_process_lifecycle import get_json, wait_for

LEASE_SECONDS = 12.0  # longer than the outage: no job may be taken over because of it
OUTAGE_SECONDS = 2.5  # between the server's stop and its start again
# Connections listening for job changes: asyncpg's add_listener leaves LISTEN as their last query.
LISTENERS = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %klipstream_jobs%'"


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own: the shared one must not be restarted under other tests."""
    server = PostgresServer.create().start()
    try:
        yield server
    finally:
        server.remove()


def runs_of(root: Path, job_id: str) -> list[tuple[str, str, int]]:
    """(stage, event, pid) of one job's stage runs, in the order they were recorded."""
    path = root / "markers" / "runs.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(stage, event, int(pid)) for job, stage, event, pid, _ in (line.split() for line in lines) if job == job_id]


async def test_postgres_restarted_under_load_loses_nothing_and_answers_503_meanwhile(
    own_postgres: PostgresServer, tmp_path: Path
):
    url = own_postgres.create_database()
    env = {
        "KLIPSTREAM_LEASE_SECONDS": str(LEASE_SECONDS),
        "KLIPSTREAM_DATABASE_TIMEOUT_SECONDS": "1",
        "TEST_STEP_SECONDS": "0.12",  # stages of about 1.2 s: one is running when the server stops
    }
    instances = [Instance(name, tmp_path, url, 2) for name in ("a", "b")]
    for instance in instances:
        instance.env.update(env)
    try:
        await asyncio.gather(*(i.start() for i in instances))
        pids = [i.proc.pid for i in instances]  # type: ignore[union-attr]
        await _run_under_restart(own_postgres, instances, tmp_path, url)
        assert [i.proc.poll() for i in instances] == [None, None], "an instance died"  # type: ignore[union-attr]
        assert [i.proc.pid for i in instances] == pids  # type: ignore[union-attr]
    finally:
        for instance in instances:
            instance.stop()


async def _run_under_restart(server: PostgresServer, instances: list[Instance], root: Path, url: str) -> None:
    a, b = instances
    answers: list[tuple[str, int, str | None]] = []  # (what, status, Retry-After)
    accepted: list[str] = []
    ready: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def submit() -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                instance = instances[n % 2]
                async with http.post(f"{instance.base}/api/v1/analysis", json={"url": f"{URL}?load={n}"}) as resp:
                    answers.append(("submit", resp.status, resp.headers.get("Retry-After")))
                    if resp.status == 202:
                        accepted.append((await resp.json())["job_id"])
                await asyncio.sleep(0.1)

        async def poll() -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                if accepted:
                    job_id = accepted[n % len(accepted)]
                    for path in (f"/api/v1/analysis/{job_id}", f"/api/v1/analysis/{job_id}/status"):
                        async with http.get(f"{instances[n % 2].base}{path}") as resp:
                            answers.append(("poll", resp.status, resp.headers.get("Retry-After")))
                await asyncio.sleep(0.05)

        async def probe() -> None:
            while not stop.is_set():
                for instance in instances:
                    async with http.get(f"{instance.base}/health/ready") as resp:
                        ready[instance.name].append((time.monotonic(), resp.status))
                await asyncio.sleep(0.1)

        # A job running when the database goes away: started first, its download stage under way.
        status, first = await post(http, f"{a.base}/api/v1/analysis", json={"url": f"{URL}?across-the-outage"})
        assert status == 202, first
        across = first["job_id"]
        await wait_for(http, f"{a.base}/api/v1/analysis/{across}", lambda j: j["stages"][0]["status"] == "running")
        load = [asyncio.create_task(task()) for task in (submit, poll, probe)]
        try:
            await asyncio.sleep(1.5)
            await asyncio.to_thread(server.stop, "fast")
            down = time.monotonic()
            await asyncio.sleep(OUTAGE_SECONDS)
            restarting = time.monotonic()
            await asyncio.to_thread(server.start)
            await asyncio.sleep(4.0)  # load goes on after the restart
        finally:
            stop.set()
            await asyncio.gather(*load)

        bad = [answer for answer in answers if not (200 <= answer[1] < 500 or answer[1] == 503)]
        assert not bad, bad
        no_retry_after = [answer for answer in answers if answer[1] == 503 and not answer[2]]
        assert not no_retry_after, no_retry_after
        assert any(status == 503 for what, status, _ in answers if what == "submit"), "no submission met the outage"
        assert sum(1 for what, status, _ in answers if what == "submit" and status == 202) >= 10, answers
        for name, probes in ready.items():
            during = [status for at, status in probes if down + 0.3 < at < restarting]
            assert 503 in during and 200 not in during, (name, during)
            assert probes[-1][1] == 200, (name, probes[-5:])

        # the instances work without a restart: both accept again, and everything accepted completes
        for instance in instances:
            status, body = await post(
                http, f"{instance.base}/api/v1/analysis", json={"url": f"{URL}?after={instance.name}"}
            )
            assert status == 202, body
            accepted.append(body["job_id"])
        done = await _all_ended(url, [*accepted, across], timeout=120)
        assert set(done.values()) == {"completed"}, {k: v for k, v in done.items() if v != "completed"}

        # both instances listen for job changes again, on new connections (the old ones died)
        conn = await asyncpg.connect(url)
        try:
            async with asyncio.timeout(10):
                while await conn.fetchval(LISTENERS) < 2:
                    await asyncio.sleep(0.2)
        finally:
            await conn.close()
        job = await get_json(http, f"{b.base}/api/v1/analysis/{across}")
        assert job["status"] == "completed" and job["attempts"] == 1, job
    # the job running across the outage ran every stage once, in one process: nothing was redone
    runs = runs_of(root, across)
    assert [(stage, event) for stage, event, _ in runs] == [
        ("download", "start"),
        ("download", "end"),
        ("audio", "start"),
        ("audio", "end"),
        ("highlights", "start"),
        ("highlights", "end"),
    ], runs
    assert len({pid for _, _, pid in runs}) == 1, runs


async def _all_ended(url: str, job_ids: list[str], timeout: float) -> dict[str, Any]:
    """Wait until every job has ended; their statuses, read from the database itself."""
    conn = await asyncpg.connect(url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                rows = await conn.fetch("SELECT job_id, status FROM jobs WHERE job_id = ANY($1::text[])", job_ids)
                states = {r["job_id"]: r["status"] for r in rows}
                if len(states) == len(set(job_ids)) and all(
                    s in ("completed", "failed", "cancelled") for s in states.values()
                ):
                    return states
                await asyncio.sleep(0.25)
    finally:
        await conn.close()
