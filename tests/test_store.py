"""The SQLite job store: group commit keeps one failing request local; data survives reopening."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from klipstream.errors import DatabaseUnavailable
from klipstream.jobs.store import IdempotencyRecord, JobRow, StoreStalled, StoreTimeout
from klipstream.jobs.store import sqlite as store_module
from klipstream.jobs.store.sqlite import SQLiteStore
from klipstream.models import Job, JobStatus


async def test_failed_request_in_a_batch_does_not_leak_or_sink_the_others(tmp_path: Path):
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    await store.open()
    jobs = [Job(job_id=f"job{i}", video_id=f"v{i}", url="https://example.com/a.mp4") for i in range(6)]
    record = IdempotencyRecord("same-key", "hash", "job0", "{}", 202)
    inserts = [store.insert_job(JobRow.of(job), record if i < 2 else None) for i, job in enumerate(jobs)]
    results = await asyncio.gather(*inserts, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "IntegrityError"] + ["NoneType"] * 4
    assert sorted(j.job_id for j in await store.active_jobs()) == ["job0", "job2", "job3", "job4", "job5"]
    assert (await store.get_idempotency("same-key")).job_id == "job0"
    await store.close()


async def test_state_survives_reopening(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    job = Job(job_id="a", video_id="v", url="https://example.com/a.mp4")
    await store.insert_job(JobRow.of(job))
    job.status = JobStatus.RUNNING
    job.warnings.append("chat unavailable")
    await store.save_job(job)
    await store.close()
    again = SQLiteStore(path)
    await again.open()
    assert await again.get_job("a") == job
    assert [j.job_id for j in await again.active_jobs()] == ["a"]
    await again.close()


async def test_calls_after_close_are_refused(tmp_path: Path):
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    await store.open()
    await store.close()
    with pytest.raises(RuntimeError):
        await store.get_job("a")


async def test_a_request_the_writer_does_not_answer_times_out(tmp_path: Path, monkeypatch):
    """Every wait has a timeout. A request the stuck writer never started fails with StoreTimeout
    and is never run; the stuck one fails with StoreStalled, whose outcome still arrives."""
    monkeypatch.setattr(store_module, "CALL_TIMEOUT_SECONDS", 0.2)
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    await store.open()
    release = threading.Event()
    stuck = store._call(lambda conn: release.wait(5))
    await asyncio.sleep(0.05)  # the writer has taken the stuck request
    job = Job(job_id="never", video_id="v", url="https://example.com/a.mp4")
    waiting = asyncio.ensure_future(store.insert_job(JobRow.of(job)))
    with pytest.raises(StoreStalled, match="has not finished") as stalled:
        await asyncio.wait_for(stuck, 2)  # the guard of this test only; the store's own timer fires first
    with pytest.raises(StoreTimeout, match="did not take") as timed_out:
        await asyncio.wait_for(waiting, 2)
    # Both are the store being unavailable to the HTTP layer: 503 with Retry-After.
    assert isinstance(stalled.value, DatabaseUnavailable) and timed_out.value.retry_after
    release.set()
    assert await asyncio.wait_for(stalled.value.outcome, 2) is True  # the real outcome
    assert await store.ping()  # the writer goes on once it is free again
    assert await store.get_job("never") is None  # the request that timed out was never run
    await store.close()


async def test_requests_made_just_before_close_are_written(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    job = Job(job_id="late", video_id="v", url="https://example.com/a.mp4")
    insert = asyncio.ensure_future(store.insert_job(JobRow.of(job)))
    await asyncio.sleep(0)  # the insert is queued for this loop turn, not yet handed to the writer
    await store.close()
    await insert
    again = SQLiteStore(path)
    await again.open()
    assert (await again.get_job("late")) == job
    await again.close()
