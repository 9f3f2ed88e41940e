"""The stage runner through the job API: concurrency, limits, failures, retries, cancel, resume."""

from __future__ import annotations

import asyncio
from typing import Any

from klipstream.errors import NetworkError, VideoNotFound
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from tests.scheduler_stages import Recorder, blocking_stage, simple_pipeline, writing_stage
from tests.test_api_basics import URL, wait_status


async def submit(client: Any, url: str = URL, **extra: Any) -> str:
    resp = await client.post("/api/v1/analysis", json={"url": url, **extra})
    assert resp.status == 202, await resp.text()
    return (await resp.json())["job_id"]


async def wait_stage(client: Any, job_id: str, stage: str, status: str, timeout: float = 5) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            job = await (await client.get(f"/api/v1/analysis/{job_id}")).json()
            if next(s for s in job["stages"] if s["name"] == stage)["status"] == status:
                return job
            await asyncio.sleep(0.01)


async def test_independent_stages_overlap(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder, download=True))
    job_id = await submit(client)
    await wait_stage(client, job_id, "chat", "completed")
    # chat finished while the download was still running: they ran side by side
    assert recorder.events("download") == ["start"]
    job = await (await client.get(f"/api/v1/analysis/{job_id}")).json()
    assert job["progress"]["current_stage"] == "Downloading"
    recorder.gate("download").set()
    await wait_status(client, job_id, {"completed"})
    order = [(s, e) for s, e, _ in recorder.log]
    assert order.index(("download", "end")) < order.index(("audio", "start"))
    assert order.index(("transcribe", "end")) < order.index(("highlights", "start"))


async def test_resource_semaphore_bounds_concurrency(make_client, make_settings):
    recorder = Recorder()
    stages = [writing_stage(f"s{i}", recorder, resource=Resource.NETWORK, gated=True) for i in range(3)]
    client = await make_client(make_settings(network_concurrency=2), stages)
    job_id = await submit(client)
    await asyncio.sleep(0.3)
    job = await (await client.get(f"/api/v1/analysis/{job_id}")).json()
    assert [s["status"] for s in job["stages"]] == ["running", "running", "pending"]
    stats = await (await client.get("/api/v1/queue/stats")).json()
    assert stats["resources"]["network"] == {"in_use": 2, "limit": 2}
    for i in range(3):
        recorder.gate(f"s{i}").set()
    await wait_status(client, job_id, {"completed"})


async def test_running_jobs_limit(make_client, make_settings):
    recorder = Recorder()
    client = await make_client(make_settings(max_running_jobs=1), [writing_stage("only", recorder, gated=True)])
    first = await submit(client, "https://example.com/1.mp4")
    second = await submit(client, "https://example.com/2.mp4")
    await asyncio.sleep(0.2)
    assert (await (await client.get(f"/api/v1/analysis/{second}")).json())["status"] == "queued"
    assert (await (await client.get(f"/api/v1/analysis/{second}")).json())["queue_position"] == 1
    recorder.gate("only").set()
    await wait_status(client, first, {"completed"})
    await wait_status(client, second, {"completed"})


async def test_permanent_failure_is_classified_and_stops_the_job(make_client, settings):
    recorder = Recorder()
    recorder.failures["audio"] = [VideoNotFound("The VOD 2345678901 does not exist.")]
    client = await make_client(settings, simple_pipeline(recorder))
    job_id = await submit(client)
    job = await wait_status(client, job_id, {"failed", "completed"})
    assert job["status"] == "failed"
    error = job["error"]
    assert error["error_type"] == "video_not_found" and error["stage"] == "audio"
    assert error["is_retryable"] is False and error["suggested_action"]
    assert job["progress"]["current_stage"] == "Failed"
    assert "transcribe" not in {s for s, _, _ in recorder.log}
    assert recorder.events("audio") == ["start"]  # not retried


async def test_retryable_failure_is_retried_with_backoff(make_client, settings):
    recorder = Recorder()
    recorder.failures["download"] = [NetworkError("reset"), NetworkError("reset again")]
    client = await make_client(settings, simple_pipeline(recorder))
    job = await wait_status(client, await submit(client), {"failed", "completed"})
    assert job["status"] == "completed"
    assert job["stages"][0]["attempts"] == 3


async def test_retries_are_bounded(make_client, make_settings):
    recorder = Recorder()
    recorder.failures["download"] = [NetworkError("down")] * 5
    client = await make_client(make_settings(stage_retries=1), simple_pipeline(recorder))
    job = await wait_status(client, await submit(client), {"failed", "completed"})
    assert job["status"] == "failed" and job["error"]["error_type"] == "network_error"
    assert job["error"]["is_retryable"] is True
    assert job["stages"][0]["attempts"] == 2


async def test_unexpected_exception_is_internal_error_without_traceback(make_client, settings):
    recorder = Recorder()
    recorder.failures["audio"] = [ZeroDivisionError("boom")]
    client = await make_client(settings, simple_pipeline(recorder))
    job = await wait_status(client, await submit(client), {"failed", "completed"})
    assert job["error"]["error_type"] == "internal_error"
    assert "Traceback" not in job["error"]["message"]


async def test_stage_timeout_is_processing_timeout(make_client, make_settings):
    recorder = Recorder()
    stage = writing_stage("slow", recorder, gated=True, timeout=lambda ctx: 0.2)
    client = await make_client(make_settings(stage_retries=0), [stage])
    job = await wait_status(client, await submit(client), {"failed", "completed"})
    assert job["error"]["error_type"] == "processing_timeout"


