"""The JobStore contract, run against both backends (SQLite in a temporary file, a throwaway
PostgreSQL database), so that neither drifts from what the job service relies on."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from klipstream.jobs.store import (
    CONVEX,
    DELIVERED,
    PENDING,
    STOPPED,
    SUPERSEDED,
    TRIM_EVERY,
    Attempt,
    DeliveryRow,
    Effects,
    EventRow,
    IdempotencyRecord,
    JobRow,
    JobStore,
)
from klipstream.jobs.store.postgres import PostgresStore
from klipstream.jobs.store.sqlite import SQLiteStore
from klipstream.models import Job, JobError, JobStatus, Priority, utcnow


@dataclass
class Backend:
    name: str
    make: Callable[..., JobStore]  # a new store on the same database each call (keyword arguments: options)
    conflict: type[Exception]  # what a duplicate key raises


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "store.sqlite3"
        return Backend("sqlite", lambda **options: SQLiteStore(path, **options), sqlite3.IntegrityError)
    url = request.getfixturevalue("postgres_url")
    return Backend(
        "postgres", lambda **options: PostgresStore(url, timeout=10, **options), asyncpg.UniqueViolationError
    )


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[JobStore]:
    store = backend.make()
    await store.open()
    yield store
    await store.close()


def new_job(n: int, **fields: object) -> Job:
    fields.setdefault("video_id", f"v{n}")
    return Job(job_id=f"job{n:04d}", url=f"https://www.twitch.tv/videos/{n}", **fields)  # type: ignore[arg-type]


async def test_inserted_job_reads_back_equal(store: JobStore):
    job = new_job(1, priority=Priority.HIGH)
    await store.insert_job(JobRow.of(job))
    assert await store.get_job("job0001") == job
    assert await store.get_job("missing") is None
    assert await store.ping()


async def test_new_job_row_from_plain_data(store: JobStore):
    """The submission path stores the JSON it encoded; reading it back gives the same job."""
    job = new_job(2)
    doc = job.model_dump(mode="python", exclude_defaults=True)
    doc.update(priority=job.priority.value, created_at=job.created_at, dedup_key=job.dedup_key)
    await store.insert_job(JobRow.new(doc, job.model_dump_json(exclude_defaults=True)))
    assert await store.get_job(job.job_id) == job


async def test_saved_changes_read_back_and_leave_the_active_set(store: JobStore):
    job = new_job(3)
    await store.insert_job(JobRow.of(job))
    job.status = JobStatus.RUNNING
    job.warnings.append("chat unavailable")
    await store.save_job(job)
    assert await store.get_job(job.job_id) == job
    assert [j.job_id for j in await store.active_jobs()] == [job.job_id]
    job.status = JobStatus.FAILED
    job.error = JobError(
        error_type="network_error",
        error_code="network_error",
        message="down",
        is_retryable=True,
        suggested_action="retry",
    )
    job.finished_at = utcnow()
    await store.save_job(job)
    assert await store.get_job(job.job_id) == job
    assert await store.active_jobs() == []


async def test_active_jobs_in_insertion_order(store: JobStore):
    jobs = [new_job(n) for n in range(5)]
    for job in jobs:
        await store.insert_job(JobRow.of(job))
    jobs[1].status = JobStatus.COMPLETED
    jobs[1].finished_at = utcnow()
    jobs[3].status = JobStatus.RUNNING
    await store.save_job(jobs[1])
    await store.save_job(jobs[3])
    assert [j.job_id for j in await store.active_jobs()] == ["job0000", "job0002", "job0003", "job0004"]


async def test_list_is_newest_first_with_filter_and_cursor(store: JobStore):
    jobs = [new_job(n) for n in range(7)]
    for job in jobs:
        await store.insert_job(JobRow.of(job))
    for job in jobs[::2]:
        job.status = JobStatus.CANCELLED
        job.finished_at = utcnow()
        await store.save_job(job)
    page = await store.list_jobs(None, 3, None)
    assert [j.job_id for _, j in page] == ["job0006", "job0005", "job0004"]
    seqs = [seq for seq, _ in page]
    assert seqs == sorted(seqs, reverse=True)
    rest = await store.list_jobs(None, 10, seqs[-1])
    assert [j.job_id for _, j in rest] == ["job0003", "job0002", "job0001", "job0000"]
    cancelled = await store.list_jobs("cancelled", 10, None)
    assert [j.job_id for _, j in cancelled] == ["job0006", "job0004", "job0002", "job0000"]
    assert all(j.status is JobStatus.CANCELLED for _, j in cancelled)
    assert await store.list_jobs("running", 10, None) == []


async def test_idempotency_record_is_stored_with_its_job(store: JobStore):
    job = new_job(4)
    record = IdempotencyRecord("key-1", "hash", job.job_id, '{"job_id":"job0004"}', 202)
    await store.insert_job(JobRow.of(job), record)
    assert await store.get_idempotency("key-1") == record
    assert await store.get_idempotency("key-2") is None
    assert await store.get_job(job.job_id) == job


async def test_failed_write_in_a_burst_stays_local(store: JobStore, backend: Backend):
    """One request of a group commit fails (a reused key, a reused job id); the others commit and
    the failed one leaves nothing behind."""
    jobs = [new_job(n) for n in range(6)]
    record = IdempotencyRecord("same-key", "hash", "job0000", "{}", 202)
    inserts = [store.insert_job(JobRow.of(job), record if i < 2 else None) for i, job in enumerate(jobs)]
    inserts.append(store.insert_job(JobRow.of(new_job(3))))  # the same job id again
    results = await asyncio.gather(*inserts, return_exceptions=True)
    assert [r is None for r in results] == [True, False, True, True, True, True, False]
    assert isinstance(results[1], backend.conflict) and isinstance(results[6], backend.conflict)
    active = [j.job_id for j in await store.active_jobs()]
    assert active == ["job0000", "job0002", "job0003", "job0004", "job0005"]
    assert (await store.get_idempotency("same-key")).job_id == "job0000"  # type: ignore[union-attr]


async def test_a_burst_of_submissions_is_all_stored(store: JobStore):
    jobs = [new_job(n) for n in range(600)]  # more than one batch holds
    records = [IdempotencyRecord(f"k{n}", "h", j.job_id, "{}", 202) if n % 3 == 0 else None for n, j in enumerate(jobs)]
    await asyncio.gather(*(store.insert_job(JobRow.of(j), r) for j, r in zip(jobs, records, strict=True)))
    assert len(await store.active_jobs()) == 600
    assert (await store.get_idempotency("k597")).job_id == "job0597"  # type: ignore[union-attr]
    assert await store.get_idempotency("k598") is None


async def test_stage_runs_and_terminal_counts_since(store: JobStore):
    await store.record_stage_run("download", 12.5, 3600.0)
    await store.record_stage_run("chat", 2.0, None)
    runs = await store.stage_runs(0)
    assert sorted(runs) == [("chat", 2.0, None), ("download", 12.5, 3600.0)]
    assert await store.stage_runs(utcnow().timestamp() + 60) == []
    done = [new_job(n) for n in range(4)]
    for job, status in zip(done, ["completed", "completed", "failed", "queued"], strict=True):
        await store.insert_job(JobRow.of(job))
        if status != "queued":
            job.status = JobStatus(status)
            job.finished_at = utcnow()
            await store.save_job(job)
    assert await store.terminal_counts((utcnow() - timedelta(minutes=1)).timestamp()) == {"completed": 2, "failed": 1}
    assert await store.terminal_counts((utcnow() + timedelta(minutes=1)).timestamp()) == {}


async def test_state_survives_reopening(backend: Backend):
    store = backend.make()
    await store.open()
    job = new_job(5)
    await store.insert_job(JobRow.of(job), IdempotencyRecord("k", "h", job.job_id, "{}", 202))
    job.status = JobStatus.RUNNING
    await store.save_job(job)
    await store.close()
    again = backend.make()
    await again.open()  # the migrations find the schema current
    assert await again.get_job(job.job_id) == job
    assert [j.job_id for j in await again.active_jobs()] == [job.job_id]
    assert await again.get_idempotency("k") is not None
    await again.close()


async def test_writes_made_just_before_close_are_committed(backend: Backend):
    store = backend.make()
    await store.open()
    job = new_job(6)
    insert = asyncio.ensure_future(store.insert_job(JobRow.of(job)))
    await asyncio.sleep(0)  # queued for this loop turn, not yet handed to the writer
    await store.close()
    await insert
    again = backend.make()
    await again.open()
    assert await again.get_job(job.job_id) == job
    await again.close()


async def test_calls_after_close_are_refused(backend: Backend):
    store = backend.make()
    await store.open()
    await store.close()
    with pytest.raises(RuntimeError):
        await store.get_job("a")
    with pytest.raises(RuntimeError):
        await store.save_job(new_job(7))


async def test_saves_of_a_job_from_successive_loop_turns_land_in_order(store: JobStore):
    """Writes are not awaited one by one here (as a runner's background progress save and its
    next state change are not): the last save made is the one the store keeps, even when the
    earlier one is in a slower transaction still in flight."""
    job = new_job(8)
    await store.insert_job(JobRow.of(job))
    for n in range(30):
        # A slow batch whose save comes last, then a fast one with only a save: the second must
        # not overtake the first.
        slow = [store.insert_job(JobRow.of(new_job(1000 + n * 100 + i))) for i in range(60)]
        job.warnings.append(f"step {n}a")
        slow.append(store.save_job(job.model_copy(deep=True)))
        first = asyncio.gather(*slow)
        await asyncio.sleep(0.001)  # the slow batch is on its way
        job.warnings.append(f"step {n}b")
        await asyncio.gather(first, store.save_job(job.model_copy(deep=True)))
        stored = await store.get_job(job.job_id)
        assert stored is not None and stored.warnings == job.warnings, f"round {n}"


async def test_dedup_key_and_key_owner_read_back(store: JobStore):
    job = new_job(9, dedup_key="v9:0123456789abcdef")
    record = IdempotencyRecord("owner-a:key", "hash", job.job_id, "{}", 202, "owner-a")
    await store.insert_job(JobRow.of(job), record)
    assert (await store.get_job(job.job_id)).dedup_key == "v9:0123456789abcdef"  # type: ignore[union-attr]
    assert await store.get_idempotency("owner-a:key") == record


async def test_retention_deletes_only_what_ended_before_the_cutoff(store: JobStore):
    """The janitor's deletes: finished jobs by their end, in bounded batches; active jobs never;
    idempotency records and stage runs by age."""
    jobs = [new_job(n) for n in range(6)]
    for job in jobs:
        await store.insert_job(JobRow.of(job), IdempotencyRecord(f"k{job.job_id}", "h", job.job_id, "{}", 202))
    old = utcnow() - timedelta(hours=2)
    for job, status in zip(jobs, ["completed", "failed", "cancelled", "completed", "running", "queued"], strict=True):
        job.status = JobStatus(status)
        if job.status.terminal:
            job.finished_at = old if job.job_id != "job0003" else utcnow()
        await store.save_job(job)
    states = await store.job_states(["job0000", "job0004", "job0005", "missing"])
    assert states["job0000"] == ("completed", old.timestamp())
    assert states["job0004"] == ("running", None) and states["job0005"] == ("queued", None)
    assert "missing" not in states
    assert await store.job_states([]) == {}
    cutoff = (utcnow() - timedelta(hours=1)).timestamp()
    first = await store.delete_finished_jobs(cutoff, 2)
    second = await store.delete_finished_jobs(cutoff, 2)
    assert len(first) == 2 and sorted(first + second) == ["job0000", "job0001", "job0002"]
    assert await store.delete_finished_jobs(cutoff, 2) == []
    left = await store.job_states([j.job_id for j in jobs])
    assert sorted(left) == ["job0003", "job0004", "job0005"]
    assert await store.delete_idempotency(utcnow().timestamp() - 3600) == 0
    assert await store.delete_idempotency(utcnow().timestamp() + 60) == 6
    assert await store.get_idempotency("kjob0003") is None
    await store.record_stage_run("download", 1.0, None)
    assert await store.delete_stage_runs(utcnow().timestamp() - 3600) == 0
    assert await store.delete_stage_runs(utcnow().timestamp() + 60) == 1
    assert await store.stage_runs(0) == []


# --- the outbox (issue 14): written with the job change, claimed, recorded ---
def hook(n: int, job: Job, event: str, url: str = "http://receiver/hook", at: float | None = None) -> DeliveryRow:
    return DeliveryRow(f"msg_{n}", job.job_id, url, event, f'{{"n":{n}}}', time.time() if at is None else at)


def convex_row(job: Job, path: str, args: str) -> DeliveryRow:
    return DeliveryRow("", job.job_id, CONVEX, path, args, time.time())


async def test_deliveries_are_written_with_the_job_change_and_claimed_one_per_pair(store: JobStore):
    job, other = new_job(1), new_job(2)
    await store.insert_job(JobRow.of(job), effects=Effects(deliveries=[convex_row(job, "video:upsert", "{}")]))
    await store.insert_job(JobRow.of(other))
    job.status = JobStatus.RUNNING
    await store.save_job(job, Effects(deliveries=[hook(1, job, "job.started"), hook(2, job, "job.stage_changed")]))
    await store.save_job(other, Effects(deliveries=[hook(3, other, "job.started")]))
    assert await store.delivery_backlog() == 3
    now = time.time() + 1
    # The oldest pending delivery of each (job, receiver) only; a second sender gets none of them.
    claimed = await store.claim_deliveries("a", now, 10, 30)
    assert sorted(d.id for d in claimed) == ["msg_1", "msg_3"]
    assert await store.claim_deliveries("b", now, 10, 30) == []
    first = next(d for d in claimed if d.id == "msg_1")
    assert (first.job_id, first.url, first.event, first.body, first.attempts) == (
        job.job_id,
        "http://receiver/hook",
        "job.started",
        '{"n":1}',
        0,
    )
    # A failed attempt keeps it pending (and its pair's next one waits); the retry has the same id.
    assert await store.record_attempt("a", first, Attempt(now, 503, "HTTP 503", 1.5), PENDING, now + 5)
    assert await store.claim_deliveries("b", now + 1, 10, 30) == []
    assert await store.next_delivery_at(now + 1) == pytest.approx(now + 5)
    again = await store.claim_deliveries("b", now + 6, 10, 30)
    assert [(d.id, d.attempts) for d in again] == [("msg_1", 1)]
    assert not await store.record_attempt("a", again[0], Attempt(now + 6, 200, None, 1.0), DELIVERED, None)
    assert await store.record_attempt("b", again[0], Attempt(now + 6, 200, None, 1.0), DELIVERED, None)
    assert [d.id for d in await store.claim_deliveries("b", now + 7, 10, 30)] == ["msg_2"]
    history = await store.delivery_history(job.job_id)
    assert [(h["id"], h["state"]) for h in history] == [("msg_1", DELIVERED), ("msg_2", PENDING)]
    assert [a["status"] for a in history[0]["attempts"]] == [503, 200]
    # The Convex state written with the insert is due once.
    updates = await store.claim_convex("a", now, 10, 30)
    assert [(u.job_id, u.path, u.version) for u in updates] == [(job.job_id, "video:upsert", 1)]
    assert await store.claim_convex("b", now, 10, 30) == []


async def test_a_claim_expires_and_a_released_claim_is_due_again(store: JobStore):
    job = new_job(1)
    await store.insert_job(JobRow.of(job), effects=Effects(deliveries=[hook(1, job, "job.completed")]))
    now = time.time() + 1
    assert [d.id for d in await store.claim_deliveries("a", now, 10, 5)] == ["msg_1"]
    assert await store.claim_deliveries("b", now + 4, 10, 5) == []
    taken = await store.claim_deliveries("b", now + 6, 10, 5)  # a's claim expired (a was killed)
    assert [(d.id, d.attempts) for d in taken] == [("msg_1", 0)]
    await store.release_claims("b")
    assert [d.id for d in await store.claim_deliveries("c", now + 6, 10, 5)] == ["msg_1"]


async def test_progress_is_superseded_and_gone_receivers_get_nothing_more(store: JobStore):
    job = new_job(1)
    await store.insert_job(JobRow.of(job))
    t = time.time()
    await store.record_deliveries([hook(1, job, "job.progress", at=t)])
    await store.record_deliveries([hook(2, job, "job.progress", at=t + 1)])
    await store.save_job(job, Effects(deliveries=[hook(3, job, "job.completed", at=t + 2)]))
    states = {h["id"]: h["state"] for h in await store.delivery_history(job.job_id)}
    assert states == {"msg_1": SUPERSEDED, "msg_2": SUPERSEDED, "msg_3": PENDING}
    # A claimed progress event is being sent: it is not superseded.
    other = new_job(2)
    await store.insert_job(JobRow.of(other), effects=Effects(deliveries=[hook(4, other, "job.progress", at=t)]))
    (sending,) = await store.claim_deliveries("a", t + 1, 10, 30)
    await store.record_deliveries([hook(5, other, "job.progress", at=t + 2)])
    states = {h["id"]: h["state"] for h in await store.delivery_history(other.job_id)}
    assert states == {"msg_4": PENDING, "msg_5": PENDING}
    # 410 Gone stops the pair: its pending deliveries, and those recorded later.
    assert await store.record_attempt("a", sending, Attempt(t + 3, 410, "gone", 1.0), STOPPED, None)
    await store.record_deliveries([hook(6, other, "job.completed", at=t + 4)])
    states = {h["id"]: h["state"] for h in await store.delivery_history(other.job_id)}
    assert states == {"msg_4": STOPPED, "msg_5": STOPPED}
    assert await store.delivery_backlog() == 1  # msg_3


async def test_convex_keeps_the_newest_state_of_a_job(store: JobStore):
    job = new_job(1)
    await store.insert_job(JobRow.of(job), effects=Effects(deliveries=[convex_row(job, "video:upsert", '{"p":1}')]))
    now = time.time() + 1
    (first,) = await store.claim_convex("a", now, 10, 30)
    # Two newer states while the first is being sent: the newest replaces the other.
    await store.save_job(job, Effects(deliveries=[convex_row(job, "video:upsert", '{"p":2}')]))
    await store.save_job(job, Effects(deliveries=[convex_row(job, "video:markCompleted", '{"p":3}')]))
    assert await store.claim_convex("b", now, 10, 30) == []  # still claimed by a
    await store.convex_done("a", first, True, now, None)
    assert await store.convex_backlog() == 1
    (newest,) = await store.claim_convex("b", now, 10, 30)
    assert (newest.path, newest.args, newest.version) == ("video:markCompleted", '{"p":3}', 3)
    await store.convex_done("b", newest, False, now + 10, "HTTP 503")  # a transient failure
    assert await store.claim_convex("b", now + 5, 10, 30) == []
    (retry,) = await store.claim_convex("b", now + 11, 10, 30)
    assert (retry.version, retry.attempts) == (3, 1)
    await store.convex_done("b", retry, True, now, None)
    assert await store.convex_backlog() == 0
    assert await store.purge_deliveries(time.time() + 3600) == 0  # no webhook rows; the Convex row goes
    await store.save_job(job, Effects(deliveries=[convex_row(job, "video:upsert", '{"p":4}')]))
    (fresh,) = await store.claim_convex("b", now + 12, 10, 30)
    assert fresh.version == 1  # a new row: purged before


async def test_outbox_rows_of_a_failed_write_are_not_written(store: JobStore, backend: Backend):
    """The job change and its outbox rows commit together or not at all: a duplicate insert is
    refused in a burst, and its rows are not written (the others' are)."""
    jobs = [new_job(n) for n in range(3)]
    await store.insert_job(JobRow.of(jobs[1]))
    results = await asyncio.gather(
        *(
            store.insert_job(JobRow.of(job), effects=Effects(deliveries=[hook(n, job, "job.started")]))
            for n, job in enumerate(jobs)
        ),
        return_exceptions=True,
    )
    assert results[0] is None and isinstance(results[1], backend.conflict) and results[2] is None
    assert await store.delivery_backlog() == 2
    assert await store.delivery_history(jobs[1].job_id) == []


async def test_purge_keeps_pending_deliveries(store: JobStore):
    job = new_job(1)
    await store.insert_job(JobRow.of(job), effects=Effects(deliveries=[hook(1, job, "job.started")]))
    await store.record_deliveries([hook(2, job, "job.completed", url="http://other/hook")])
    now = time.time() + 1
    claimed = await store.claim_deliveries("a", now, 10, 30)
    done = next(d for d in claimed if d.id == "msg_1")
    await store.record_attempt("a", done, Attempt(now, 204, None, 1.0), DELIVERED, None)
    assert await store.purge_deliveries(now - 60) == 0
    assert await store.purge_deliveries(now + 60) == 1
    assert [h["id"] for h in await store.delivery_history(job.job_id)] == ["msg_2"]


# --- the event streams' table (job_events) ---
def events_of(job: Job, *types: str) -> Effects:
    """The job's next events (as klipstream.jobs.events numbers them: the job row names its last)."""
    rows = []
    for type_ in types:
        job.event_seq += 1
        rows.append(EventRow(job.job_id, job.event_seq, type_, f'{{"n": {job.event_seq}}}'))
    return Effects(events=tuple(rows))


async def test_events_are_written_with_the_job_and_read_after_a_cursor(store: JobStore):
    job, other = new_job(1), new_job(2)
    await store.insert_job(JobRow.of(job), effects=events_of(job, "stage"))
    await store.insert_job(JobRow.of(other))
    job.status = JobStatus.RUNNING
    await store.save_job(job, events_of(job, "progress", "stage"))
    await store.save_job(other, events_of(other, "stage"))
    await store.save_job(job)  # a checkpoint with no event
    stored = await store.get_job(job.job_id)
    assert stored is not None and stored.event_seq == 3 and stored.status is JobStatus.RUNNING
    assert [(e.seq, e.type, e.data) for e in await store.job_events(job.job_id, 0)] == [
        (1, "stage", '{"n": 1}'),
        (2, "progress", '{"n": 2}'),
        (3, "stage", '{"n": 3}'),
    ]
    assert [e.seq for e in await store.job_events(job.job_id, 2)] == [3]
    assert await store.job_events(job.job_id, 3) == []
    assert await store.job_events("missing", 0) == []
    both = await store.events_after({job.job_id: 1, other.job_id: 0, "missing": 0})
    assert [(e.job_id, e.seq) for e in both] == [(job.job_id, 2), (job.job_id, 3), (other.job_id, 1)]
    assert await store.events_after({}) == []


async def test_a_job_change_that_is_not_written_writes_no_event(store: JobStore, backend: Backend):
    """Events go with their job change or not at all: a save of a job that is not there, and an
    insert refused by its key, leave no event behind."""
    ghost = new_job(7)
    await store.save_job(ghost, events_of(ghost, "stage"))
    assert await store.job_events(ghost.job_id, 0) == []
    job = new_job(8)
    await store.insert_job(JobRow.of(job))
    twin = new_job(8)
    with pytest.raises(backend.conflict):
        await store.insert_job(JobRow.of(twin), effects=events_of(twin, "stage"))
    assert await store.job_events(job.job_id, 0) == []


async def test_an_event_id_already_stored_keeps_its_event(store: JobStore):
    """A write reported failed may have committed: its id written again keeps the first event, and
    the job change itself still lands."""
    job = new_job(3)
    await store.insert_job(JobRow.of(job), effects=events_of(job, "stage"))
    job.event_seq -= 1
    job.warnings.append("again")
    await store.save_job(job, Effects(events=(EventRow(job.job_id, 1, "progress", "{}"),)))
    assert [(e.seq, e.type) for e in await store.job_events(job.job_id, 0)] == [(1, "stage")]
    assert (await store.get_job(job.job_id)).warnings == ["again"]  # type: ignore[union-attr]


async def test_events_are_bounded_per_job(backend: Backend):
    """The last `events_kept` events of a job stay (and at most TRIM_EVERY - 1 more: old ones are
    trimmed by key range once per TRIM_EVERY events, not on every write)."""
    store = backend.make(events_kept=5)
    await store.open()
    try:
        job, other = new_job(4), new_job(5)
        await store.insert_job(JobRow.of(job))
        await store.insert_job(JobRow.of(other))
        await store.save_job(other, events_of(other, "stage", "stage"))
        for _ in range(3 * TRIM_EVERY + 3):
            await store.save_job(job, events_of(job, "progress"))
        seqs = [e.seq for e in await store.job_events(job.job_id, 0)]
        last = 3 * TRIM_EVERY + 3
        assert seqs == list(range(seqs[0], last + 1))
        assert 5 <= len(seqs) <= 5 + TRIM_EVERY - 1, seqs
        assert [e.seq for e in await store.job_events(other.job_id, 0)] == [1, 2]  # another job's are its own
    finally:
        await store.close()


async def test_retention_deletes_a_jobs_events_with_it(store: JobStore):
    old = utcnow() - timedelta(hours=2)
    gone, kept = new_job(1), new_job(2)
    for job in (gone, kept):
        await store.insert_job(JobRow.of(job))
        job.status, job.finished_at = JobStatus.COMPLETED, old if job is gone else utcnow()
        await store.save_job(job, events_of(job, "stage", "completed"))
    assert await store.delete_finished_jobs((utcnow() - timedelta(hours=1)).timestamp(), 10) == [gone.job_id]
    assert await store.job_events(gone.job_id, 0) == []
    assert [e.seq for e in await store.job_events(kept.job_id, 0)] == [1, 2]


async def test_a_burst_of_saves_with_events_is_all_stored(store: JobStore):
    """Saves with events made in one loop turn go in one transaction (PostgreSQL: one pipelined
    statement for the run): every job's change and event lands."""
    jobs = [new_job(n) for n in range(20)]
    for job in jobs:
        await store.insert_job(JobRow.of(job))
    for job in jobs:
        job.status = JobStatus.RUNNING
    await asyncio.gather(*(store.save_job(job, events_of(job, "stage")) for job in jobs))
    rows = await store.events_after({job.job_id: 0 for job in jobs})
    assert sorted((e.job_id, e.seq) for e in rows) == [(job.job_id, 1) for job in jobs]
    stored = [await store.get_job(job.job_id) for job in jobs]
    assert all(job is not None and job.status is JobStatus.RUNNING and job.event_seq == 1 for job in stored)


async def test_events_and_outbox_rows_of_one_change_commit_together(store: JobStore, backend: Backend):
    """A change carrying both kinds of effects writes both with the job; a refused insert (the
    job exists) writes neither, while the burst's other change still writes both."""
    first, taken = new_job(1), new_job(2)
    await store.insert_job(JobRow.of(taken))

    def both(n: int, job: Job) -> Effects:
        return Effects(events=events_of(job, "stage").events, deliveries=[hook(n, job, "job.started")])

    results = await asyncio.gather(
        store.insert_job(JobRow.of(first), effects=both(1, first)),
        store.insert_job(JobRow.of(taken), effects=both(2, taken)),
        return_exceptions=True,
    )
    assert results[0] is None and isinstance(results[1], backend.conflict)
    assert [e.seq for e in await store.job_events(first.job_id, 0)] == [1]
    assert [h["id"] for h in await store.delivery_history(first.job_id)] == ["msg_1"]
    assert await store.job_events(taken.job_id, 0) == []
    assert await store.delivery_history(taken.job_id) == []
    first.status = JobStatus.RUNNING
    await store.save_job(first, both(3, first))
    assert [e.seq for e in await store.job_events(first.job_id, 0)] == [1, 2]
    assert [h["id"] for h in await store.delivery_history(first.job_id)] == ["msg_1", "msg_3"]
