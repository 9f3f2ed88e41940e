"""What only the PostgreSQL store has: migrations under an advisory lock shared by instances that
start together, group commit as one transaction, and failing fast when the server is gone."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from asyncio.subprocess import PIPE

import asyncpg
import pytest

from klipstream.errors import DatabaseUnavailable
from klipstream.jobs.store import JobRow
from klipstream.jobs.store.migrations import ADVISORY_LOCK_KEY, POSTGRES, versions
from klipstream.jobs.store.postgres import PostgresStore
from klipstream.models import Job, JobStatus
from tests.pg_server import PostgresServer, running_server

# Sessions waiting for the migrations' advisory lock (a bigint key shows as classid/objid halves).
WAITING_ON_THE_LOCK = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND ((classid::bigint << 32) | objid::bigint) = $1"
)


def new_job(n: int) -> Job:
    return Job(job_id=f"job{n:04d}", video_id=f"v{n}", url=f"https://www.twitch.tv/videos/{n}")


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def test_instances_starting_together_apply_each_migration_once(postgres_url: str):
    stores = [PostgresStore(postgres_url) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    rows = await fetch(postgres_url, "SELECT version, name FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == versions(POSTGRES)
    await stores[0].insert_job(JobRow.of(new_job(1)))
    assert await stores[3].get_job("job0001") is not None
    for store in stores:
        await store.close()


async def test_db_upgrade_commands_started_together_queue_on_the_advisory_lock(postgres_url: str):
    """Two `klipstream db upgrade` processes held at the lock together: once it is free, one
    applies the migrations and the other finds them applied."""
    holder = await asyncpg.connect(postgres_url)
    await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    env = {**os.environ, "KLIPSTREAM_DATABASE_URL": postgres_url}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "klipstream", "db", "upgrade", env=env, stdout=PIPE, stderr=PIPE
        )
        for _ in "ab"
    ]
    try:
        async with asyncio.timeout(60):
            while await holder.fetchval(WAITING_ON_THE_LOCK, ADVISORY_LOCK_KEY) < 2:
                await asyncio.sleep(0.05)
    finally:
        await holder.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        await holder.close()
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = sorted(out.decode().strip().rsplit(" (", 1)[1] for out, _ in outputs)
    everything = ", ".join(str(n) for n in versions(POSTGRES))
    assert said == [f"applied {everything})", "up to date)"], outputs
    rows = await fetch(postgres_url, "SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == versions(POSTGRES)


async def test_writes_of_one_loop_turn_commit_in_one_transaction(postgres_url: str):
    """Rows written in one transaction share their xmin: a burst of 300 submissions is one
    transaction, and so is a turn that mixes inserts, an update and a stage record."""
    store = PostgresStore(postgres_url)
    await store.open()
    await asyncio.gather(*(store.insert_job(JobRow.of(new_job(n))) for n in range(300)))
    rows = await fetch(postgres_url, "SELECT count(DISTINCT xmin::text) AS n FROM jobs")
    assert rows[0]["n"] == 1
    first = new_job(0)
    first.status = JobStatus.RUNNING
    await asyncio.gather(
        store.save_job(first),
        store.insert_job(JobRow.of(new_job(300))),
        store.record_stage_run("download", 1.0, 2.0),
        store.insert_job(JobRow.of(new_job(301))),
    )
    rows = await fetch(
        postgres_url,
        "SELECT xmin::text AS x FROM jobs WHERE job_id IN ('job0000', 'job0300', 'job0301')"
        " UNION ALL SELECT xmin::text FROM stage_runs",
    )
    assert len(rows) == 4 and len({r["x"] for r in rows}) == 1
    assert (await store.get_job("job0000")).status is JobStatus.RUNNING  # type: ignore[union-attr]
    await store.close()


async def test_calls_stuck_behind_a_lock_fail_at_the_timeout_and_are_not_written_late(postgres_url: str):
    store = PostgresStore(postgres_url, timeout=0.5)
    await store.open()
    job = new_job(1)
    await store.insert_job(JobRow.of(job))
    blocker = await asyncpg.connect(postgres_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
    job.status = JobStatus.CANCELLED
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        await store.save_job(job)
    with pytest.raises(DatabaseUnavailable):
        await store.get_job(job.job_id)
    assert time.monotonic() - started < 3
    await transaction.rollback()
    await blocker.close()
    stored = await store.get_job(job.job_id)
    assert stored is not None and stored.status is JobStatus.QUEUED  # the refused write never landed
    await store.close()


async def test_unreachable_server_fails_fast_then_recovers():
    with running_server() as server:
        url = server.create_database()
        store = PostgresStore(url.replace("postgres@", "postgres:s3cret@"), timeout=5)
        await store.open()
        await store.insert_job(JobRow.of(new_job(1)))
        server.stop("fast")
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as failed:
            await store.insert_job(JobRow.of(new_job(2)))
        with pytest.raises(DatabaseUnavailable):
            await store.get_job("job0001")
        assert not await store.ping()
        assert time.monotonic() - started < 2, "refused connections must fail at once, not at the timeout"
        assert "s3cret" not in failed.value.message and failed.value.retryable
        assert failed.value.retry_after
        server.start()
        await store.insert_job(JobRow.of(new_job(3)))
        assert await store.get_job("job0001") is not None
        assert await store.get_job("job0002") is None
        assert await store.ping()
        await store.close()


async def test_open_fails_fast_with_a_classified_error_when_nothing_listens():
    server = PostgresServer.create()  # not started: its port refuses connections
    try:
        store = PostgresStore(server.url("postgres"), timeout=5)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="unavailable"):
            await store.open()
        assert time.monotonic() - started < 2
    finally:
        server.remove()
