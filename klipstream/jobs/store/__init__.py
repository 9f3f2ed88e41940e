"""The durable job store: the interface the service uses, and the rows it stores.

`JobStore` is what the job service and the runner call; `SQLiteStore` (klipstream.jobs.store.sqlite)
is the embedded backend, `PostgresStore` (klipstream.jobs.store.postgres) the shared one that
several instances can use at once. Both pass tests/test_store_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from klipstream.errors import DatabaseUnavailable
from klipstream.models import Job, JobStatus

if TYPE_CHECKING:
    from klipstream.config import Settings

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
EVENTS_KEPT = 256  # job_events rows kept per job (KLIPSTREAM_STREAM_EVENTS_KEPT)
# Old events of a job are trimmed when its sequence crosses a multiple of this: one indexed range
# delete every TRIM_EVERY events instead of one per event, so a job keeps between EVENTS_KEPT and
# EVENTS_KEPT + TRIM_EVERY - 1 rows.
TRIM_EVERY = 32


class EventRow(NamedTuple):
    """One event of a job's event stream, as stored in `job_events`: its sequence is the SSE id."""

    job_id: str
    seq: int
    type: str  # the SSE event type: stage | progress | completed | failed | cancelled
    data: str  # JSON text on one line


def trim_below(events: Sequence[EventRow], kept: int) -> int:
    """The sequence at and below which a job's older events are deleted with these, or 0 (none):
    only when the sequence crosses a multiple of TRIM_EVERY, so trimming is no extra statement
    per write."""
    if not events:
        return 0
    first, last = events[0].seq, events[-1].seq
    if (first - 1) // TRIM_EVERY == last // TRIM_EVERY:
        return 0
    return max(0, last - kept)


RETRY_AFTER_SECONDS = 5  # what a client told the store is unavailable is asked to wait


class StoreTimeout(DatabaseUnavailable, TimeoutError):
    """The store did not start the request in time, and never will: nothing was written.

    A `DatabaseUnavailable` (503 with Retry-After on every route), and a `TimeoutError` for the
    callers that settle a submission's outcome themselves."""


class StoreStalled(DatabaseUnavailable, TimeoutError):
    """The store started the request but has not finished it in time: the outcome is not known
    yet. `outcome` settles with the real result when the store gets there, so a caller that must
    know (a submission whose row may still commit) can follow it."""

    def __init__(self, message: str, outcome: asyncio.Future[Any]) -> None:
        super().__init__(message, retry_after=RETRY_AFTER_SECONDS)
        self.outcome = outcome


class LeaseLost(Exception):
    """A write of a job whose lease this instance no longer holds (it expired and the job was
    re-queued, maybe claimed by another instance): the write is refused, and the run stops."""


@dataclass(frozen=True)
class InstanceBeat:
    """One instance's heartbeat row (the `instances` table of a shared store)."""

    id: str
    host: str
    pid: int
    started_at: float
    running: int  # jobs running here now
    max_running: int  # KLIPSTREAM_MAX_RUNNING_JOBS (0: an API-only instance)


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str  # "<owner>:<Idempotency-Key>": keys are scoped to the API key that made them
    body_hash: str
    job_id: str
    response: str  # the first answer's JSON body
    status: int
    owner: str = ""  # a hash of the API key ("" when the server has no API keys)


# --- the outbox: webhook deliveries and Convex mirror updates, written with the job change ---
CONVEX = "convex:"  # DeliveryRow.target of a Convex mirror update (not a URL)
# States of a webhook delivery.
PENDING = "pending"  # waiting for its (next) attempt
DELIVERED = "delivered"  # the receiver answered 2xx
FAILED = "failed"  # gave up: a permanent refusal or KLIPSTREAM_WEBHOOK_MAX_AGE_SECONDS of failures
STOPPED = "stopped"  # the receiver answered 410 Gone for this job
SUPERSEDED = "superseded"  # an unsent progress event replaced by a newer one
# A progress or terminal event supersedes the unsent (and unclaimed) progress events of its
# (job, receiver): a receiver that was down gets the newest progress, not a backlog of them.
SUPERSEDING = ("job.progress", "job.completed", "job.failed", "job.cancelled")


