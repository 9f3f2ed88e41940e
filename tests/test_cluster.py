"""Several real `klipstream serve` processes on one throwaway PostgreSQL database: any instance
answers for any job (submit on A, status on B, cancel on C, retry), API-only instances run
nothing, and a job whose instance is killed with `kill -9` runs again on another one after its
lease expires, from its last completed stage."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.test_process_lifecycle import ServerProcess, get_json, wait_for

LEASE_SECONDS = 2.0
URL = "https://example.com/a.mp4"


def member_env(name: str, database_url: str) -> dict[str, str]:
    """What every server of a test cluster sets: the shared database, its instance id, a short lease
    (fail-over within seconds), quick heartbeats and claim polls."""
    return {
        "KLIPSTREAM_DATABASE_URL": database_url,
        "KLIPSTREAM_INSTANCE_ID": name,
        "KLIPSTREAM_LEASE_SECONDS": str(LEASE_SECONDS),
        "KLIPSTREAM_HEARTBEAT_SECONDS": "0.5",
        "KLIPSTREAM_CLAIM_POLL_SECONDS": "0.2",
    }


class Instance(ServerProcess):
    """One server process of the cluster; all share the database, the data directory (job working
    directories: the checkpoints a resumed job continues from) and the stage marker logs."""

    def __init__(self, name: str, root: Path, database_url: str, max_running: int) -> None:
        super().__init__(
            root,
            name=name,
            env={
                **member_env(name, database_url),
                "KLIPSTREAM_ADMIN_LOOPBACK": "true",
                "TEST_MAX_RUNNING_JOBS": str(max_running),
                "TEST_STEP_SECONDS": "0.15",
            },
        )


@pytest.fixture
async def cluster(tmp_path: Path, postgres_url: str):
    made: list[Instance] = []

    async def start(*specs: tuple[str, int], **env: str) -> list[Instance]:
        instances = [Instance(name, tmp_path, postgres_url, running) for name, running in specs]
        for instance in instances:
            instance.env.update(env)
        made.extend(instances)  # killed at the end even if one fails to start
        await asyncio.gather(*(i.start() for i in instances))  # started together: one applies the migrations
        return instances

    yield start
    for instance in made:
        instance.stop()


def stage_log(root: Path, stage: str) -> list[str]:
    path = root / "markers" / f"{stage}.log"
    return path.read_text().split("\n")[:-1] if path.exists() else []


async def post(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.post(url, **kwargs) as resp:
        return resp.status, await resp.json()


async def test_submit_on_a_status_on_b_cancel_on_c_retry_anywhere(cluster, tmp_path: Path):
    a, b, c = await cluster(("a", 0), ("b", 1), ("c", 0))  # only b runs jobs
    async with aiohttp.ClientSession() as http:
        headers = {"Idempotency-Key": "order-1"}
        status, first = await post(http, f"{a.base}/api/v1/analysis", json={"url": URL}, headers=headers)
        assert status == 202, first
        job_id = first["job_id"]
        # the same key on another instance replays the first answer; the same video is deduplicated
        status, replay = await post(http, f"{c.base}/api/v1/analysis", json={"url": URL}, headers=headers)
        assert (status, replay["job_id"]) == (200, job_id)
        status, duplicate = await post(http, f"{b.base}/api/v1/analysis", json={"url": URL})
        assert (status, duplicate["job_id"], duplicate["deduplicated"]) == (200, job_id, True)

        running = await wait_for(
            http, f"{c.base}/api/v1/analysis/{job_id}", lambda j: j["stages"][1]["status"] == "running"
        )
        assert running["status"] == "running" and running["stages"][0]["status"] == "completed"
        polled = await get_json(http, f"{a.base}/api/v1/analysis/{job_id}/status")
        assert polled["status"] == "running"

        stats = await get_json(http, f"{a.base}/api/v1/queue/stats")
        assert stats["instance_id"] == "a"
        assert sorted((i["id"], i["max_running"]) for i in stats["instances"]) == [("a", 0), ("b", 1), ("c", 0)]

        sent = time.monotonic()
        async with http.delete(f"{c.base}/api/v1/analysis/{job_id}") as resp:
            assert resp.status in (200, 202)
        cancelled = await wait_for(
            http, f"{a.base}/api/v1/analysis/{job_id}", lambda j: j["status"] == "cancelled", timeout=5
        )
        assert time.monotonic() - sent < 2.0, "a cancel on C stops the job on B within 2 s"
        assert cancelled["stages"][1]["status"] == "cancelled"

        status, retried = await post(http, f"{c.base}/api/v1/analysis/{job_id}/retry")
        assert status == 202 and retried["status"] == "queued", retried
        done = await wait_for(
            http, f"{a.base}/api/v1/analysis/{job_id}", lambda j: j["status"] in ("completed", "failed"), timeout=30
        )
        assert done["status"] == "completed", done
    b_pid = str(b.proc.pid)  # type: ignore[union-attr]
    for stage in ("download", "audio", "highlights"):  # every stage ran on b, none on the API-only instances
        assert all(line.endswith(b_pid) for line in stage_log(tmp_path, stage)), stage
    # the download finished before the cancel and was not run again by the retry
    assert stage_log(tmp_path, "download") == [f"start {b_pid}", f"end {b_pid}"]


async def start_on_one_of(
    http: aiohttp.ClientSession, a: Instance, b: Instance, root: Path
) -> tuple[str, int, Instance, Instance]:
    """Submit a job on `a` and wait for its audio stage: (job path, owner pid, owner, the other)."""
    status, first = await post(http, f"{a.base}/api/v1/analysis", json={"url": URL})
    assert status == 202
    job_url = f"/api/v1/analysis/{first['job_id']}"
    await wait_for(http, f"{a.base}{job_url}", lambda j: j["stages"][1]["status"] == "running")
    owner_pid = int(stage_log(root, "audio")[0].split()[1])
    owner, survivor = (a, b) if owner_pid == a.proc.pid else (b, a)  # type: ignore[union-attr]
    return job_url, owner_pid, owner, survivor


async def test_kill_9_of_the_running_instance_another_resumes_the_job_after_its_lease(cluster, tmp_path: Path):
    a, b = await cluster(("a", 1), ("b", 1))
    async with aiohttp.ClientSession() as http:
        job_url, owner_pid, owner, survivor = await start_on_one_of(http, a, b, tmp_path)
        os.kill(owner_pid, signal.SIGKILL)
        owner.proc.wait()  # type: ignore[union-attr]
        killed = time.monotonic()
        await wait_for(
            http,
            f"{survivor.base}{job_url}",
            lambda j: j["status"] == "running" and j["stages"][1]["status"] == "running",
            timeout=LEASE_SECONDS + 10,
        )
        failover = time.monotonic() - killed
        assert failover <= LEASE_SECONDS + 5, failover
        job = await wait_for(
            http, f"{survivor.base}{job_url}", lambda j: j["status"] in ("completed", "failed"), timeout=30
        )
        assert job["status"] == "completed", job
        assert job["attempts"] == 2
    survivor_pid = survivor.proc.pid  # type: ignore[union-attr]
    # the completed download did not run again; audio restarted on the survivor, which finished the job
    assert stage_log(tmp_path, "download") == [f"start {owner_pid}", f"end {owner_pid}"]
    assert stage_log(tmp_path, "audio") == [f"start {owner_pid}", f"start {survivor_pid}", f"end {survivor_pid}"]
    assert stage_log(tmp_path, "highlights") == [f"start {survivor_pid}", f"end {survivor_pid}"]


async def test_a_stalled_owner_loses_its_lease_and_stops_without_writing(cluster, tmp_path: Path):
    """Fencing: an instance frozen past its lease (SIGSTOP: a long GC pause, a stalled VM) finds on
    waking that another instance took the job over; it stops its run at once and none of its
    writes lands, so the job completes once, on the other instance."""
    a, b = await cluster(("a", 1), ("b", 1))
    async with aiohttp.ClientSession() as http:
        job_url, owner_pid, owner, survivor = await start_on_one_of(http, a, b, tmp_path)
        os.kill(owner_pid, signal.SIGSTOP)
        try:
            await wait_for(
                http,
                f"{survivor.base}{job_url}",
                lambda j: j["status"] == "running" and j["attempts"] == 2,
                timeout=LEASE_SECONDS + 10,
            )
        finally:
            os.kill(owner_pid, signal.SIGCONT)
        job = await wait_for(
            http, f"{owner.base}{job_url}", lambda j: j["status"] in ("completed", "failed", "cancelled"), timeout=30
        )
        assert job["status"] == "completed" and job["attempts"] == 2, job
        await asyncio.sleep(1.5)  # the woken owner's heartbeats and late writes have had their chance
        again = await get_json(http, f"{survivor.base}{job_url}")
        assert (again["status"], again["updated_at"]) == (job["status"], job["updated_at"])
    survivor_pid = survivor.proc.pid  # type: ignore[union-attr]
    assert "lease lost" in owner.log.read_text()
    assert stage_log(tmp_path, "highlights") == [f"start {survivor_pid}", f"end {survivor_pid}"]
    assert stage_log(tmp_path, "download") == [f"start {owner_pid}", f"end {owner_pid}"]


@pytest.mark.parametrize("notify", ["true", "false"], ids=["notified", "polling"])
async def test_a_stream_on_an_api_instance_follows_a_job_running_on_another(cluster, notify: str):
    """SSE across instances, woken by LISTEN/NOTIFY or polling alone: the job runs on B; a stream
    opened on A gets the snapshot and the stage events as B stores them, then the terminal event."""
    a, _ = await cluster(("a", 0), ("b", 1), KLIPSTREAM_DATABASE_NOTIFY=notify)
    async with aiohttp.ClientSession() as http:
        status, first = await post(http, f"{a.base}/api/v1/analysis", json={"url": URL})
        assert status == 202
        events: list[tuple[int, str]] = []
        event_id = None
        async with http.get(f"{a.base}/api/v1/analysis/{first['job_id']}/stream") as stream:
            assert stream.status == 200
            async with asyncio.timeout(30):
                async for raw in stream.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("id: "):
                        event_id = int(line[4:])
                    elif line.startswith("event: "):
                        events.append((event_id or 0, line[7:]))
        kinds = [kind for _, kind in events]
        assert kinds[0] == "snapshot" and kinds[-1] == "completed", kinds
        # stage changes as B stores them (their job_events rows; progress at most 1/s: not asserted)
        assert kinds.count("stage") >= 3, kinds
        ids = [event_id for event_id, _ in events[1:]]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), events
        job = await get_json(http, f"{a.base}/api/v1/analysis/{first['job_id']}")
        assert job["status"] == "completed"


async def test_concurrent_duplicates_on_two_instances_share_one_job(cluster, postgres_url: str):
    """Deduplication and idempotency across instances are the database's (a unique index over the
    active jobs' keys, the keys' primary key): simultaneous submissions on A and B get one job."""
    a, b = await cluster(("a", 0), ("b", 0))  # API only: the jobs stay queued
    async with aiohttp.ClientSession() as http:
        same_video = [
            post(http, f"{instance.base}/api/v1/analysis", json={"url": "https://example.com/v.mp4"})
            for _ in range(8)
            for instance in (a, b)
        ]
        same_key = [
            post(
                http,
                f"{instance.base}/api/v1/analysis",
                json={"url": "https://example.com/k.mp4"},
                headers={"Idempotency-Key": "shared-key"},
            )
            for _ in range(8)
            for instance in (a, b)
        ]
        answers = await asyncio.gather(*same_video, *same_key)
        videos, keys = answers[:16], answers[16:]
        assert sorted({status for status, _ in videos}) == [200, 202], videos
        assert [status for status, _ in videos].count(202) == 1
        assert len({body["job_id"] for _, body in videos}) == 1
        assert [status for status, _ in keys].count(202) == 1 and len({body["job_id"] for _, body in keys}) == 1
        forced = await post(
            http, f"{b.base}/api/v1/analysis", json={"url": "https://example.com/v.mp4", "options": {"force": True}}
        )
        assert forced[0] == 202 and forced[1]["job_id"] != videos[0][1]["job_id"]
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT dedup_key, count(*) AS n FROM jobs GROUP BY dedup_key ORDER BY dedup_key")
    finally:
        await conn.close()
    assert [r["n"] for r in rows] == [1, 1, 1], [dict(r) for r in rows]  # '' (the forced job), k, v


CHAOS_JOBS = 200


class WebhookReceiver:
    """A real aiohttp receiver of the jobs' webhooks, in the test process: it records every
    delivery (webhook-id, event type, job id) and answers 200."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.deliveries.append((request.headers["webhook-id"], body["type"], body["data"]["job_id"]))
        return web.Response(status=200)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def completed(self) -> dict[str, list[str]]:
        """job id -> the webhook-ids of its job.completed deliveries, one per delivery received."""
        ids: dict[str, list[str]] = {}
        for msg_id, kind, job_id in self.deliveries:
            if kind == "job.completed":
                ids.setdefault(job_id, []).append(msg_id)
        return ids


