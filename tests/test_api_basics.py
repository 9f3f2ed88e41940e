"""The job API through real HTTP: submit, poll, fetch, list, and input validation."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.scheduler_stages import Recorder, simple_pipeline

URL = "https://www.twitch.tv/videos/2345678901"


async def wait_status(client: Any, job_id: str, wanted: set[str], timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            resp = await client.get(f"/api/v1/analysis/{job_id}")
            body = await resp.json()
            if body["status"] in wanted:
                return body
            await asyncio.sleep(0.02)


async def test_submit_runs_job_to_completion(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder))
    resp = await client.post("/api/v1/analysis", json={"url": URL + "?t=1h2m3s"})
    assert resp.status == 202
    body = await resp.json()
    assert body["video_id"] == "2345678901"
    assert body["status"] == "queued"
    assert body["progress"]["current_stage"] == "Queued"
    assert body["status_url"].endswith(f"/api/v1/analysis/{body['job_id']}/status")
    job = await wait_status(client, body["job_id"], {"completed", "failed"})
    assert job["status"] == "completed", job
    assert job["progress"]["percentage"] == 100.0
    assert job["progress"]["current_stage"] == "Completed"
    assert [s["status"] for s in job["stages"]] == ["completed"] * 5
    assert set(job["results"]) == {"waveform", "chat_json", "transcript_json", "highlights_json"}
    files = await client.get(job["results"]["highlights_json"])
    assert files.status == 200
    assert "from [chat_json,transcript_json,waveform]" in await files.text()
