"""The SQLite job store: group commit keeps one failing request local; data survives reopening."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from klipstream.models import Job, JobStatus
from klipstream.store import IdempotencyRecord, SQLiteStore


async def test_failed_request_in_a_batch_does_not_leak_or_sink_the_others(tmp_path: Path):
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    await store.open()
    jobs = [Job(job_id=f"job{i}", video_id=f"v{i}", url="https://example.com/a.mp4") for i in range(6)]
    record = IdempotencyRecord("same-key", "hash", "job0", "{}", 202)
    results = await asyncio.gather(
        *[store.insert_job(job, record if i < 2 else None) for i, job in enumerate(jobs)], return_exceptions=True
    )
    assert [type(r).__name__ for r in results] == ["NoneType", "IntegrityError"] + ["NoneType"] * 4
    assert sorted(j.job_id for j in await store.active_jobs()) == ["job0", "job2", "job3", "job4", "job5"]
    assert (await store.get_idempotency("same-key")).job_id == "job0"
    await store.close()


async def test_state_survives_reopening(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    job = Job(job_id="a", video_id="v", url="https://example.com/a.mp4")
    await store.insert_job(job)
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