def stage_runs(root: Path, deaths: dict[int, float]) -> dict[str, list[tuple[str, int, float, float]]]:
    """job id -> its stage runs as (stage, pid, start, end), from the test pipeline's runs.log.
    A run without an end or stop line was killed: it ended when its process died (`deaths`)."""
    lines = (root / "markers" / "runs.log").read_text().splitlines()
    open_runs: dict[tuple[str, str, int], float] = {}
    runs: dict[str, list[tuple[str, int, float, float]]] = {}
    for line in lines:
        job_id, stage, event, pid_text, at_text = line.split()
        pid, at = int(pid_text), float(at_text)
        if event == "start":
            assert (job_id, stage, pid) not in open_runs, line
            open_runs[(job_id, stage, pid)] = at
        else:
            began = open_runs.pop((job_id, stage, pid))
            runs.setdefault(job_id, []).append((stage, pid, began, at))
    for (job_id, stage, pid), began in open_runs.items():
        assert pid in deaths, f"{stage} of {job_id} started in {pid}, which never ended it and was not killed"
        runs.setdefault(job_id, []).append((stage, pid, began, deaths[pid]))
    return runs


def overlaps(runs: list[tuple[str, int, float, float]]) -> list[tuple[Any, Any]]:
    """Pairs of runs of one job on two processes that overlap in time (a stage of the job running
    on two instances at once: what leases and fencing must prevent)."""
    found = []
    for n, first in enumerate(runs):
        for second in runs[n + 1 :]:
            if first[1] != second[1] and first[2] < second[3] and second[2] < first[3]:
                found.append((first, second))
    return found