class DeliveryRow(NamedTuple):
    """An outbox row, written in the same transaction as the job change that causes it.

    A webhook delivery to `target` (a callback URL): `id` is its webhook-id (the same on every
    retry), `event` its type, `body` the exact bytes signed and sent. Or, with target CONVEX, the
    newest state of the job for the Convex mirror: `event` is the mutation's path, `body` its
    arguments as JSON; it replaces the job's previous unsent state (the mirror needs the newest
    state of a job, in order, at least once, not every intermediate one)."""

    id: str
    job_id: str
    target: str
    event: str
    body: str
    created_at: float


class Effects(NamedTuple):
    """Rows written in the same transaction as the job change that causes them."""

    events: Sequence[EventRow] = ()  # job_events rows (the job's event stream)
    deliveries: Sequence[DeliveryRow] = ()  # webhook deliveries and Convex states (the outbox)


NO_EFFECTS = Effects()


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery claimed for sending: what was recorded, and how often it was tried."""

    id: str
    job_id: str
    url: str
    event: str
    body: str
    created_at: float
    attempts: int


@dataclass(frozen=True)
class Attempt:
    at: float
    status: int | None  # HTTP status, None when no answer came
    error: str | None
    duration_ms: float


@dataclass(frozen=True)
class ConvexUpdate:
    """A job's newest unsent Convex state, claimed for sending; `version` says which state."""

    job_id: str
    path: str
    args: str  # JSON
    version: int
    attempts: int


