"""The shared job store: PostgreSQL, through asyncpg (docs/decisions.md says why asyncpg).

Writes are group-committed as in the SQLite store: the writes made during one turn of the event
loop travel to the database together, in one transaction, and the writes made while that
transaction is in flight form the next one. Two transactions can be in flight at once, but never
two that write the same job, so writes of a job land in the order they were made. Consecutive
writes of the same statement become one pipelined `executemany` (one round trip for the whole
run); a batch that is one such run needs no BEGIN/COMMIT at all, since `executemany` is atomic.
If a statement fails (a constraint), the batch is rolled back and each write runs again alone, so
one failure stays local.

Reads go straight to the pool, beside the writers: every caller's write has committed before its
future resolved, so a read started afterwards sees it.

Every call is bounded by the store's timeout. When PostgreSQL cannot be reached (refused, reset,
shutting down, too many connections, or no answer in time) the call fails with
`DatabaseUnavailable`, which the HTTP layer answers with 503 and Retry-After. A write whose caller
has already been answered (its timeout passed) is dropped rather than written late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from klipstream.errors import DatabaseUnavailable
from klipstream.jobs.store import (
    ACTIVE,
    CONVEX,
    EVENTS_KEPT,
    NO_EFFECTS,
    PENDING,
    STOPPED,
    SUPERSEDING,
    Attempt,
    ConvexUpdate,
    Delivery,
    DeliveryRow,
    Effects,
    EventRow,
    IdempotencyRecord,
    InstanceBeat,
    JobRow,
    LeaseLost,
    history,
    trim_below,
)
from klipstream.jobs.store.migrations import upgrade_postgres
from klipstream.models import Job
from klipstream.queue import QueueFull

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_BATCH = 512  # writes per transaction
WRITERS = 2  # write transactions in flight at once (on their own pooled connections)
RETRY_AFTER_SECONDS = 5
LEASE_LOST_SQLSTATE = "KS001"  # raised by klipstream_fence() (migration 3)
QUEUE_FULL_SQLSTATE = "KS002"  # raised by klipstream_queue_admit() (migration 7)
# Payload: the ids of the jobs a commit wrote, comma-separated, or "*" (sent after the commit, for
# claims); and "job_id:seq" for a job's stream events (sent in the transaction that writes them).
NOTIFY_CHANNEL = "klipstream_jobs"
NOTIFY_MAX_PAYLOAD = 7000  # bytes (PostgreSQL's limit is 8000)
LISTEN_SELF_TEST_SECONDS = 1.0
INSTANCE_FORGET_SECONDS = 3600.0  # an instance silent this long (killed, scaled in) leaves the instances table

# What "the database is not there" looks like: the socket (refused, reset, unreachable), the
# protocol (connection lost mid-call), the server (shutting down, starting up, crash recovery:
# SQLSTATE class 57; too many connections, out of memory or disk: class 53), or our timeout.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

# A call the driver refuses before sending it, on a connection that is closed or still consuming
# the server's shutdown message.
_REFUSED_BY_CLIENT = (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)
_NOT_THIS_WRITE = UNAVAILABLE + _REFUSED_BY_CLIENT  # failures of the connection, not of one write

# A new job and, when the submission carried an Idempotency-Key, its record: one statement either
# way, so a burst of submissions is one run of one statement whatever keys they carry. The queue
# bound ($17; NULL: none) is the database's (klipstream_queue_admit, migration 7): a job beyond it
# fails the statement with KS002, QueueFull to the caller.
_INSERT_JOB = """
WITH job AS (
    INSERT INTO jobs
        (job_id, video_id, status, priority, created_at, updated_at, finished_at, doc, dedup_key, enqueued_at)
    SELECT $1::text, $2::text, $3::text, $4::text, $5::double precision, $6::double precision,
        $7::double precision, $8::text, $9::text, $5::double precision
    WHERE klipstream_queue_admit($17::integer)
)
INSERT INTO idempotency (key, body_hash, job_id, response, status, created_at, owner)
SELECT $10::text, $11::text, $12::text, $13::text, $14::integer, $15::double precision, $16::text
WHERE $10::text IS NOT NULL
"""
_SAVE_JOB = (
    "UPDATE jobs SET video_id=$1, status=$2, priority=$3, created_at=$4, updated_at=$5, finished_at=$6, doc=$7,"
    " dedup_key=$8 WHERE job_id=$9"
)
# A job change and its stream events in ONE statement, so they commit together even when a
# group-commit batch is replayed write by write, and a refused fenced update writes no event. The
# events are the arrays $11-$13; an event id already stored keeps its event (a write reported
# failed may have committed after all); the job's oldest events, at and below $14, are trimmed;
# the NOTIFY "job_id:last seq" is part of the same transaction, so it is sent only if it commits.
_EVENTS_CTE = """
e AS (
    INSERT INTO job_events (job_id, seq, type, data, created_at)
    SELECT j.job_id, ev.seq, ev.type, ev.data, $10::double precision
    FROM j, unnest($11::bigint[], $12::text[], $13::text[]) AS ev (seq, type, data)
    ON CONFLICT DO NOTHING
    RETURNING seq
),
t AS (DELETE FROM job_events WHERE job_id = $9 AND seq <= $14::bigint AND EXISTS (SELECT FROM j))
SELECT pg_notify('{channel}', $9 || ':' || m.last) FROM (SELECT max(seq) AS last FROM e) m WHERE m.last IS NOT NULL
"""
_SAVE_JOB_EVENTS = (
    "WITH j AS (UPDATE jobs SET video_id=$1, status=$2, priority=$3, created_at=$4, updated_at=$5, finished_at=$6,"
    " doc=$7, dedup_key=$8 WHERE job_id=$9 RETURNING job_id)," + _EVENTS_CTE.format(channel="klipstream_jobs")
)
_SAVE_FENCED_EVENTS = (
    "WITH j AS (UPDATE jobs SET video_id=$1, status=$2, priority=$3, created_at=$4, updated_at=$5, finished_at=$6,"
    " doc=$7, dedup_key=$8, lease_token=klipstream_fence($9, lease_token, $15) WHERE job_id=$9 RETURNING job_id),"
    + _EVENTS_CTE.format(channel="klipstream_jobs")
)
# A new job with its stream events (the insert's own statement, with the events and NOTIFY of
# _EVENTS_CTE after it): one statement, so they commit together.
_INSERT_JOB_EVENTS = """
WITH j AS (
    INSERT INTO jobs
        (job_id, video_id, status, priority, created_at, updated_at, finished_at, doc, dedup_key, enqueued_at)
    SELECT $9::text, $1::text, $2::text, $3::text, $4::double precision, $5::double precision,
        $6::double precision, $7::text, $8::text, $4::double precision
    WHERE klipstream_queue_admit($22::integer)
    RETURNING job_id
),
k AS (
    INSERT INTO idempotency (key, body_hash, job_id, response, status, created_at, owner)
    SELECT $15::text, $16::text, $17::text, $18::text, $19::integer, $20::double precision, $21::text
    WHERE $15::text IS NOT NULL
),""" + _EVENTS_CTE.format(channel="klipstream_jobs")
# Events of a job written on a connection inside a transaction (conditional changes of a job not
# running anywhere: a cancel while queued, a retry), with their NOTIFY.
_INSERT_EVENTS = """
WITH e AS (
    INSERT INTO job_events (job_id, seq, type, data, created_at)
    SELECT $1, ev.seq, ev.type, ev.data, $2::double precision
    FROM unnest($3::bigint[], $4::text[], $5::text[]) AS ev (seq, type, data)
    ON CONFLICT DO NOTHING
    RETURNING seq
),
t AS (DELETE FROM job_events WHERE job_id = $1 AND seq <= $6::bigint)
SELECT pg_notify('klipstream_jobs', $1 || ':' || m.last)
FROM (SELECT max(seq) AS last FROM e) m WHERE m.last IS NOT NULL
"""
_READ_EVENTS = (
    "SELECT e.job_id, e.seq, e.type, e.data FROM job_events e"
    " JOIN unnest($1::text[], $2::bigint[]) AS w (job_id, after) ON e.job_id = w.job_id AND e.seq > w.after"
    " ORDER BY e.job_id, e.seq"
)
_STAGE_RUN = "INSERT INTO stage_runs (stage, seconds, media_seconds, finished_at) VALUES ($1, $2, $3, $4)"
_NO_KEY = (None, None, None, None, None, None, None)

# --- several instances ---
# Times of leases and heartbeats are the database's clock, so instances on machines whose clocks
# differ agree on when a lease expires.
_NOW = "extract(epoch from clock_timestamp())"
_LEVEL = "(CASE priority WHEN 'low' THEN 0 WHEN 'normal' THEN 1 WHEN 'high' THEN 2 ELSE 3 END)"
# The queue's order (klipstream.queue): one level per `aging` seconds waited, so the order of
# waiting jobs does not change with time; larger goes first, then the earlier row.
_SCORE = f"{_LEVEL} * $3::double precision - COALESCE(enqueued_at, created_at)"
_CLAIM = f"""
UPDATE jobs SET status = 'running', lease_owner = $1, lease_token = nextval('lease_tokens'),
    lease_expires_at = {_NOW} + $2::double precision