@pytest.mark.slow
async def test_chaos_jobs_survive_instances_killed_and_restarted(cluster, postgres_url: str, tmp_path: Path):
    """Issue 14's chaos test: 200 short jobs (with a callback URL) submitted across three instances
    while instances are killed with `kill -9` at random and started again. Every accepted job ends
    exactly once (completed, one `job.completed` webhook-id, however many deliveries of it), every
    `job.completed` webhook arrives, and no stage of a job ever ran on two instances at the same
    time (the stage runs' own start/end records, a killed run ending when its process died)."""
    rng = random.Random(14)
    receiver = WebhookReceiver()
    await receiver.start()
    began = time.monotonic()
    instances = await cluster(
        ("a", 2),
        ("b", 2),
        ("c", 2),
        TEST_STEP_SECONDS="0.03",  # stages of ~0.3 s
        KLIPSTREAM_LEASE_SECONDS="3",
        KLIPSTREAM_WEBHOOK_RETRY_BASE_SECONDS="0.5",
        # a delivery claimed by an instance killed before it sent it is claimed again after this
        KLIPSTREAM_OUTBOX_CLAIM_SECONDS="3",
        KLIPSTREAM_WEBHOOK_TIMEOUT_SECONDS="2",
    )
    deaths: dict[int, float] = {}  # pid -> when it was killed (and dead)
    down: set[str] = set()
    accepted: dict[int, str] = {}  # submission number -> job id
    kills = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def submit(n: int) -> None:
                """One job, on a live instance; again on another (same Idempotency-Key) if the
                instance dies under the request or answers 503, so nothing is submitted twice."""
                body = {"url": f"{URL}?n={n}", "callback_url": receiver.url}
                for attempt in range(60):
                    instance = instances[(n + attempt) % 3]
                    if instance.name in down:
                        await asyncio.sleep(0.1)
                        continue
                    try:
                        async with http.post(
                            f"{instance.base}/api/v1/analysis", json=body, headers={"Idempotency-Key": f"chaos-{n}"}
                        ) as resp:
                            if resp.status in (200, 202):
                                accepted[n] = (await resp.json())["job_id"]
                                return
                            assert resp.status == 503, (resp.status, await resp.text())
                    except aiohttp.ClientError:
                        pass  # killed under the request
                    await asyncio.sleep(0.2)
                raise AssertionError(f"submission {n} was never accepted")

            async def submit_all() -> None:
                for n in range(CHAOS_JOBS):
                    await submit(n)
                    await asyncio.sleep(0.05)

            submitting = asyncio.create_task(submit_all())

            async def all_ended() -> bool:
                conn = await asyncpg.connect(postgres_url)
                try:
                    rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
                finally:
                    await conn.close()
                counts = {r["status"]: r["n"] for r in rows}
                return submitting.done() and sum(counts.values()) == counts.get("completed", 0) == len(accepted)

            while not await all_ended() and time.monotonic() - began < 60:
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                victim = rng.choice(instances)
                pid = victim.proc.pid  # type: ignore[union-attr]
                down.add(victim.name)
                victim.stop()  # kill -9, and reaped
                deaths[pid] = time.time()
                kills += 1
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                await victim.start()
                down.discard(victim.name)
            await submitting
            deadline = time.monotonic() + 180
            while not await all_ended() and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            elapsed = time.monotonic() - began
            deadline = time.monotonic() + 30  # deliveries still being retried
            while len(receiver.completed()) < len(accepted) and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
    finally:
        await receiver.stop()

    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT job_id, status, lease_attempts FROM jobs")
    finally:
        await conn.close()
    assert len(accepted) == CHAOS_JOBS and len(set(accepted.values())) == CHAOS_JOBS
    states = {r["job_id"]: r["status"] for r in rows}
    assert states == {job_id: "completed" for job_id in accepted.values()}, {
        job_id: status for job_id, status in states.items() if status != "completed"
    }
    runs = stage_runs(tmp_path, deaths)
    overlapping = {job_id: found for job_id, job_runs in runs.items() if (found := overlaps(job_runs))}
    assert not overlapping, overlapping
    completed = receiver.completed()
    twice = {job_id: ids for job_id, ids in completed.items() if len(set(ids)) != 1}
    assert not twice, twice  # one job.completed event per job: it ended once
    missing = set(accepted.values()) - set(completed)
    duplicates = sum(len(ids) - 1 for ids in completed.values())
    taken_over = sum(1 for r in rows if r["lease_attempts"] > 0)
    print(
        f"\nchaos: {len(accepted)} jobs, {kills} kills, {taken_over} jobs taken over after a lease expired,"
        f" {sum(len(r) for r in runs.values())} stage runs, {duplicates} duplicate job.completed deliveries,"
        f" {len(missing)} job.completed webhooks missing, {elapsed:.1f} s"
    )
    assert not missing, f"{len(missing)} of {len(accepted)} jobs' job.completed webhooks never came ({kills} kills)"


