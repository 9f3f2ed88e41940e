"""`klipstream db copy`: an SQLite job store moved into PostgreSQL through the command line, then
served from PostgreSQL. Real SQLite files filled by the real server and store, a real throwaway
PostgreSQL (tests/pg_server.py), the command run as a user runs it (a subprocess)."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from typing import Any

import asyncpg

from klipstream.config import Settings
from klipstream.jobs.store import CONVEX, DeliveryRow, IdempotencyRecord, JobRow
from klipstream.jobs.store.postgres import PostgresStore
from klipstream.jobs.store.sqlite import SQLiteStore
from klipstream.models import Job, JobStatus, StageStatus
from tests.scheduler_stages import Recorder, simple_pipeline

URL = "https://www.twitch.tv/videos/"
DATABASE_ENV = "KLIPSTREAM_DATABASE_URL"


async def db_copy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`klipstream db copy ARGS` in a child process, as an operator runs it."""
    base = {k: v for k, v in os.environ.items() if k != DATABASE_ENV}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "klipstream", "db", "copy", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def counts(out: str) -> dict[str, str]:
    """`table: N copied, M already there …` lines by table."""
    return {line.split(":")[0]: line.split(": ", 1)[1] for line in out.splitlines() if " copied, " in line}


async def fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def wait_status(client: Any, job_id: str, wanted: set[str], timeout: float = 15) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            body = await (await client.get(f"/api/v1/analysis/{job_id}")).json()
            if body.get("status") in wanted:
                return body
            await asyncio.sleep(0.02)


async def test_a_served_sqlite_store_moves_to_postgres_and_is_served_from_there(
    make_client, make_settings, postgres_url, tmp_path
):
    """Jobs submitted to a server on SQLite (one completed with an idempotency key, one running when
    the instance died, one queued) are, after the copy, served by a server on PostgreSQL: the same
    job, the same replay, and the unfinished ones are claimed and run to the end. A second copy
    adds nothing."""
    sqlite_settings: Settings = make_settings(data_dir=tmp_path / "single")
    recorder = Recorder()
    client = await make_client(sqlite_settings, simple_pipeline(recorder, download=True))
    headers = {"Idempotency-Key": "order-1"}
    resp = await client.post("/api/v1/analysis", json={"url": URL + "2000000001"}, headers=headers)
    assert resp.status == 202
    done_id = (await resp.json())["job_id"]
    recorder.gate("download").set()
    done = await wait_status(client, done_id, {"completed", "failed"})
    assert done["status"] == "completed", done
    recorder.gate("download").clear()
    unfinished = []
    for video in ("2000000002", "2000000003"):
        resp = await client.post("/api/v1/analysis", json={"url": URL + video})
        assert resp.status == 202
        unfinished.append((await resp.json())["job_id"])
    await wait_status(client, unfinished[0], {"running"})
    await client.close()  # a graceful stop puts running jobs back in the queue

    # What a killed instance leaves: a job still marked running, its first stage done.
    store = SQLiteStore(sqlite_settings.database_path)
    await store.open()
    killed = await store.get_job(unfinished[0])
    assert killed is not None
    killed.status = JobStatus.RUNNING
    killed.stage("download").status = StageStatus.RUNNING
    killed.stage("chat").status = StageStatus.COMPLETED
    await store.save_job(killed)
    await store.close()
    before = sqlite_settings.database_path.read_bytes()

    copied = await db_copy("--from", str(sqlite_settings.database_path), "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    assert counts(copied.stdout) == {
        "jobs": "3 copied, 0 already there (1 running re-queued)",
        "idempotency": "1 copied, 0 already there",
        "stage_runs": "5 copied, 0 already there",
        "webhook_deliveries": "0 copied, 0 already there",
        "webhook_attempts": "0 copied, 0 already there",
        "convex_updates": "0 copied, 0 already there",
    }, copied.stdout
    assert sqlite_settings.database_path.read_bytes() == before  # the source is only read

    again = await db_copy("--from", str(sqlite_settings.database_path), env={DATABASE_ENV: postgres_url})
    assert again.returncode == 0, again.stderr
    assert counts(again.stdout) == {
        "jobs": "0 copied, 3 already there",
        "idempotency": "0 copied, 1 already there",
        "stage_runs": "0 copied, 5 already there",
        "webhook_deliveries": "0 copied, 0 already there",
        "webhook_attempts": "0 copied, 0 already there",
        "convex_updates": "0 copied, 0 already there",
    }, again.stdout
    assert await fetchval(postgres_url, "SELECT count(*) FROM jobs") == 3
    assert await fetchval(postgres_url, "SELECT count(*) FROM stage_runs") == 5
    row = await fetchval(
        postgres_url, "SELECT row(status, lease_owner IS NULL) ::text FROM jobs WHERE job_id = $1", unfinished[0]
    )
    assert row == "(queued,t)"  # claimable: not leased to the instance that is gone

    cluster = await make_client(
        make_settings(data_dir=tmp_path / "cluster", database_url=postgres_url), simple_pipeline(Recorder())
    )
    served = await (await cluster.get(f"/api/v1/analysis/{done_id}")).json()
    for field in ("status", "stages", "results", "highlights", "artifacts", "created_at", "finished_at"):
        assert served[field] == done[field], field
    replay = await cluster.post("/api/v1/analysis", json={"url": URL + "2000000001"}, headers=headers)
    assert replay.status == 200 and (await replay.json())["job_id"] == done_id
    for job_id in unfinished:
        finished = await wait_status(cluster, job_id, {"completed", "failed"})
        assert finished["status"] == "completed", finished
    listed = await (await cluster.get("/api/v1/jobs?limit=10")).json()
    assert [j["job_id"] for j in listed["jobs"]] == [*reversed(unfinished), done_id]  # newest first, as before