WHERE seq = (
    SELECT seq FROM jobs WHERE status = 'queued' ORDER BY {_SCORE} DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED
) AND status = 'queued'
RETURNING job_id, lease_token, doc
"""
# The same claim under a cluster-wide running limit ($4): once the next job is chosen and locked,
# klipstream_running_below (migration 7) takes an advisory lock, held to the end of this
# statement's transaction, and counts the running jobs with a snapshot taken after it, so claims
# racing on several instances cannot both take the last place. Called last (the costliest
# condition of the row found by seq), so only the count and the update of one row are serialised
# across the cluster, not the search of the queue.
_CLAIM_LIMITED = f"""
UPDATE jobs SET status = 'running', lease_owner = $1, lease_token = nextval('lease_tokens'),
    lease_expires_at = {_NOW} + $2::double precision
WHERE seq = (
    SELECT seq FROM jobs WHERE status = 'queued' ORDER BY {_SCORE} DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED
) AND status = 'queued' AND klipstream_running_below($4::integer)
RETURNING job_id, lease_token, doc
"""
_RENEW = f"""
UPDATE jobs SET lease_expires_at = {_NOW} + $3::double precision
FROM unnest($1::text[], $2::bigint[]) AS held (job_id, token)
WHERE jobs.job_id = held.job_id AND jobs.lease_token = held.token AND jobs.status = 'running'
RETURNING jobs.job_id, jobs.cancel_requested
"""
_REAP = f"""
UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
    lease_attempts = lease_attempts + 1, doc = jsonb_set(doc::jsonb, '{{status}}', '"queued"')::text
WHERE seq IN (
    SELECT seq FROM jobs WHERE status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < {_NOW})
    FOR UPDATE SKIP LOCKED
)
RETURNING job_id
"""
_SAVE_FENCED = (
    "UPDATE jobs SET video_id=$1, status=$2, priority=$3, created_at=$4, updated_at=$5, finished_at=$6, doc=$7,"
    " dedup_key=$8, lease_token=klipstream_fence($9, lease_token, $10) WHERE job_id=$9"
)
_CANCEL_QUEUED = "UPDATE jobs SET status=$1, updated_at=$2, finished_at=$3, doc=$4 WHERE job_id=$5 AND status='queued'"
_REQUEUE_FINISHED = f"""
UPDATE jobs SET status=$1, priority=$2, updated_at=$3, finished_at=NULL, doc=$4, dedup_key=$5,
    enqueued_at={_NOW}, cancel_requested=false, lease_owner=NULL, lease_token=NULL, lease_expires_at=NULL