def history(deliveries: Sequence[Sequence[Any]], attempts: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Deliveries (id, event, state, attempts, created_at, next_attempt_at, last_status,
    last_error, finished_at) and their attempts as the job JSON shows them."""
    by_delivery: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        by_delivery.setdefault(a[0], []).append(
            {"attempt": a[1], "at": a[2], "status": a[3], "error": a[4], "duration_ms": round(a[5], 1)}
        )
    return [
        {
            "id": d[0],
            "type": d[1],
            "state": d[2],
            "attempts": by_delivery.get(d[0], []),
            "created_at": d[4],
            "next_attempt_at": d[5] if d[2] == PENDING else None,
            "last_status": d[6],
            "last_error": d[7],
            "finished_at": d[8],
        }
        for d in deliveries
    ]


class JobStore(Protocol):
    shared: bool  # True: several instances use this store (SharedJobStore); False: this process only

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    async def insert_job(
        self, row: JobRow, idempotency: IdempotencyRecord | None = None, effects: Effects = NO_EFFECTS
    ) -> None: ...
    async def save_job(self, job: Job, effects: Effects = NO_EFFECTS) -> None: ...
    # --- the event streams' table (job_events) ---
    async def job_events(self, job_id: str, after: int) -> list[EventRow]: ...
    async def events_after(self, cursors: dict[str, int]) -> list[EventRow]: ...
    async def get_job(self, job_id: str) -> Job | None: ...
    async def list_jobs(self, status: str | None, limit: int, before_seq: int | None) -> list[tuple[int, Job]]: ...
    async def active_jobs(self) -> list[Job]: ...
    async def get_idempotency(self, key: str) -> IdempotencyRecord | None: ...
    async def record_stage_run(self, stage: str, seconds: float, media_seconds: float | None) -> None: ...
    async def stage_runs(self, since: float) -> list[tuple[str, float, float | None]]: ...
    async def terminal_counts(self, since: float) -> dict[str, int]: ...
    # --- retention (the janitor) ---
    async def job_states(self, job_ids: list[str]) -> dict[str, tuple[str, float | None]]: ...
    async def delete_finished_jobs(self, finished_before: float, limit: int) -> list[str]: ...
    async def delete_idempotency(self, created_before: float) -> int: ...
    async def delete_stage_runs(self, finished_before: float) -> int: ...
    # --- the outbox (klipstream.integrations.webhooks and .convex send it) ---
    async def record_deliveries(self, rows: Sequence[DeliveryRow]) -> None: ...
    async def claim_deliveries(self, owner: str, now: float, limit: int, lease_seconds: float) -> list[Delivery]: ...
    async def next_delivery_at(self, now: float) -> float | None: ...
    async def record_attempt(
        self, owner: str, delivery: Delivery, attempt: Attempt, state: str, next_attempt_at: float | None
    ) -> bool: ...
    async def release_claims(self, owner: str) -> None: ...
    async def delivery_backlog(self) -> int: ...
    async def purge_deliveries(self, finished_before: float) -> int: ...
    async def delivery_history(self, job_id: str) -> list[dict[str, Any]]: ...
    async def claim_convex(self, owner: str, now: float, limit: int, lease_seconds: float) -> list[ConvexUpdate]: ...
    async def convex_done(
        self, owner: str, update: ConvexUpdate, sent: bool, next_attempt_at: float, error: str | None
    ) -> None: ...
    async def convex_backlog(self) -> int: ...


class SharedJobStore(JobStore, Protocol):
    """A store several instances use at once (PostgreSQL): what klipstream.jobs.cluster needs."""

    def leased(self) -> dict[str, int]: ...
    def release(self, job_id: str) -> None: ...
    async def claim(self, owner: str, lease_seconds: float, aging_seconds: float) -> tuple[str, str] | None: ...
    async def renew(self, lease_seconds: float) -> dict[str, bool]: ...
    async def reap(self) -> list[str]: ...
    async def cancel_queued(self, job: Job, effects: Effects = NO_EFFECTS) -> bool: ...
    async def request_cancel(self, job_id: str) -> bool: ...
    async def requeue_finished(self, job: Job, effects: Effects = NO_EFFECTS) -> bool: ...
    async def active_job(self, dedup_key: str) -> Job | None: ...
    async def queue_place(self, job_id: str, aging_seconds: float) -> int | None: ...
    async def queued_counts(self) -> dict[str, int]: ...
    async def heartbeat_instance(self, instance: InstanceBeat) -> None: ...
    async def remove_instance(self, instance_id: str) -> None: ...
    async def instances(self) -> list[dict[str, Any]]: ...
    async def listen(self, on_change: Callable[[str], None]) -> bool: ...
    def listening(self) -> bool: ...


class JobRow(NamedTuple):
    """A job as stored: the columns the store filters and sorts on, and the whole job as JSON.

    A tuple in the order of the `jobs` table's columns (after `seq`), so it binds as it is.
    """

    job_id: str
    video_id: str
    status: str
    priority: str
    created_at: float
    updated_at: float
    finished_at: float | None
    doc: str
    dedup_key: str

    @classmethod
    def of(cls, job: Job) -> JobRow:
        return cls(
            job.job_id,
            job.video_id,
            job.status.value,
            job.priority.value,
            job.created_at.timestamp(),
            job.updated_at.timestamp(),
            job.finished_at.timestamp() if job.finished_at else None,
            job.model_dump_json(exclude_defaults=True),  # a quarter of the bytes; defaults return on read
            "" if job.options.force else job.dedup_key,  # a forced job shares nothing (unique index)
        )

    @classmethod
    def new(cls, doc: dict[str, Any], encoded: str) -> JobRow:
        """The row of a job just submitted, from the plain data it was encoded from."""
        created = doc["created_at"].timestamp()
        forced = bool(doc.get("options", {}).get("force"))
        return cls(
            doc["job_id"],
            doc["video_id"],
            "queued",
            doc["priority"],
            created,
            created,
            None,
            encoded,
            "" if forced else doc["dedup_key"],
        )


def create_store(settings: Settings) -> JobStore:
    """PostgreSQL when KLIPSTREAM_DATABASE_URL is set, else SQLite in the data directory."""
    if settings.database_url:
        from klipstream.jobs.store.postgres import PostgresStore

        return PostgresStore(
            settings.database_url,
            pool_size=settings.database_pool_size,
            timeout=settings.database_timeout_seconds,
            events_kept=settings.stream_events_kept,
            max_queued=settings.max_queued_jobs,
            max_running=settings.cluster_max_running_jobs,
        )
    from klipstream.jobs.store.sqlite import SQLiteStore

    return SQLiteStore(settings.database_path, events_kept=settings.stream_events_kept)