async def test_copy_streams_in_batches_keeps_order_and_leaves_the_target_s_jobs_alone(postgres_url, tmp_path):
    """More rows than one batch of every table arrive equal and in order; a job the target already
    has stays as it is, and an active job whose dedup key the target's active job holds arrives
    unshared (PostgreSQL allows one active job per key) instead of failing the copy."""
    path = tmp_path / "klipstream.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    jobs = []
    for n in range(1234):
        job = Job(job_id=f"job{n:05d}", video_id=f"v{n}", url=f"{URL}{n}", dedup_key=f"v{n}:d")
        if n % 3 == 0:
            job.status = JobStatus.COMPLETED
            job.finished_at = job.updated_at
            job.results = {"transcript_json": f"/files/{job.job_id}/transcript.json"}
        record = None
        if n % 2 == 0:
            record = IdempotencyRecord(f"o:k{n}", "hash", job.job_id, f'{{"job_id": "{job.job_id}"}}', 202, "o")
        await store.insert_job(JobRow.of(Job(**{**job.model_dump(), "status": JobStatus.QUEUED})), record)
        await store.save_job(job)
        jobs.append(job)
    for n in range(700):
        await store.record_stage_run("transcribe", 1.5 + n, None if n % 2 else 60.0)
    await store.close()

    target = PostgresStore(postgres_url)
    await target.open()
    theirs = Job(job_id="theirs", video_id="v1", url=URL + "1", dedup_key="v1:d")  # active, same key as job00001
    await target.insert_job(JobRow.of(theirs))
    await target.close()

    copied = await db_copy("--from", str(path), "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    assert counts(copied.stdout) == {
        "jobs": "1234 copied, 0 already there",
        "idempotency": "617 copied, 0 already there",
        "stage_runs": "700 copied, 0 already there",
        "webhook_deliveries": "0 copied, 0 already there",
        "webhook_attempts": "0 copied, 0 already there",
        "convex_updates": "0 copied, 0 already there",
    }, copied.stdout

    await target.open()
    try:
        listed, cursor = [], None
        while page := await target.list_jobs(None, 200, cursor):
            listed += page
            cursor = page[-1][0]
        assert [job.job_id for _, job in listed] == [j.job_id for j in reversed(jobs)] + ["theirs"]
        by_id = {job.job_id: job for _, job in listed}
        for job in jobs:
            assert by_id[job.job_id].model_dump() == job.model_dump()
        assert (await target.active_job("v1:d")).job_id == "theirs"
        assert (await target.active_job("v2:d")).job_id == "job00002"
        record = await target.get_idempotency("o:k2")
        assert record is not None and (record.job_id, record.status, record.owner) == ("job00002", 202, "o")
        runs = sorted(await target.stage_runs(0))
        assert runs == sorted(("transcribe", 1.5 + n, None if n % 2 else 60.0) for n in range(700))
        claimed = await target.claim("new-instance", 30, 60)
        assert claimed is not None
    finally:
        await target.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_bad_sources_and_targets_are_one_line_errors_and_write_nothing(postgres_url, tmp_path):
    async def refused(*args: str, code: int, says: str, env: dict[str, str] | None = None) -> None:
        result = await db_copy(*args, env=env)
        assert result.returncode == code, (result.stdout, result.stderr)
        assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    await refused("--from", str(tmp_path / "missing.sqlite3"), "--to", postgres_url, code=2, says="no such file")
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    await refused("--from", str(text), "--to", postgres_url, code=2, says="not a database")
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE things (x)")
    await refused("--from", str(other), "--to", postgres_url, code=2, says="not a KlipStream job store")
    with sqlite3.connect(other) as conn:  # not upgraded into a job store
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["things"]

    path = tmp_path / "klipstream.sqlite3"
    store = SQLiteStore(path)  # a server's store, still open
    await store.open()
    await store.insert_job(JobRow.of(Job(job_id="j1", video_id="v1", url=URL + "1")))
    await refused("--from", str(path), "--to", postgres_url, code=2, says="in use")
    await store.close()

    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    await refused("--from", str(path), "--to", nobody, code=3, says="cannot reach postgresql://")
    await refused("--from", str(path), code=2, says="KLIPSTREAM_DATABASE_URL")
    assert await fetchval(postgres_url, "SELECT to_regclass('jobs') IS NULL")  # nothing was written
    store = SQLiteStore(path)  # a webhook and a Convex update the stopped server had not sent yet
    await store.open()
    await store.record_deliveries(
        [
            DeliveryRow("d1", "j1", "http://127.0.0.1:9/hook", "job.started", "{}", 1.0),
            DeliveryRow("", "j1", CONVEX, "video:upsertJobProgress", '{"twitchId":"1"}', 1.0),
        ]
    )
    await store.close()
    copied = await db_copy("--from", str(path), "--to", postgres_url)  # once the server is stopped
    assert copied.returncode == 0 and counts(copied.stdout)["jobs"] == "1 copied, 0 already there"
    assert counts(copied.stdout)["webhook_deliveries"] == "1 copied, 0 already there"
    assert counts(copied.stdout)["convex_updates"] == "1 copied, 0 already there"
    assert "pending" not in copied.stderr
    assert await fetchval(postgres_url, "SELECT state || ' ' || id FROM webhook_deliveries") == "pending d1"
    again = await db_copy("--from", str(path), "--to", postgres_url)  # idempotent: nothing sent twice
    assert counts(again.stdout)["webhook_deliveries"] == "0 copied, 1 already there"