WHERE job_id=$6 AND status IN ('failed', 'cancelled') AND klipstream_queue_admit($7::integer)
"""
_ENTERED = "COALESCE(enqueued_at, created_at)"
# Jobs ahead of a queued job: in each lane, those that entered before the job's entry time shifted
# by the lanes' level difference in ageing units (the queue's order, klipstream.queue), so that the
# count is one range of the jobs_queued_lanes index per lane.
_PLACE = (
    f"WITH me AS (SELECT {_LEVEL} AS level, {_ENTERED} AS entered FROM jobs WHERE job_id = $1 AND status = 'queued')"
    " SELECT 1 + (SELECT count(*) FROM jobs WHERE status = 'queued' AND ("
    + " OR ".join(
        f"(priority = '{name}' AND {_ENTERED} < me.entered + ({level} - me.level) * $2::double precision)"
        for level, name in enumerate(("low", "normal", "high", "urgent"))
    )
    + ")) FROM me"
)
_INSTANCE_BEAT = f"""
INSERT INTO instances (id, host, pid, started_at, heartbeat_at, running, max_running)
VALUES ($1, $2, $3, $4, {_NOW}, $5, $6)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, running = EXCLUDED.running
"""


# --- the outbox ---
# Webhook deliveries of one write, as arrays. A receiver that answered 410 for the job gets none;
# a progress or terminal event supersedes the unsent, unclaimed progress events of its pair.
_INSERT_DELIVERIES = """
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[])
        WITH ORDINALITY AS r (id, job_id, url, event, body, created_at, n)
), superseded AS (
    UPDATE webhook_deliveries d SET state = 'superseded', finished_at = r.created_at
    FROM r
    WHERE r.event = ANY($7::text[]) AND d.job_id = r.job_id AND d.url = r.url AND d.state = 'pending'
        AND d.event = 'job.progress' AND (d.claim_expires IS NULL OR d.claim_expires < r.created_at)
)
INSERT INTO webhook_deliveries (id, job_id, url, event, body, created_at, next_attempt_at)
SELECT r.id, r.job_id, r.url, r.event, r.body, r.created_at, r.created_at FROM r
WHERE NOT EXISTS (
    SELECT 1 FROM webhook_deliveries s WHERE s.job_id = r.job_id AND s.url = r.url AND s.state = 'stopped'
)
ORDER BY r.n
ON CONFLICT (id) DO NOTHING
"""
_CONVEX_UPSERT = """
INSERT INTO convex_updates (job_id, path, args, version, updated_at, next_attempt_at) VALUES ($1, $2, $3, 1, $4, $4)
ON CONFLICT (job_id) DO UPDATE SET path = EXCLUDED.path, args = EXCLUDED.args, version = convex_updates.version + 1,
    updated_at = EXCLUDED.updated_at,
    next_attempt_at = CASE WHEN convex_updates.attempts = 0 THEN EXCLUDED.next_attempt_at
        ELSE convex_updates.next_attempt_at END
"""
_HEAD = (
    "h.state = 'pending' AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.job_id = h.job_id"
    " AND e.url = h.url AND e.state = 'pending' AND e.seq < h.seq)"
)
# The oldest pending delivery of each (job, receiver), when due and not claimed. SKIP LOCKED: a
# row another instance is claiming right now is left to it; one it has claimed is filtered by its
# claim (re-checked on the committed row), so no delivery is sent by two instances at once, and a
# pair's next delivery is not due while an earlier one is pending anywhere.
_CLAIM_DELIVERIES = f"""
UPDATE webhook_deliveries d SET claimed_by = $1, claim_expires = $2 + $3::double precision
WHERE d.seq IN (
    SELECT h.seq FROM webhook_deliveries h
    WHERE {_HEAD} AND h.next_attempt_at <= $2 AND (h.claim_expires IS NULL OR h.claim_expires < $2)
    ORDER BY h.next_attempt_at LIMIT $4
    FOR UPDATE SKIP LOCKED
)
RETURNING d.id, d.job_id, d.url, d.event, d.body, d.created_at, d.attempts
"""
_NEXT_DUE = f"""
SELECT MIN(GREATEST(h.next_attempt_at, COALESCE(h.claim_expires, 0))) FROM webhook_deliveries h
WHERE {_HEAD} AND (h.claim_expires IS NULL OR h.claim_expires < $1)
"""
_RECORD_ATTEMPT = """
UPDATE webhook_deliveries SET attempts = $1, state = $2, next_attempt_at = $3, last_status = $4, last_error = $5,
    finished_at = $6, claimed_by = NULL, claim_expires = NULL
WHERE id = $7 AND claimed_by = $8
"""
_INSERT_ATTEMPT = """
INSERT INTO webhook_attempts (delivery_id, attempt, at, status, error, duration_ms) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (delivery_id, attempt) DO NOTHING
"""
_STOP_PAIR = """
UPDATE webhook_deliveries SET state = 'stopped', finished_at = $1, last_error = $2, claimed_by = NULL,
    claim_expires = NULL
WHERE job_id = $3 AND url = $4 AND state = 'pending'
"""
_GONE = "receiver answered 410 Gone for this job"
_CLAIM_CONVEX = """
UPDATE convex_updates c SET claimed_by = $1, claim_expires = $2 + $3::double precision
WHERE c.job_id IN (
    SELECT job_id FROM convex_updates
    WHERE version > sent_version AND next_attempt_at <= $2 AND (claim_expires IS NULL OR claim_expires < $2)
    ORDER BY next_attempt_at LIMIT $4
    FOR UPDATE SKIP LOCKED
)
RETURNING c.job_id, c.path, c.args, c.version, c.attempts
"""
_CONVEX_SENT = """
UPDATE convex_updates SET sent_version = GREATEST(sent_version, $1), attempts = 0, last_error = $2,
    claimed_by = NULL, claim_expires = NULL
WHERE job_id = $3 AND claimed_by = $4
"""
_CONVEX_RETRY = """
UPDATE convex_updates SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, claimed_by = NULL,
    claim_expires = NULL
WHERE job_id = $3 AND claimed_by = $4
"""

# The pending outbox rows of an SQLite file (klipstream.integrations.outbox, `klipstream db copy`):
# keyed by delivery id and job id, so an import repeated or interrupted writes nothing twice.
IMPORT_DELIVERIES = """
INSERT INTO webhook_deliveries
    (id, job_id, url, event, body, created_at, next_attempt_at, attempts, last_status, last_error)
SELECT r.id, r.job_id, r.url, r.event, r.body, r.created_at, r.next_attempt_at, r.attempts, r.last_status,
    r.last_error
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::float8[], $8::int[],
    $9::int[], $10::text[]) WITH ORDINALITY
    AS r (id, job_id, url, event, body, created_at, next_attempt_at, attempts, last_status, last_error, n)
ORDER BY r.n
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
IMPORT_ATTEMPTS = """
INSERT INTO webhook_attempts (delivery_id, attempt, at, status, error, duration_ms)
SELECT * FROM unnest($1::text[], $2::int[], $3::float8[], $4::int[], $5::text[], $6::float8[])
ON CONFLICT (delivery_id, attempt) DO NOTHING
RETURNING delivery_id
"""
IMPORT_CONVEX = """
INSERT INTO convex_updates (job_id, path, args, version, updated_at, next_attempt_at)
SELECT r.job_id, r.path, r.args, 1, r.updated_at, r.updated_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS r (job_id, path, args, updated_at)
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
"""


