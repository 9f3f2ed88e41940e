"""Retention: the janitor removes what the service no longer needs (issue 13, item 12)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from klipstream.errors import VideoNotFound
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_api_basics import URL, wait_status

OTHER = "https://www.twitch.tv/videos/3456789012"
THIRD = "https://www.twitch.tv/videos/4567890123"


def count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


async def until(check: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_janitor_applies_every_retention(make_client, make_settings):
    hooks: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append((await request.json())["type"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = TestServer(app, host="127.0.0.1")
    await receiver.start_server()
    try:
        recorder = Recorder()
        # the audio stage fails once for each of the first two jobs: their media stays behind
        recorder.failures["audio"] = [VideoNotFound("gone"), VideoNotFound("gone")]
        settings = make_settings(
            janitor_interval_seconds=0.2,
            retain_workdirs_seconds=1.0,
            retain_jobs_seconds=3.0,
            retain_idempotency_seconds=1.0,
            retain_stage_runs_seconds=1.0,
            retain_webhooks_seconds=1.0,
            retain_artifacts_seconds=1.0,
        )
        client = await make_client(settings, simple_pipeline(recorder, transcribe=True))
        callback = f"http://127.0.0.1:{receiver.port}/hook"
        abandoned = (await (await client.post("/api/v1/analysis", json={"url": URL})).json())["job_id"]
        retried = (await (await client.post("/api/v1/analysis", json={"url": OTHER})).json())["job_id"]
        for job_id in (abandoned, retried):
            assert (await wait_status(client, job_id, {"failed"}))["status"] == "failed"
            assert any((settings.jobs_dir / job_id).iterdir())  # the downloaded media is kept for a retry
        resp = await client.post(
            "/api/v1/analysis", json={"url": THIRD, "callback_url": callback}, headers={"Idempotency-Key": "once"}
        )
        done = (await resp.json())["job_id"]
        recorder.gate("transcribe").set()
        job = await wait_status(client, done, {"completed"})
        artifact = job["results"]["highlights_json"]
        assert (await client.get(artifact)).status == 200
        await until(lambda: "job.completed" in hooks)
        # the retried job runs again (held at the gated transcription): its directory must stay
        recorder.gate("transcribe").clear()
        assert (await client.post(f"/api/v1/analysis/{retried}/retry")).status == 202
        await until(lambda: not (settings.jobs_dir / abandoned).exists())  # removed after 1 s
        assert (settings.jobs_dir / retried).is_dir()
        async with asyncio.timeout(10):  # local artifacts: 1 s
            while (await client.get(artifact)).status != 404:
                await asyncio.sleep(0.1)
        db = settings.database_path
        await until(lambda: count(db, "idempotency") == 0 and count(db, "webhook_deliveries") == 0)
        assert count(db, "webhook_attempts") == 0
        await until(lambda: count(db, "stage_runs") == 0)
        # the same key with another body is a new request once its record expired
        resp = await client.post("/api/v1/analysis", json={"url": URL}, headers={"Idempotency-Key": "once"})
        assert resp.status == 202

        # finished job rows: 3 s; the active one stays
        async def gone() -> bool:
            return (await client.get(f"/api/v1/analysis/{done}")).status == 404

        async with asyncio.timeout(10):
            while not await gone():
                await asyncio.sleep(0.1)
        assert (await client.get(f"/api/v1/analysis/{abandoned}")).status == 404
        assert (await client.get(f"/api/v1/analysis/{retried}")).status == 200
        recorder.gate("transcribe").set()
        assert (await wait_status(client, retried, {"completed", "failed"}))["status"] == "completed"
    finally:
        await receiver.close()


async def test_zero_retention_keeps_everything(make_client, make_settings):
    recorder = Recorder()
    recorder.failures["audio"] = [VideoNotFound("gone")]
    settings = make_settings(janitor_interval_seconds=0.1, retain_workdirs_seconds=0, retain_jobs_seconds=0)
    client = await make_client(settings, simple_pipeline(recorder))
    job_id = (await (await client.post("/api/v1/analysis", json={"url": URL})).json())["job_id"]
    await wait_status(client, job_id, {"failed"})
    await asyncio.sleep(0.5)
    assert (settings.jobs_dir / job_id).is_dir()
    assert (await client.get(f"/api/v1/analysis/{job_id}")).status == 200
