"""The service on PostgreSQL through real HTTP: KLIPSTREAM_DATABASE_URL selects the store, jobs
run and are served from it after a restart, and a database outage is a 503 with Retry-After (not
a 500) until the server is back."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from typing import Any

import asyncpg
import pytest

from klipstream.config import Settings
from tests.pg_server import running_server
from tests.scheduler_stages import Recorder, simple_pipeline

URL = "https://www.twitch.tv/videos/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_status(client: Any, job_id: str, wanted: set[str], timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            resp = await client.get(f"/api/v1/analysis/{job_id}")
            body = await resp.json()
            if body.get("status") in wanted:
                return body
            await asyncio.sleep(0.02)


async def test_jobs_run_and_are_served_from_postgres_after_a_restart(make_client, make_settings, postgres_url):
    settings: Settings = make_settings(database_url=postgres_url)
    client = await make_client(settings, simple_pipeline(Recorder()))
    headers = {"Idempotency-Key": "order-1"}
    resp = await client.post("/api/v1/analysis", json={"url": URL + "2000000001"}, headers=headers)
    assert resp.status == 202
    first = await resp.json()
    job = await wait_status(client, first["job_id"], {"completed", "failed"})
    assert job["status"] == "completed", job
    replay = await client.post("/api/v1/analysis", json={"url": URL + "2000000001"}, headers=headers)
    assert replay.status == 200 and (await replay.json())["job_id"] == first["job_id"]
    await client.close()

    conn = await asyncpg.connect(postgres_url)
    try:
        row = await conn.fetchrow("SELECT status, video_id FROM jobs WHERE job_id=$1", first["job_id"])
        assert (row["status"], row["video_id"]) == ("completed", "2000000001")
        assert await conn.fetchval("SELECT job_id FROM idempotency WHERE key=':order-1'") == first["job_id"]
        assert await conn.fetchval("SELECT count(*) FROM stage_runs") == 5
    finally:
        await conn.close()
    assert not settings.database_path.exists()  # nothing local: the outbox is in PostgreSQL too

    again = await make_client(settings, simple_pipeline(Recorder()))  # a new process on the same database
    resp = await again.get(f"/api/v1/analysis/{first['job_id']}")
    assert resp.status == 200 and (await resp.json())["status"] == "completed"
    listed = await (await again.get("/api/v1/jobs?status=completed")).json()
    assert [j["job_id"] for j in listed["jobs"]] == [first["job_id"]]
    replay = await again.post("/api/v1/analysis", json={"url": URL + "2000000001"}, headers=headers)
    assert replay.status == 200 and (await replay.json())["job_id"] == first["job_id"]


async def test_database_outage_is_503_with_retry_after_and_the_service_recovers(make_client, make_settings):
    with running_server() as server:
        settings: Settings = make_settings(database_url=server.create_database(), database_timeout_seconds=3)
        client = await make_client(settings, simple_pipeline(Recorder()))
        resp = await client.post("/api/v1/analysis", json={"url": URL + "2000000001"})
        assert resp.status == 202
        done = await wait_status(client, (await resp.json())["job_id"], {"completed", "failed"})
        assert done["status"] == "completed"
        assert (await client.get("/health/ready")).status == 200

        server.stop("fast")  # the database goes away mid-run
        resp = await client.post("/api/v1/analysis", json={"url": URL + "2000000002"})
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        body = await resp.json()
        assert body["title"] == "Database unavailable" and "retry" in body["detail"]
        keyed = await client.post(
            "/api/v1/analysis", json={"url": URL + "2000000003"}, headers={"Idempotency-Key": "k"}
        )
        assert keyed.status == 503
        assert (await client.get("/api/v1/analysis/0123456789abcdef01234567")).status == 503
        assert (await client.get("/api/v1/jobs")).status == 503
        assert (await client.get("/health/ready")).status == 503
        assert (await client.get("/health")).status == 200  # liveness does no I/O: no restart loop

        server.start()
        resp = await client.post("/api/v1/analysis", json={"url": URL + "2000000002"})
        assert resp.status == 202
        done = await wait_status(client, (await resp.json())["job_id"], {"completed", "failed"})
        assert done["status"] == "completed"
        keyed = await client.post(
            "/api/v1/analysis", json={"url": URL + "2000000003"}, headers={"Idempotency-Key": "k"}
        )
        assert keyed.status == 202  # the refused attempt left nothing behind
        assert (await client.get("/health/ready")).status == 200
        assert (await client.get("/api/v1/analysis/0123456789abcdef01234567")).status == 404


def test_database_url_selects_the_store_and_is_validated(tmp_path):
    from klipstream.config import ConfigError
    from klipstream.jobs.store import create_store
    from klipstream.jobs.store.postgres import PostgresStore
    from klipstream.jobs.store.sqlite import SQLiteStore

    env = {"KLIPSTREAM_DATA_DIR": str(tmp_path)}
    assert isinstance(create_store(Settings.from_env(env)), SQLiteStore)
    url = "postgresql://klip:pw@db.internal:5432/klipstream"
    store = create_store(Settings.from_env({**env, "KLIPSTREAM_DATABASE_URL": url}))
    assert isinstance(store, PostgresStore) and store.url == url
    with pytest.raises(ConfigError, match="KLIPSTREAM_DATABASE_URL"):
        Settings.from_env({"KLIPSTREAM_DATABASE_URL": "mysql://db/klip"})


def test_a_local_analyze_run_keeps_its_own_store_when_a_shared_database_is_configured(tmp_path):
    from klipstream.cli.local import local_settings
    from klipstream.jobs.store import create_store
    from klipstream.jobs.store.sqlite import SQLiteStore

    shared = Settings.from_env({"KLIPSTREAM_DATABASE_URL": "postgresql://klip@db.internal/klipstream"})
    local = local_settings(shared, tmp_path)
    assert isinstance(create_store(local), SQLiteStore) and local.database_path.parent == tmp_path


def test_serve_with_the_database_down_exits_with_one_line(tmp_path):
    env = {
        **os.environ,
        "KLIPSTREAM_DATA_DIR": str(tmp_path),
        "KLIPSTREAM_DATABASE_URL": f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/klipstream",
        "KLIPSTREAM_LOG_LEVEL": "error",
        "PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-m", "klipstream", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3
    assert done.stderr.strip().startswith("klipstream: cannot start: The job database")
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr


async def test_every_accepted_submission_survives_a_database_crash_mid_burst(make_client, make_settings):
    """Submissions flow while PostgreSQL is killed (immediate stop: no shutdown checkpoint) and
    started again: each answer is 202 or 503, and every 202's job is in the database."""
    with running_server() as server:
        url = server.create_database()
        settings: Settings = make_settings(database_url=url, database_timeout_seconds=3)
        client = await make_client(settings, [])  # no stages: jobs stay queued, only submissions count
        await client.post("/api/v1/queue/pause")
        answers: list[tuple[int, str | None]] = []
        counter = iter(range(2_100_000_000, 2_200_000_000))

        async def submitter() -> None:
            for _ in range(40):
                resp = await client.post("/api/v1/analysis", json={"url": URL + str(next(counter))})
                body = await resp.json()
                answers.append((resp.status, body.get("job_id")))
                if resp.status == 503:
                    assert resp.headers["Retry-After"].isdigit()
                    await asyncio.sleep(0.05)

        async def crash() -> None:
            while len(answers) < 150:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(server.stop, "immediate")
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)

        await asyncio.gather(crash(), *(submitter() for _ in range(16)))
        statuses = {status for status, _ in answers}
        assert statuses <= {202, 503}, statuses
        accepted = {job_id for status, job_id in answers if status == 202}
        assert 503 in statuses and len(accepted) >= 150
        conn = await asyncpg.connect(url)
        try:
            stored = {r["job_id"] for r in await conn.fetch("SELECT job_id FROM jobs")}
        finally:
            await conn.close()
        assert accepted <= stored, f"{len(accepted - stored)} accepted jobs are not in the database"
