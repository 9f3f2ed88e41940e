"""The old synchronous endpoints answer in the old shape, backed by the same job service."""

from __future__ import annotations

import asyncio

from klipstream.errors import VideoNotFound
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_api_basics import URL


async def test_post_root_waits_and_answers_old_shape(make_client, settings):
    client = await make_client(settings, simple_pipeline(Recorder()))
    resp = await client.post("/", json={"url": URL, "old_flag": True})
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "success" and body["video_id"] == "2345678901"
    assert set(body["execution_time"]) == {"raw_pipeline", "analysis_pipeline", "total"}
    assert body["execution_time"]["total"] >= body["execution_time"]["raw_pipeline"] >= 0
    assert "highlights_json" in body["files"]
    assert (await client.get(body["files"]["highlights_json"])).status == 200
    listing = await (await client.get("/list_files?video_id=2345678901")).json()
    assert any(f["url"] == body["files"]["highlights_json"] for f in listing["files"])
    grouped = await (await client.get("/list_output_files")).json()
    assert "2345678901" in grouped["videos"]


async def test_run_pipeline_reports_classified_failure(make_client, settings):
    recorder = Recorder()
    recorder.failures["download"] = [VideoNotFound("The VOD does not exist.")]
    client = await make_client(settings, simple_pipeline(recorder))
    resp = await client.post("/run_pipeline", json={"url": URL})
    assert resp.status == 422
    body = await resp.json()
    assert body["status"] == "error" and body["error_type"] == "video_not_found" and body["suggested_action"]


async def test_legacy_bad_input_and_switch(make_client, make_settings):
    client = await make_client(make_settings(), simple_pipeline(Recorder()))
    assert (await client.post("/", data=b"nope")).status == 400
    assert (await client.post("/", json={"url": "ftp://x"})).status == 422
    off = await make_client(make_settings(legacy_routes=False), simple_pipeline(Recorder()))
    assert (await off.post("/run_pipeline", json={"url": URL})).status == 404


async def test_waiting_legacy_requests_are_bounded(make_client, make_settings):
    """Issue 13, item 19: each legacy request holds a connection until its job ends; beyond the
    bound a caller gets 503 with Retry-After at once instead of one more held connection."""
    recorder = Recorder()
    client = await make_client(make_settings(legacy_max_waiting=1), simple_pipeline(recorder, download=True))
    first = asyncio.create_task(client.post("/", json={"url": URL}))
    async with asyncio.timeout(5):
        while not (await (await client.get("/api/v1/jobs")).json())["jobs"]:
            await asyncio.sleep(0.02)
    second = await asyncio.wait_for(client.post("/run_pipeline", json={"url": "https://example.com/b.mp4"}), 5)
    assert second.status == 503 and second.headers["Retry-After"]
    assert len((await (await client.get("/api/v1/jobs")).json())["jobs"]) == 1  # nothing was submitted
    recorder.gate("download").set()
    assert (await asyncio.wait_for(first, 10)).status == 200
    third = await asyncio.wait_for(client.post("/", json={"url": URL}), 10)
    assert third.status == 200  # the place is free again
