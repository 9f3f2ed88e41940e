"""Job lifecycle defects found in review (issue 13, items 1-5 and 7), each through the job API."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from klipstream.api.context import SERVICE
from klipstream.errors import ErrorType
from klipstream.jobs.store import NO_EFFECTS
from klipstream.jobs.store import sqlite as store_module
from klipstream.jobs.store.sqlite import SQLiteStore
from tests.scheduler_stages import PERMANENT, Recorder, simple_pipeline, writing_stage
from tests.test_api_basics import URL, wait_status

OTHER = "https://www.twitch.tv/videos/3456789012"


async def post(client: Any, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/api/v1/analysis", json=body, headers=headers)
    return resp.status, await resp.json()


async def job_of(client: Any, job_id: str) -> dict[str, Any]:
    return await (await client.get(f"/api/v1/analysis/{job_id}")).json()


# --- 1. cancelling a queued job frees its video ------------------------------------------------


async def test_cancelled_queued_job_can_be_resubmitted_and_retried(make_client, make_settings):
    recorder = Recorder()
    client = await make_client(make_settings(max_running_jobs=1), simple_pipeline(recorder, download=True))
    status, running = await post(client, {"url": OTHER})
    assert status == 202
    status, queued = await post(client, {"url": URL})
    assert status == 202 and queued["status"] == "queued"
    assert (await client.delete(f"/api/v1/analysis/{queued['job_id']}")).status == 200
    # resubmitting the video makes a new job
    status, again = await post(client, {"url": URL})
    assert status == 202, again
    assert again["job_id"] != queued["job_id"] and again["deduplicated"] is False
    # ... and, once that one is cancelled too, the first can be retried
    assert (await client.delete(f"/api/v1/analysis/{again['job_id']}")).status == 200
    retry = await client.post(f"/api/v1/analysis/{queued['job_id']}/retry")
    assert retry.status == 202, await retry.text()
    recorder.gate("download").set()
    assert (await wait_status(client, queued["job_id"], {"completed", "failed"}))["status"] == "completed"
    await wait_status(client, running["job_id"], {"completed"})


# --- 2. a job whose working directory cannot be made fails, classified -------------------------


async def test_unusable_workdir_fails_the_job_instead_of_spinning(make_client, make_settings, tmp_path):
    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    settings.jobs_dir.write_text("not a directory")  # every job directory under it fails to be made
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder))
    status, body = await post(client, {"url": URL})
    assert status == 202
    job = await wait_status(client, body["job_id"], {"failed", "completed"}, timeout=5)
    assert job["status"] == "failed"
    assert job["error"]["error_type"] == "internal_error"
    assert job["error"]["error_code"] == "workdir_unusable"
    assert job["attempts"] <= 1 and recorder.log == []  # no stage ran, no hot loop of attempts
    assert {s["status"] for s in job["stages"]} == {"skipped"}


def test_a_full_disk_is_insufficient_resources_and_retryable():
    from klipstream.jobs.runner import workdir_error

    error = workdir_error(OSError(errno.ENOSPC, "No space left on device"))
    assert error.error_type is ErrorType.INSUFFICIENT_RESOURCES and error.retryable
    assert workdir_error(OSError(errno.EROFS, "Read-only file system")).error_type is ErrorType.INTERNAL_ERROR


async def test_failed_terminal_write_still_ends_the_job(make_client, settings, monkeypatch):
    """The store refuses the first write of the terminal state: the job still ends, its stream and
    its video are released, and the store ends up with the terminal state."""
    original = SQLiteStore.save_job
    failures = {"left": 1}

    async def flaky_save(self: SQLiteStore, job: Any, effects: Any = NO_EFFECTS) -> None:
        if job.status.terminal and failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        await original(self, job, effects)

    monkeypatch.setattr(SQLiteStore, "save_job", flaky_save)
    client = await make_client(settings, simple_pipeline(Recorder()))
    status, body = await post(client, {"url": URL})
    job = await wait_status(client, body["job_id"], {"completed", "failed"})
    assert job["status"] == "completed" and failures["left"] == 0
    async with asyncio.timeout(5):
        while True:
            page = await (await client.get("/api/v1/jobs", params={"status": "completed"})).json()
            if body["job_id"] in [j["job_id"] for j in page["jobs"]]:
                break  # the store's own status column says completed
            await asyncio.sleep(0.05)
    status, again = await post(client, {"url": URL})
    assert status == 202, again  # not deduplicated onto a job that is over
    await wait_status(client, again["job_id"], {"completed"})


# --- 3. deduplication keeps the second caller --------------------------------------------------


async def test_duplicate_submission_gets_the_shared_jobs_webhooks(make_client, make_settings):
    received: dict[str, list[str]] = {"a": [], "b": []}

    async def hook(request: web.Request) -> web.Response:
        received[request.match_info["who"]].append((await request.json())["type"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook/{who}", hook)
    receiver = TestServer(app, host="127.0.0.1")
    await receiver.start_server()
    try:
        recorder = Recorder()
        client = await make_client(make_settings(), simple_pipeline(recorder, download=True))
        base = f"http://127.0.0.1:{receiver.port}/hook"
        status, first = await post(client, {"url": URL, "callback_url": f"{base}/a"})
        assert status == 202
        status, second = await post(client, {"url": URL, "callback_url": f"{base}/b"})
        assert status == 200 and second["deduplicated"] and second["job_id"] == first["job_id"]
        job = await job_of(client, first["job_id"])
        assert job["callback_url"] == f"{base}/a" and job["callbacks"] == [f"{base}/b"]
        recorder.gate("download").set()
        await wait_status(client, first["job_id"], {"completed"})
        async with asyncio.timeout(10):
            while not all("job.completed" in events for events in received.values()):
                await asyncio.sleep(0.05)
        assert received["b"][-1] == "job.completed" and "job.stage_changed" in received["b"]
    finally:
        await receiver.close()


async def test_submissions_with_other_results_are_not_deduplicated(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder, download=True))
    status, first = await post(client, {"url": URL})
    assert status == 202
    variants = [
        {"options": {"language": "de"}},
        {"options": {"top_n": 3}},
        {"options": {"include_video": True}},
        {"options": {"initial_prompt": "speedrun"}},
        {"chat_url": "https://example.com/chat.json"},
    ]
    ids = {first["job_id"]}
    for extra in variants:
        status, body = await post(client, {"url": URL, **extra})
        assert status == 202 and not body["deduplicated"], (extra, body)
        ids.add(body["job_id"])
        job = await job_of(client, body["job_id"])
        assert job["dedup_key"].startswith("2345678901:")
    assert len(ids) == len(variants) + 1
    # options that change nothing in the results still deduplicate
    status, same = await post(client, {"url": URL, "priority": "high", "options": {"webhook_progress": True}})
    assert status == 200 and same["job_id"] == first["job_id"]
    recorder.gate("download").set()
    for job_id in ids:
        await wait_status(client, job_id, {"completed"})


# --- 4. a slow store never answers 500 for an accepted job -------------------------------------


async def test_slow_store_write_is_settled_and_replayed_by_idempotency_key(make_client, settings, monkeypatch):
    """The insert starts, then waits for the database's write lock (held by another connection)
    past the store's timeout: the row commits later. The client never sees a 500, the job is
    queued once the row exists, and a retry with the same Idempotency-Key gets that job."""
    original = SQLiteStore.insert_job
    client = await make_client(settings, simple_pipeline(Recorder()))
    monkeypatch.setattr(store_module, "CALL_TIMEOUT_SECONDS", 1.0)  # after start: startup has its own pace
    blocker = sqlite3.connect(settings.database_path, isolation_level=None, check_same_thread=False)

    async def insert_behind_a_lock(self: SQLiteStore, row: Any, record: Any = None, effects: Any = NO_EFFECTS) -> None:
        if not blocker.in_transaction:
            blocker.execute("BEGIN IMMEDIATE")  # a second writer takes the lock just before ours
        await original(self, row, record, effects)

    monkeypatch.setattr(SQLiteStore, "insert_job", insert_behind_a_lock)
    try:
        status, first = await post(client, {"url": URL}, **{"Idempotency-Key": "k-1"})
        assert status == 503, first  # the outcome is not known yet: retry later, never a 500
        assert first["title"] == "Job store busy"
    finally:
        await asyncio.to_thread(blocker.execute, "COMMIT")
        blocker.close()
    async with asyncio.timeout(5):
        while True:
            status, again = await post(client, {"url": URL}, **{"Idempotency-Key": "k-1"})
            if status != 503:
                break
            await asyncio.sleep(0.1)
    assert status == 200, again  # the first request's job, replayed
    job = await wait_status(client, again["job_id"], {"completed", "failed"})
    assert job["status"] == "completed"  # accepted late, and queued: it ran
    page = await (await client.get("/api/v1/jobs")).json()
    assert [j["job_id"] for j in page["jobs"]] == [again["job_id"]]


async def test_store_that_never_took_the_write_answers_503_and_keeps_nothing(make_client, settings, monkeypatch):
    client = await make_client(settings, simple_pipeline(Recorder()))
    monkeypatch.setattr(store_module, "CALL_TIMEOUT_SECONDS", 1.0)  # after start: startup has its own pace
    store = client.app[SERVICE].store
    release = threading.Event()
    stuck = store._call(lambda conn: release.wait(5))  # the writer is busy with something slow
    await asyncio.sleep(0.05)
    status, first = await post(client, {"url": URL}, **{"Idempotency-Key": "k-2"})
    assert status == 503, first
    release.set()
    await asyncio.gather(stuck, return_exceptions=True)
    status, again = await post(client, {"url": URL}, **{"Idempotency-Key": "k-2"})
    assert status == 202, again  # nothing was written the first time: now it is created, once
    await wait_status(client, again["job_id"], {"completed"})
    page = await (await client.get("/api/v1/jobs")).json()
    assert [j["job_id"] for j in page["jobs"]] == [again["job_id"]]


async def test_idempotency_keys_are_scoped_to_the_api_key(make_client, make_settings):
    client = await make_client(make_settings(api_keys=("alice", "bob")), simple_pipeline(Recorder()))
    status, alice = await post(client, {"url": URL}, Authorization="Bearer alice", **{"Idempotency-Key": "same"})
    assert status == 202
    status, bob = await post(
        client, {"url": OTHER}, Authorization="Bearer bob", **{"Idempotency-Key": "same"}
    )  # another body under the same key: no conflict, it is another client's key
    assert status == 202 and bob["job_id"] != alice["job_id"], bob
    status, replay = await post(client, {"url": URL}, Authorization="Bearer alice", **{"Idempotency-Key": "same"})
    assert status == 200 and replay["job_id"] == alice["job_id"]


# --- 5. races ----------------------------------------------------------------------------------


async def test_delete_between_pop_and_start_cancels_the_job(make_client, make_settings):
    recorder = Recorder()
    client = await make_client(make_settings(admin_token="t"), simple_pipeline(recorder))
    admin = {"Authorization": "Bearer t"}
    assert (await client.post("/api/v1/queue/pause", headers=admin)).status == 200
    status, body = await post(client, {"url": URL})
    job_id = body["job_id"]
    service = client.app[SERVICE]
    service.queue.resume()
    await asyncio.sleep(0)  # the worker wakes, pops the job and creates its task, which has not run yet
    assert job_id in service.pool.running and job_id not in service.runs
    await service.cancel(job_id)
    await asyncio.sleep(0.3)
    job = await job_of(client, job_id)
    assert job["status"] == "cancelled", job["status"]
    assert recorder.log == []  # no stage ever started
    status, _again = await post(client, {"url": URL})
    assert status == 202


async def test_queue_bound_holds_under_concurrent_submissions_and_retries(make_client, make_settings):
    recorder = Recorder()
    recorder.failures["download"] = [PERMANENT("gone") for _ in range(4)]
    client = await make_client(
        make_settings(max_queued_jobs=3, admin_token="t"), [writing_stage("download", recorder, provides=("media",))]
    )
    failed = []
    for i in range(4):
        _status, body = await post(client, {"url": f"https://example.com/{i}.mp4"})
        failed.append(body["job_id"])
    for job_id in failed:
        assert (await wait_status(client, job_id, {"failed"}))["status"] == "failed"
    assert (await client.post("/api/v1/queue/pause", headers={"Authorization": "Bearer t"})).status == 200
    submissions = [client.post("/api/v1/analysis", json={"url": f"https://example.com/new{i}.mp4"}) for i in range(4)]
    retries = [client.post(f"/api/v1/analysis/{job_id}/retry") for job_id in failed]
    answers = await asyncio.gather(*submissions, *retries)
    statuses = [r.status for r in answers]
    assert statuses.count(202) == 3 and statuses.count(429) == 5, statuses
    stats = await (await client.get("/api/v1/queue/stats", headers={"Authorization": "Bearer t"})).json()
    assert stats["queued_total"] == 3
    # a retry refused for a full queue leaves its job as it was: failed, not queued in no queue
    refused = [job_id for job_id, r in zip(failed, answers[4:], strict=True) if r.status == 429]
    for job_id in refused:
        assert (await job_of(client, job_id))["status"] == "failed"
    page = await (await client.get("/api/v1/jobs", params={"status": "queued"})).json()
    assert len(page["jobs"]) == 3


# --- 7. stage states of a failed job -----------------------------------------------------------


async def test_stages_of_a_failed_job_are_not_left_pending(make_client, settings):
    recorder = Recorder()
    recorder.failures["download"] = [PERMANENT("The VOD does not exist.")]
    client = await make_client(settings, simple_pipeline(recorder, chat=True))
    _status, body = await post(client, {"url": URL})
    job = await wait_status(client, body["job_id"], {"failed", "completed"})
    assert job["status"] == "failed"
    states = {s["name"]: s for s in job["stages"]}
    assert states["download"]["status"] == "failed"
    assert states["chat"]["status"] == "cancelled"  # it was running when the job failed
    for name in ("audio", "transcribe", "highlights"):
        assert states[name]["status"] == "skipped", states[name]
        assert states[name].get("started_at") is None
    assert not [s for s in job["stages"] if s["status"] == "pending"]


async def test_concurrent_duplicates_share_the_first_job(make_client, settings):
    client = await make_client(settings, simple_pipeline(Recorder(), download=True))
    answers = await asyncio.gather(*(client.post("/api/v1/analysis", json={"url": URL}) for _ in range(10)))
    bodies = [await r.json() for r in answers]
    assert sorted(r.status for r in answers) == [200] * 9 + [202]
    assert len({b["job_id"] for b in bodies}) == 1