def effect_statements(effects: Effects) -> tuple[tuple[str, Sequence[Any]], ...]:
    """The statements that write `effects`, for the transaction of the job change causing them."""
    hooks = [d for d in effects.deliveries if d.target != CONVEX]
    statements: list[tuple[str, Sequence[Any]]] = []
    if hooks:
        columns = list(zip(*hooks, strict=True))
        statements.append((_INSERT_DELIVERIES, (*map(list, columns), list(SUPERSEDING))))
    statements += [
        (_CONVEX_UPSERT, (d.job_id, d.event, d.body, d.created_at)) for d in effects.deliveries if d.target == CONVEX
    ]
    return tuple(statements)


def redacted(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class PostgresStore:
    """JobStore on PostgreSQL: a pool of connections, one writer task committing batches."""

    shared = True  # several instances use one database: jobs are claimed with leases (klipstream.jobs.cluster)

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        timeout: float = 5.0,
        max_queued: int | None = None,
        max_running: int | None = None,
        events_kept: int = EVENTS_KEPT,
    ) -> None:
        """`max_queued`: the queue bound (KLIPSTREAM_MAX_QUEUED_JOBS), held by the database across
        every instance: a new or retried job beyond it is refused with QueueFull. `max_running`:
        the cluster-wide running limit (KLIPSTREAM_CLUSTER_MAX_RUNNING_JOBS); None: none.
        `events_kept`: stream events kept per job (KLIPSTREAM_STREAM_EVENTS_KEPT)."""
        self.url = url
        self.max_queued = max_queued
        self.max_running = max_running
        self.events_kept = events_kept
        self.pool_size = max(WRITERS + 1, pool_size)  # the writers' connections and one for reads at least
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Write] = []  # made during this turn of the event loop
        self._batches: deque[_Batch] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # Jobs claimed here and still running here: job id -> lease token. Their saves are fenced.
        self._leases: dict[str, int] = {}
        self._notifying: set[asyncio.Task[None]] = set()
        self._listener: asyncpg.Connection | None = None  # LISTEN connection (listen())

    # --- lifecycle ---
    async def open(self) -> None:
        """Apply the migrations (under the advisory lock), then open the pool and the writer."""
        self._loop = asyncio.get_running_loop()
        try:
            conn = await asyncpg.connect(self.url, timeout=self.timeout)
            try:
                await upgrade_postgres(conn)  # no time limit: a migration takes what it takes
            finally:
                await conn.close()
            self._pool = await asyncpg.create_pool(
                self.url,
                # No floor of idle connections: asyncpg would keep reconnecting to restore it
                # during an outage, logging each failure; calls reconnect on demand instead.
                min_size=0,
                max_size=self.pool_size,
                timeout=self.timeout,  # connecting
                command_timeout=self.timeout,
                max_inactive_connection_lifetime=300,
                reset=_keep_session,
            )
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="postgres-writer")

    async def close(self) -> None:
        if self._pool is None:
            return
        if self._pending:  # made in this loop turn: written before the pool closes
            self._flush()
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), self.timeout * 2)
            self._writer.cancel()
            self._writer = None
        if self._listener is not None:
            listener, self._listener = self._listener, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), self.timeout)
        if self._notifying:
            await asyncio.wait(self._notifying, timeout=self.timeout)
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except TimeoutError:
            pool.terminate()

    def _unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        reason = type(exc).__name__ if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return DatabaseUnavailable(
            f"The job database ({redacted(self.url)}) is unavailable ({reason}).",
            retry_after=RETRY_AFTER_SECONDS,
        )

    # --- writes: group commit ---
    def _write(
        self, sql: str, args: Sequence[Any], key: str | None, then: tuple[tuple[str, Sequence[Any]], ...] = ()
    ) -> asyncio.Future[None]:
        """Queue one statement; the future settles once the transaction holding it commits.

        `key` names the row it writes (a job id): writes of one key commit in the order they were
        made; None for rows nothing writes twice (a stage record). `then`: statements that commit
        with it or not at all (the outbox rows of a job change)."""
        if self._pool is None or self._loop is None or self._closing:
            raise RuntimeError("store is not open")
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append(_Write(sql, args, key, future, then))
        if len(self._pending) == 1:
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Hand this loop turn's writes to the writer, with one timeout for all of them."""
        assert self._loop is not None
        if not self._pending:  # close() flushed them already
            return
        writes, self._pending = self._pending, []
        deadline = self._loop.time() + self.timeout
        timer = self._loop.call_at(deadline, self._expire, writes)
        self._batches.append(_Batch(writes, timer, deadline))
        self._wake.set()

    def _expire(self, writes: list[_Write]) -> None:
        error = DatabaseUnavailable(
            f"The job database did not commit within {self.timeout:g} s.", retry_after=RETRY_AFTER_SECONDS
        )
        for write in writes:
            if not write.future.done():
                write.future.set_exception(error)

    async def _write_loop(self) -> None:
        """Send batches in order, up to WRITERS transactions at once.

        A batch starts while an earlier one is still committing unless they write a row in common
        (a job id): then it waits for that one, so writes of a row land in the order they were
        made. Overlapping two transactions hides the round trips and the server's work of one
        behind the other when the database, not this process, is what submissions wait for.
        """
        in_flight: dict[asyncio.Task[None], set[str]] = {}
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._batches:
                batches = [self._batches.popleft()]
                size = len(batches[0].writes)
                while self._batches and size + len(self._batches[0].writes) <= MAX_BATCH:
                    batches.append(self._batches.popleft())
                    size += len(batches[-1].writes)
                keys = {w.key for b in batches for w in b.writes if w.key is not None}
                while len(in_flight) >= WRITERS or any(keys & busy for busy in in_flight.values()):
                    done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        del in_flight[task]
                in_flight[asyncio.create_task(self._commit_batches(batches))] = keys
            if self._closing:
                if in_flight:
                    await asyncio.wait(in_flight)
                return

    async def _commit_batches(self, batches: list[_Batch]) -> None:
        try:
            writes = [w for b in batches for w in b.writes if not w.future.done()]
            await self._commit(writes, batches[0].deadline)
        except Exception:  # a bug here must not stop the writer: fail this batch, go on
            log.exception("postgres writer failed a batch")
            for batch in batches:
                for write in batch.writes:
                    _settle(write.future, RuntimeError("the store's writer failed"))
        finally:
            for batch in batches:
                batch.timer.cancel()

    async def _commit(self, writes: list[_Write], deadline: float) -> None:
        """Commit by the deadline at which the oldest caller is told the database did not answer,
        so that a write is not committed after its caller heard it failed."""
        if not writes:  # every caller has been answered already (timed out)
            return
        try:
            await self._with_connection(lambda conn: _commit_on(conn, writes), deadline)
        except DatabaseUnavailable as exc:
            for write in writes:
                _settle(write.future, exc)
            return
        for write in writes:
            _settle(write.future, None)
        ids = {w.key for w in writes if w.key is not None}
        if ids:  # after the callers are answered: a wake-up for the other instances, off the hot path
            task = asyncio.create_task(self._notify(ids))
            self._notifying.add(task)
            task.add_done_callback(self._notifying.discard)

    async def _notify(self, job_ids: set[str]) -> None:
        """Tell every listening instance which jobs changed (klipstream.jobs.cluster wakes its
        claimers and the streams that follow them). Best effort: they also poll."""
        payload = ",".join(sorted(job_ids))
        if len(payload) > NOTIFY_MAX_PAYLOAD:
            payload = "*"  # too many to name: "something changed"
        try:
            await self._with_connection(lambda c: c.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload))
        except Exception as exc:
            log.debug("job change notification not sent: %s", exc)

    def listening(self) -> bool:
        """The LISTEN connection is open. It is not after a restart of the database (or a broken
        network): the cluster's heartbeat then listens again (klipstream.jobs.cluster)."""
        return self._listener is not None and not self._listener.is_closed()

    async def listen(self, on_change: Callable[[str], None]) -> bool:
        """Receive the job changes every instance notifies, on a connection of its own. Checks
        that a notification really arrives (it does not through a transaction-pooling proxy such
        as PgBouncer): False, with the listener closed, when it does not come within a second."""
        token = f"self-test:{id(self)}:{time.monotonic()}"
        arrived = asyncio.Event()

        def received(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if payload == token:
                arrived.set()
            else:
                on_change(payload)

        try:
            conn = await asyncpg.connect(self.url, timeout=self.timeout)
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        await conn.add_listener(NOTIFY_CHANNEL, received)
        if self._listener is not None:  # a lost one (listening() said so): let it go
            self._listener.terminate()
        self._listener = conn
        await self._with_connection(lambda c: c.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, token))
        try:
            await asyncio.wait_for(arrived.wait(), LISTEN_SELF_TEST_SECONDS)
        except TimeoutError:
            self._listener = None
            await conn.close()
            return False
        return True

    async def _with_connection(
        self, work: Callable[[asyncpg.Connection], Awaitable[T]], deadline: float | None = None
    ) -> T:
        """Run `work` on a pooled connection by `deadline` (loop time; default: the timeout from
        now); unavailability becomes `DatabaseUnavailable`.

        A pooled connection can turn out dead when used: the server shut down or restarted since
        it was last used, and the loop reads the server's goodbye only now. asyncpg then refuses
        the call before sending anything (the connection is closed, or its protocol is still
        consuming that unsolicited error), so the work runs once more on a fresh connection: the
        caller gets the database's real state, not a failure of a connection the pool should have
        dropped.
        """
        if self._pool is None or self._loop is None:
            raise RuntimeError("store is not open")
        if deadline is None:
            deadline = self._loop.time() + self.timeout
        try:
            for attempt in range(2):
                async with asyncio.timeout_at(deadline), self._pool.acquire() as conn:
                    try:
                        return await work(conn)
                    except _REFUSED_BY_CLIENT as exc:
                        conn.terminate()  # the pool opens a new one in its place
                        if attempt == 1:
                            raise ConnectionResetError(f"the database connection broke: {exc}") from exc
            raise AssertionError("unreachable")
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    # --- reads ---
    async def _read(self, query: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        return await self._with_connection(query)

    # --- jobs ---
    async def ping(self) -> bool:
        try:
            return await self._read(lambda c: c.fetchval("SELECT 1")) == 1
        except Exception:  # readiness reports an unreachable store as not ready
            return False

    async def insert_job(
        self, row: JobRow, idempotency: IdempotencyRecord | None = None, effects: Effects = NO_EFFECTS
    ) -> None:
        record = (
            _NO_KEY
            if idempotency is None
            else (
                idempotency.key,
                idempotency.body_hash,
                idempotency.job_id,
                idempotency.response,
                idempotency.status,
                time.time(),
                idempotency.owner,
            )
        )
        then = effect_statements(effects) if effects.deliveries else ()
        if not effects.events:
            await self._write(_INSERT_JOB, (*row, *record, self.max_queued), row.job_id, then)
            return
        job_id, *rest = row
        args = (*rest, job_id, *self._event_args(effects), *record, self.max_queued)
        await self._write(_INSERT_JOB_EVENTS, args, job_id, then)

    async def save_job(self, job: Job, effects: Effects = NO_EFFECTS) -> None:
        """Write the job, with its effects in the same statement; a job leased here only while the
        lease is still ours (else LeaseLost, and none of its effects is written)."""
        job_id, *rest = JobRow.of(job)
        token = self._leases.get(job_id)
        then = effect_statements(effects) if effects.deliveries else ()
        if not effects.events:
            if token is None:
                await self._write(_SAVE_JOB, (*rest, job_id), job_id, then)
            else:
                await self._write(_SAVE_FENCED, (*rest, job_id, token), job_id, then)
            return
        events = self._event_args(effects)
        if token is None:
            await self._write(_SAVE_JOB_EVENTS, (*rest, job_id, *events), job_id, then)
        else:
            await self._write(_SAVE_FENCED_EVENTS, (*rest, job_id, *events, token), job_id, then)

    def _event_args(self, effects: Effects) -> tuple[Any, ...]:
        """$10-$14 of the statements with _EVENTS_CTE: time, the events as arrays, trim bound."""
        events = effects.events
        return (
            time.time(),
            [e.seq for e in events],
            [e.type for e in events],
            [e.data for e in events],
            trim_below(events, self.events_kept),
        )

    async def _insert_events_on(self, conn: asyncpg.Connection, effects: Effects) -> None:
        if effects.events:
            _, *args = self._event_args(effects)
            await conn.execute(_INSERT_EVENTS, effects.events[0].job_id, time.time(), *args)

    # --- the event streams' table ---
    async def job_events(self, job_id: str, after: int) -> list[EventRow]:
        """The job's stored events after `after`, in order."""
        return await self.events_after({job_id: after})

    async def events_after(self, cursors: dict[str, int]) -> list[EventRow]:
        """The stored events of each job after its cursor, by job and in order: one query for all
        the jobs an instance's streams follow."""
        if not cursors:
            return []
        rows = await self._read(lambda c: c.fetch(_READ_EVENTS, list(cursors), list(cursors.values())))
        return [EventRow(*row) for row in rows]

    async def get_job(self, job_id: str) -> Job | None:
        doc = await self._read(lambda c: c.fetchval("SELECT doc FROM jobs WHERE job_id=$1", job_id))
        return Job.model_validate_json(doc) if doc is not None else None

    async def list_jobs(self, status: str | None, limit: int, before_seq: int | None) -> list[tuple[int, Job]]:
        sql = "SELECT seq, doc FROM jobs WHERE true"
        params: list[Any] = []
        if status:
            params.append(status)
            sql += f" AND status=${len(params)}"
        if before_seq is not None:
            params.append(before_seq)
            sql += f" AND seq<${len(params)}"
        params.append(limit)
        sql += f" ORDER BY seq DESC LIMIT ${len(params)}"
        rows = await self._read(lambda c: c.fetch(sql, *params))
        return [(seq, Job.model_validate_json(doc)) for seq, doc in rows]

    async def active_jobs(self) -> list[Job]:
        rows = await self._read(
            lambda c: c.fetch("SELECT doc FROM jobs WHERE status = ANY($1::text[]) ORDER BY seq", list(ACTIVE))
        )
        return [Job.model_validate_json(doc) for (doc,) in rows]

    # --- idempotency ---
    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        row = await self._read(
            lambda c: c.fetchrow(
                "SELECT key, body_hash, job_id, response, status, owner FROM idempotency WHERE key=$1", key
            )
        )
        return IdempotencyRecord(*row) if row else None

    # --- statistics ---
    async def record_stage_run(self, stage: str, seconds: float, media_seconds: float | None) -> None:
        await self._write(_STAGE_RUN, (stage, seconds, media_seconds, time.time()), None)

    async def stage_runs(self, since: float) -> list[tuple[str, float, float | None]]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT stage, seconds, media_seconds FROM stage_runs WHERE finished_at>=$1 ORDER BY finished_at",
                since,
            )
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]

    async def terminal_counts(self, since: float) -> dict[str, int]:
        rows = await self._read(
            lambda c: c.fetch("SELECT status, COUNT(*) FROM jobs WHERE finished_at>=$1 GROUP BY status", since)
        )
        return {status: count for status, count in rows}

    # --- retention (the janitor) ---
    async def job_states(self, job_ids: list[str]) -> dict[str, tuple[str, float | None]]:
        """(status, finished_at) of each of these jobs that exists."""
        if not job_ids:
            return {}
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT job_id, status, finished_at FROM jobs WHERE job_id = ANY($1::text[])", list(job_ids)
            )
        )
        return {job_id: (status, finished_at) for job_id, status, finished_at in rows}

    async def delete_finished_jobs(self, finished_before: float, limit: int) -> list[str]:
        """Delete up to `limit` finished jobs that ended before the cutoff; returns their ids."""
        rows = await self._with_connection(
            lambda c: c.fetch(
                "WITH gone AS (DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs WHERE finished_at < $1"
                " AND status <> ALL($2::text[]) ORDER BY finished_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
                " RETURNING job_id),"
                " events AS (DELETE FROM job_events e USING gone WHERE e.job_id = gone.job_id)"
                " SELECT job_id FROM gone",
                finished_before,
                list(ACTIVE),
                limit,
            )
        )
        return [job_id for (job_id,) in rows]

    async def delete_idempotency(self, created_before: float) -> int:
        return await self._delete("DELETE FROM idempotency WHERE created_at < $1", created_before)

    async def delete_stage_runs(self, finished_before: float) -> int:
        return await self._delete("DELETE FROM stage_runs WHERE finished_at < $1", finished_before)

    async def _delete(self, sql: str, *args: Any) -> int:
        status = await self._with_connection(lambda c: c.execute(sql, *args))
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <n>"

    # --- several instances: claims, leases, fencing, heartbeats (docs/decisions.md, phase 2) ---
    def leased(self) -> dict[str, int]:
        """The jobs this store holds leases on: job id -> lease token."""
        return dict(self._leases)

    def release(self, job_id: str) -> None:
        """The run of a leased job ended here: its writes are no longer fenced, nor renewed."""
        self._leases.pop(job_id, None)

    async def claim(self, owner: str, lease_seconds: float, aging_seconds: float) -> tuple[str, str] | None:
        """Take the next queued job (priority lanes, FIFO, ageing from the stored enqueue time) with
        a lease for `owner`; (job id, stored JSON), or None when nothing is queued. SKIP LOCKED: two
        instances claiming at once take different jobs, and neither waits for the other."""
        limit = self.max_running
        if limit is None:
            row = await self._with_connection(lambda c: c.fetchrow(_CLAIM, owner, lease_seconds, aging_seconds))
        else:
            row = await self._with_connection(
                lambda c: c.fetchrow(_CLAIM_LIMITED, owner, lease_seconds, aging_seconds, limit)
            )
        if row is None:
            return None
        self._leases[row["job_id"]] = row["lease_token"]
        return row["job_id"], row["doc"]

    async def renew(self, lease_seconds: float) -> dict[str, bool]:
        """Push the expiry of every lease held here forward; the jobs whose lease is still ours,
        each with whether a cancel was requested (on any instance). A job missing from the answer
        has lost its lease (reaped after an expiry): its run must stop without writing."""
        held = dict(self._leases)
        if not held:
            return {}
        rows = await self._with_connection(lambda c: c.fetch(_RENEW, list(held), list(held.values()), lease_seconds))
        return {job_id: cancel for job_id, cancel in rows}

    async def reap(self) -> list[str]:
        """Return the running jobs whose lease expired to the queue (the attempt is counted); their
        token is cleared, so a late write of the old owner is refused. Instances silent for
        INSTANCE_FORGET_SECONDS are dropped from the instances table."""
        rows = await self._with_connection(lambda c: c.fetch(_REAP))
        await self._with_connection(
            lambda c: c.execute(f"DELETE FROM instances WHERE heartbeat_at < {_NOW} - $1", INSTANCE_FORGET_SECONDS)
        )
        return [job_id for (job_id,) in rows]

    async def cancel_queued(self, job: Job, effects: Effects = NO_EFFECTS) -> bool:
        """Store `job` (cancelled) if its row is still queued, i.e. no instance has claimed it;
        `effects` with it, only then."""
        row = JobRow.of(job)
        return await self._conditional(
            _CANCEL_QUEUED, (row.status, row.updated_at, row.finished_at, row.doc, row.job_id), effects
        )

    async def _conditional(self, sql: str, args: Sequence[Any], effects: Effects) -> bool:
        """Run a conditional update of one job; when it changed the row, write `effects` in the
        same transaction."""

        async def run(conn: asyncpg.Connection) -> bool:
            async with conn.transaction():
                status = await conn.execute(sql, *args)
                if not status.endswith(" 1"):
                    return False
                await self._insert_events_on(conn, effects)
                for statement, values in effect_statements(effects):
                    await conn.execute(statement, *values)
                return True

        return await self._with_connection(run)

    async def request_cancel(self, job_id: str) -> bool:
        """Flag a job running on some instance for cancellation; its owner's heartbeat stops it."""
        status = await self._with_connection(
            lambda c: c.execute(
                "UPDATE jobs SET cancel_requested = true WHERE job_id = $1 AND status = 'running'", job_id
            )
        )
        return status.endswith(" 1")

    async def requeue_finished(self, job: Job, effects: Effects = NO_EFFECTS) -> bool:
        """Store `job` (queued again) if its row is still failed or cancelled: one retry wins.
        Under the queue bound like a new job: QueueFull when the shared queue is full."""
        row = JobRow.of(job)
        args = (row.status, row.priority, row.updated_at, row.doc, row.dedup_key, row.job_id, self.max_queued)
        try:
            return await self._conditional(_REQUEUE_FINISHED, args, effects)
        except asyncpg.PostgresError as exc:
            failure = _own_failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    async def active_job(self, dedup_key: str) -> Job | None:
        """The oldest queued or running job with this deduplication key, on any instance."""
        doc = await self._read(
            lambda c: c.fetchval(
                "SELECT doc FROM jobs WHERE dedup_key = $1 AND status = ANY($2::text[]) ORDER BY seq LIMIT 1",
                dedup_key,
                list(ACTIVE),
            )
        )
        return Job.model_validate_json(doc) if doc is not None else None

    async def queue_place(self, job_id: str, aging_seconds: float) -> int | None:
        """1-based place in the shared queue, None when the job is not queued."""
        return await self._read(lambda c: c.fetchval(_PLACE, job_id, aging_seconds))

    async def queued_counts(self) -> dict[str, int]:
        rows = await self._read(
            lambda c: c.fetch("SELECT priority, count(*) FROM jobs WHERE status = 'queued' GROUP BY priority")
        )
        return {priority: count for priority, count in rows}

    async def heartbeat_instance(self, instance: InstanceBeat) -> None:
        await self._with_connection(
            lambda c: c.execute(
                _INSTANCE_BEAT,
                instance.id,
                instance.host,
                instance.pid,
                instance.started_at,
                instance.running,
                instance.max_running,
            )
        )

    async def remove_instance(self, instance_id: str) -> None:
        await self._with_connection(lambda c: c.execute("DELETE FROM instances WHERE id = $1", instance_id))

    async def instances(self) -> list[dict[str, Any]]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT id, host, pid, started_at, heartbeat_at, running, max_running"
                " FROM instances ORDER BY started_at"
            )
        )
        return [dict(r) for r in rows]

    # --- the outbox: webhook deliveries and Convex updates, sent by any instance ---
    async def record_deliveries(self, rows: Sequence[DeliveryRow]) -> None:
        """Outbox rows without a job change of their own (throttled progress events), in order
        with the writes of their job."""
        by_job: dict[str, list[DeliveryRow]] = {}
        for row in rows:
            by_job.setdefault(row.job_id, []).append(row)
        writes = []
        for job_id, own in by_job.items():
            (sql, args), *rest = effect_statements(Effects(deliveries=own))
            writes.append(self._write(sql, args, job_id, tuple(rest)))
        if writes:
            await asyncio.gather(*writes)

    async def import_deliveries(self, deliveries: Sequence[Sequence[Any]], attempts: Sequence[Sequence[Any]]) -> int:
        """Pending deliveries of an SQLite outbox (IMPORT_DELIVERIES' columns) with their attempts,
        in one transaction; how many were new here."""

        async def run(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                new = await conn.fetch(IMPORT_DELIVERIES, *map(list, zip(*deliveries, strict=True)))
                if attempts:
                    await conn.fetch(IMPORT_ATTEMPTS, *map(list, zip(*attempts, strict=True)))
            return len(new)

        return await self._with_connection(run)

    async def claim_deliveries(self, owner: str, now: float, limit: int, lease_seconds: float) -> list[Delivery]:
        rows = await self._with_connection(lambda c: c.fetch(_CLAIM_DELIVERIES, owner, now, lease_seconds, limit))
        return sorted((Delivery(*r) for r in rows), key=lambda d: d.created_at)

    async def next_delivery_at(self, now: float) -> float | None:
        return await self._read(lambda c: c.fetchval(_NEXT_DUE, now))

    async def record_attempt(
        self, owner: str, delivery: Delivery, attempt: Attempt, state: str, next_attempt_at: float | None
    ) -> bool:
        number = delivery.attempts + 1
        finished = None if state == PENDING else attempt.at
        due = next_attempt_at if next_attempt_at is not None else attempt.at

        async def record(conn: asyncpg.Connection) -> bool:
            async with conn.transaction():
                status = await conn.execute(
                    _RECORD_ATTEMPT,
                    number,
                    state,
                    due,
                    attempt.status,
                    attempt.error,
                    finished,
                    delivery.id,
                    owner,
                )
                if not status.endswith(" 1"):
                    return False  # the claim expired and another sender has it: its outcome counts
                await conn.execute(
                    _INSERT_ATTEMPT,
                    delivery.id,
                    number,
                    attempt.at,
                    attempt.status,
                    attempt.error,
                    attempt.duration_ms,
                )
                if state == STOPPED:
                    await conn.execute(_STOP_PAIR, attempt.at, _GONE, delivery.job_id, delivery.url)
                return True

        return await self._with_connection(record)

    async def release_claims(self, owner: str) -> None:
        async def release(conn: asyncpg.Connection) -> None:
            for table in ("webhook_deliveries", "convex_updates"):
                await conn.execute(
                    f"UPDATE {table} SET claimed_by = NULL, claim_expires = NULL WHERE claimed_by = $1", owner
                )

        await self._with_connection(release)

    async def delivery_backlog(self) -> int:
        return await self._read(lambda c: c.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'"))

    async def purge_deliveries(self, finished_before: float) -> int:
        async def purge(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await conn.execute(
                    "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries"
                    " WHERE state <> 'pending' AND finished_at < $1)",
                    finished_before,
                )
                await conn.execute(
                    "DELETE FROM convex_updates WHERE version = sent_version AND updated_at < $1", finished_before
                )
                status = await conn.execute(
                    "DELETE FROM webhook_deliveries WHERE state <> 'pending' AND finished_at < $1", finished_before
                )
            return int(status.rsplit(" ", 1)[-1])

        return await self._with_connection(purge)

    async def delivery_history(self, job_id: str) -> list[dict[str, Any]]:
        async def read(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            deliveries = await conn.fetch(
                "SELECT id, event, state, attempts, created_at, next_attempt_at, last_status, last_error, finished_at"
                " FROM webhook_deliveries WHERE job_id = $1 ORDER BY seq",
                job_id,
            )
            attempts = await conn.fetch(
                "SELECT a.delivery_id, a.attempt, a.at, a.status, a.error, a.duration_ms FROM webhook_attempts a"
                " JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.job_id = $1"
                " ORDER BY a.delivery_id, a.attempt",
                job_id,
            )
            return history(deliveries, attempts)

        return await self._read(read)

    async def claim_convex(self, owner: str, now: float, limit: int, lease_seconds: float) -> list[ConvexUpdate]:
        rows = await self._with_connection(lambda c: c.fetch(_CLAIM_CONVEX, owner, now, lease_seconds, limit))
        return [ConvexUpdate(*r) for r in rows]

    async def convex_done(
        self, owner: str, update: ConvexUpdate, sent: bool, next_attempt_at: float, error: str | None
    ) -> None:
        if sent:
            args: tuple[Any, ...] = (_CONVEX_SENT, update.version, error, update.job_id, owner)
        else:
            args = (_CONVEX_RETRY, next_attempt_at, error, update.job_id, owner)
        await self._with_connection(lambda c: c.execute(*args))

    async def convex_backlog(self) -> int:
        return await self._read(
            lambda c: c.fetchval("SELECT count(*) FROM convex_updates WHERE version > sent_version")
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection: nothing to undo.

    The store never changes a pooled connection's session (no SET, LISTEN or session advisory
    lock; the migrations use a connection of their own), and asyncpg still rolls back a
    transaction left open. The default reset runs a query on every release, a round trip between
    one batch's commit and the next batch.
    """


@dataclass(frozen=True, slots=True)
class _Write:
    sql: str
    args: Sequence[Any]
    key: str | None  # the row written (job id), for ordering across transactions in flight
    future: asyncio.Future[None]
    then: tuple[tuple[str, Sequence[Any]], ...] = ()  # committed with it or not at all (its outbox rows)


@dataclass(frozen=True, slots=True)
class _Batch:
    writes: list[_Write]
    timer: asyncio.TimerHandle
    deadline: float  # loop time at which the timer answers the callers


def _runs(writes: list[_Write]) -> list[tuple[str, list[Sequence[Any]]]]:
    """Consecutive writes of the same statement, as (statement, argument rows), in order."""
    runs: list[tuple[str, list[Sequence[Any]]]] = []

    def add(sql: str, args: Sequence[Any]) -> None:
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(args)
        else:
            runs.append((sql, [args]))

    # The outbox rows of the writes (`then`) go after all the writes' own statements when no
    # write's own statement is one of them (a burst of submissions with their Convex rows: two runs,
    # not two per submission). Job rows and outbox rows never read each other, so this keeps every
    # order that matters: of a job's writes, and of the outbox rows among themselves.
    mains = {w.sql for w in writes}
    hoist = not any(sql in mains for w in writes for sql, _ in w.then)
    for write in writes:
        add(write.sql, write.args)
        if not hoist:
            for sql, args in write.then:
                add(sql, args)
    if hoist:
        for write in writes:
            for sql, args in write.then:
                add(sql, args)
    return runs


async def _run(conn: asyncpg.Connection, sql: str, rows: list[Sequence[Any]]) -> None:
    if len(rows) == 1:
        await conn.execute(sql, *rows[0])
    else:
        await conn.executemany(sql, rows)  # pipelined, and atomic on its own


async def _commit_on(conn: asyncpg.Connection, writes: list[_Write]) -> None:
    """Commit the writes not yet answered, together; if a statement fails, each write alone.

    Writes committed or refused alone are settled here; the caller settles the rest together."""
    writes = [w for w in writes if not w.future.done()]
    try:
        await _execute(conn, writes)
        return
    except Exception as exc:
        if isinstance(exc, _NOT_THIS_WRITE) or conn.is_closed():
            raise
    for write in writes:  # one statement failed: each write alone, so the failure stays local
        try:
            await _execute(conn, [write])
        except Exception as alone:
            if isinstance(alone, _NOT_THIS_WRITE) or conn.is_closed():
                raise
            _settle(write.future, _own_failure(alone))  # this write's own failure, handed to its caller
        else:
            _settle(write.future, None)


async def _execute(conn: asyncpg.Connection, writes: list[_Write]) -> None:
    """All the writes in one transaction: one round trip when they are one run of one statement."""
    runs = _runs(writes)
    if len(runs) == 1:
        await _run(conn, *runs[0])
        return
    async with conn.transaction():
        for sql, rows in runs:
            await _run(conn, sql, rows)


def _own_failure(exc: BaseException) -> BaseException:
    """A write's failure as its caller should see it: the fence's refusal is LeaseLost, the queue
    bound's is QueueFull."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == LEASE_LOST_SQLSTATE:
        return LeaseLost(str(exc))
    if sqlstate == QUEUE_FULL_SQLSTATE:
        return QueueFull(str(exc))
    return exc


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)
