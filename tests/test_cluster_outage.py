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
                # ~3 submissions a second: enough load for the outage to meet, few enough jobs
                # for the stage slots (one per resource per instance) to finish them soon after
                await asyncio.sleep(0.3)

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


class FreezableProxy:
    """A TCP proxy in front of PostgreSQL for one instance: `freeze()` stops forwarding while
    keeping every connection open, so that instance's database calls hang (a network partition:
    no error, no answer) while the other instances reach the database as usual."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()


async def test_an_instance_cut_off_from_the_database_stops_its_job_before_another_takes_it(
    postgres_url: str, tmp_path: Path
):
    """Fencing in time, not only in writes: instance A loses the database without an error (its
    calls hang, longer than a lease) while B still reaches it. A's lease watchdog stops A's stage
    before B's reaper can hand the job over, so the stage never runs on both; B completes the job
    and A works again once the network does."""
    port = int(postgres_url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = FreezableProxy(port)
    await proxy.start()
    env = {
        "KLIPSTREAM_LEASE_SECONDS": "3",
        "KLIPSTREAM_DATABASE_TIMEOUT_SECONDS": "10",  # a hung call lasts far longer than the lease
        "TEST_STEP_SECONDS": "0.8",  # stages of about 8 s: A is early in one when it is cut off
    }
    a = Instance("a", tmp_path, postgres_url.replace(f":{port}/", f":{proxy.port}/"), 1)
    b = Instance("b", tmp_path, postgres_url, 1)
    for instance in (a, b):
        instance.env.update(env)
    try:
        await a.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            status, first = await post(http, f"{a.base}/api/v1/analysis", json={"url": f"{URL}?partition"})
            assert status == 202, first
            job_url = f"/api/v1/analysis/{first['job_id']}"
            await wait_for(http, f"{a.base}{job_url}", lambda j: j["stages"][0]["status"] == "running")
            await b.start()  # only now: the job is A's
            # cut A off early in a stage, so that the stage would still run when B takes the job
            await wait_for(
                http,
                f"{a.base}{job_url}",
                lambda j: any(s["status"] == "running" and s["progress"] <= 0.2 for s in j["stages"]),
                timeout=30,
            )
            proxy.freeze()
            try:
                await wait_for(
                    http, f"{b.base}{job_url}", lambda j: j["status"] == "running" and j["attempts"] == 2, timeout=20
                )
                await asyncio.sleep(2.0)  # A stays cut off while B runs the job
            finally:
                proxy.thaw()
            job = await wait_for(
                http, f"{b.base}{job_url}", lambda j: j["status"] in ("completed", "failed"), timeout=90
            )
            assert job["status"] == "completed" and job["attempts"] == 2, job
            status, again = await post(http, f"{a.base}/api/v1/analysis", json={"url": f"{URL}?after-partition"})
            assert status == 202, again  # A works again without a restart
    finally:
        a.stop()
        b.stop()
        await proxy.stop()
    a_pid, b_pid = a.proc.pid, b.proc.pid  # type: ignore[union-attr]
    runs = runs_of(tmp_path, first["job_id"])
    times = _run_times(tmp_path, first["job_id"])
    a_runs = [t for t in times if t[1] == a_pid]
    b_runs = [t for t in times if t[1] == b_pid]
    assert a_runs and b_runs, runs
    a_stopped = max(end for _, _, _, end in a_runs)
    b_started = min(start for _, _, start, _ in b_runs)
    assert a_stopped < b_started, (f"A's stage ran {a_stopped - b_started:.2f} s into B's run", times)
    assert "leases not renewed" in a.log.read_text()


def _run_times(root: Path, job_id: str) -> list[tuple[str, int, float, float]]:
    """(stage, pid, start, end or stop) of one job's finished stage runs."""
    started: dict[tuple[str, int], float] = {}
    runs = []
    for line in (root / "markers" / "runs.log").read_text().splitlines():
        job, stage, event, pid, at = line.split()
        if job != job_id:
            continue
        if event == "start":
            started[(stage, int(pid))] = float(at)
        else:
            runs.append((stage, int(pid), started.pop((stage, int(pid))), float(at)))
    return runs