async def test_unavailable_stage_skips_dependents_and_job_completes(make_client, settings):
    recorder = Recorder()
    stages = [
        writing_stage("chat", recorder, provides=("chat_json",), unavailable=True),
        writing_stage("chat_analysis", recorder, needs=("chat_json",), provides=("chat_sentiment_csv",)),
        writing_stage("highlights", recorder, uses=("chat_json", "chat_sentiment_csv"), provides=("highlights_json",)),
    ]
    client = await make_client(settings, stages)
    job = await wait_status(client, await submit(client), {"failed", "completed"})
    assert job["status"] == "completed"
    assert [s["status"] for s in job["stages"]] == ["unavailable", "skipped", "completed"]
    assert any("no source" in w for w in job["warnings"])
    assert set(job["results"]) == {"highlights_json"}


async def test_blocking_work_in_threads_keeps_loop_responsive(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, [blocking_stage("heavy", recorder, 1.0)])
    job_id = await submit(client)
    await wait_stage(client, job_id, "heavy", "running")
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await client.get("/health")
    assert resp.status == 200 and loop.time() - started < 0.1
    await wait_status(client, job_id, {"completed"})


async def test_cancel_queued_job_at_once(make_client, make_settings):
    recorder = Recorder()
    client = await make_client(make_settings(max_running_jobs=1), [writing_stage("only", recorder, gated=True)])
    await submit(client, "https://example.com/1.mp4")
    queued = await submit(client, "https://example.com/2.mp4")
    resp = await client.delete(f"/api/v1/analysis/{queued}")
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    job = await (await client.get(f"/api/v1/analysis/{queued}")).json()
    assert job["status"] == "cancelled" and job["progress"]["current_stage"] == "Cancelled"
    recorder.gate("only").set()


async def test_cancel_running_job_within_two_seconds_and_removes_partials(make_client, settings):
    recorder = Recorder()
    seen: dict[str, Any] = {}

    async def partial_writer(ctx: StageContext) -> None:
        path = ctx.output_path("media")
        seen["path"] = path
        with path.open("wb") as fh:
            while True:
                fh.write(b"x" * 1024)
                fh.flush()
                await asyncio.sleep(0.01)

    stages = [
        writing_stage("chat", recorder, provides=("chat_json",)),
        Stage("download", DisplayStage.DOWNLOADING, partial_writer, provides=("media",)),
        blocking_stage("decode", recorder, 30.0),
    ]
    client = await make_client(settings, stages)
    job_id = await submit(client)
    await wait_stage(client, job_id, "decode", "running")
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await client.delete(f"/api/v1/analysis/{job_id}")
    job = await wait_status(client, job_id, {"cancelled"}, timeout=3)
    assert loop.time() - started < 2.0
    assert resp.status in (200, 202)
    assert not seen["path"].exists()
    assert [s["status"] for s in job["stages"]] == ["completed", "cancelled", "cancelled"]
    # the completed stage's checkpoint survives for a retry
    assert (settings.jobs_dir / job_id / job["artifacts"]["chat_json"]).is_file()


async def test_retry_resumes_after_last_completed_stage(make_client, settings):
    recorder = Recorder()
    recorder.failures["transcribe"] = [VideoNotFound("gone")]
    client = await make_client(settings, simple_pipeline(recorder))
    job_id = await submit(client)
    failed = await wait_status(client, job_id, {"failed"})
    assert failed["error"]["stage"] == "transcribe"
    resp = await client.post(f"/api/v1/analysis/{job_id}/retry")
    assert resp.status == 202
    job = await wait_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "completed" and job["retry_count"] == 1 and job["attempts"] == 2
    assert recorder.events("download") == ["start", "end"]  # not run again
    assert recorder.events("transcribe") == ["start", "start", "end"]
    conflict = await client.post(f"/api/v1/analysis/{job_id}/retry")
    assert conflict.status == 409


async def test_progress_never_goes_backwards(make_client, settings):
    recorder = Recorder()
    recorder.failures["audio"] = [NetworkError("flaky")]
    client = await make_client(settings, simple_pipeline(recorder))
    job_id = await submit(client)
    seen = []
    async with asyncio.timeout(10):
        while True:
            job = await (await client.get(f"/api/v1/analysis/{job_id}/status")).json()
            seen.append(job["progress"]["percentage"])
            if job["status"] == "completed":
                break
            await asyncio.sleep(0.005)
    assert seen == sorted(seen) and seen[-1] == 100.0


async def test_eta_comes_from_measured_history(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder))
    first = await submit(client, "https://example.com/a.mp4")
    queued_eta = (await (await client.get(f"/api/v1/analysis/{first}")).json())["progress"]
    assert queued_eta["estimated_completion_seconds"] is None  # nothing measured yet: unknown, not invented
    await wait_status(client, first, {"completed"})
    second = await submit(client, "https://example.com/b.mp4")
    job = await (await client.get(f"/api/v1/analysis/{second}")).json()
    assert job["progress"]["estimated_completion_seconds"] is not None
    stats = await (await client.get("/api/v1/queue/stats")).json()
    assert set(stats["stage_durations"]) >= {"download", "audio", "transcribe"}