async def test_the_queue_bound_holds_across_instances_under_concurrent_submissions(cluster, postgres_url: str):
    """KLIPSTREAM_MAX_QUEUED_JOBS is the database's with PostgreSQL: 40 different videos submitted
    at once on two API-only instances against a bound of 10 give exactly 10 jobs; every other
    submission gets today's answer to a full queue (429 with Retry-After), not a job."""
    a, b = await cluster(("a", 0), ("b", 0), KLIPSTREAM_MAX_QUEUED_JOBS="10")
    async with aiohttp.ClientSession() as http:

        async def submit(instance: Instance, n: int) -> tuple[int, str | None, Any]:
            async with http.post(f"{instance.base}/api/v1/analysis", json={"url": f"{URL}?bound={n}"}) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        answers = await asyncio.gather(*(submit((a, b)[n % 2], n) for n in range(40)))
        statuses = [status for status, _, _ in answers]
        assert statuses.count(202) == 10 and statuses.count(429) == 30, answers
        assert all(retry == "30" for status, retry, _ in answers if status == 429), answers
        accepted = {body["job_id"] for status, _, body in answers if status == 202}
        status, _, _ = await submit(b, 99)
        assert status == 429
    conn = await asyncpg.connect(postgres_url)
    try:
        stored = {r["job_id"] for r in await conn.fetch("SELECT job_id FROM jobs WHERE status = 'queued'")}
    finally:
        await conn.close()
    assert stored == accepted
