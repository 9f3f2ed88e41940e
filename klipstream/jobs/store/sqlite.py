"""The embedded job store: SQLite.

`SQLiteStore` keeps one connection in one
writer thread and commits whatever requests arrived together in one transaction (group commit):
a burst of submissions costs one commit, and the event loop never waits on the disk. WAL mode
with synchronous=NORMAL survives `kill -9` of the process (every commit is in the WAL file before
the caller's future resolves); only a power loss could drop the last commits.

Requests made during one turn of the event loop travel to the writer as one batch with one
timeout timer, so a burst of submissions wakes the writer thread once, not once per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from klipstream.jobs.store import (
    ACTIVE,
    CONVEX,
    EVENTS_KEPT,
    NO_EFFECTS,
    PENDING,
    RETRY_AFTER_SECONDS,
    STOPPED,
    SUPERSEDED,
    SUPERSEDING,
    Attempt,
    ConvexUpdate,
    Delivery,
    DeliveryRow,
    Effects,
    EventRow,
    IdempotencyRecord,
    JobRow,
    StoreStalled,
    StoreTimeout,
    history,
    trim_below,
)
from klipstream.jobs.store.migrations import upgrade_sqlite
from klipstream.models import Job

T = TypeVar("T")
log = logging.getLogger(__name__)
CHECKPOINT_SECONDS = 2.0
# Every call is answered within this: StoreTimeout when the writer had not started it (it never
# will), StoreStalled when it had (its real outcome still arrives, through StoreStalled.outcome).
CALL_TIMEOUT_SECONDS = 30.0
MAX_BATCH = 512  # requests per transaction


# The schema is versioned: klipstream/jobs/store/migrations/sqlite/*.sql, applied by open().


class SQLiteStore:
    """JobStore on SQLite, with all statements run by one writer thread."""

    shared = False  # one instance: its in-memory queue decides what runs

    def __init__(self, path: Path, *, events_kept: int = EVENTS_KEPT) -> None:
        self.path = path
        self.events_kept = events_kept
        self._requests: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._pending: list[Request] = []  # made during this turn of the event loop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        # Guards the started/expired marks of batches: a batch either starts (and its callers get
        # its real outcome) or expires (and is never run), never both.
        self._marks = threading.Lock()

    # --- lifecycle ---
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="sqlite-writer", daemon=True)
        self._thread.start()
        await asyncio.wait_for(ready, 30)

    async def close(self) -> None:
        if self._thread is None:
            return
        if self._pending:  # made in this loop turn: they go before the stop mark
            self._flush()
        self._requests.put(None)
        await asyncio.to_thread(self._thread.join, 10)
        self._thread = None

    def _serve(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")  # first: the switch to WAL may wait for a lock
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints fsync the database; done inline they stall every commit queued behind
            # them (the submission p99). A separate thread checkpoints passively instead.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            upgrade_sqlite(conn)
            # One file, one instance: a claim left by a killed process of it is stale.
            with conn:
                conn.execute("UPDATE webhook_deliveries SET claimed_by = NULL, claim_expires = NULL")
                conn.execute("UPDATE convex_updates SET claimed_by = NULL, claim_expires = NULL")
        except Exception as exc:  # handed to the coroutine awaiting open()
            self._loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        self._loop.call_soon_threadsafe(_settle, ready, None, None)
        checkpointer = threading.Thread(target=self._checkpoint, name="sqlite-checkpoint", daemon=True)
        checkpointer.start()
        while True:
            first = self._requests.get()
            if first is None:
                break
            batches = [first]
            size = len(first.requests)
            while size < MAX_BATCH:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._requests.put(None)
                    break
                batches.append(more)
                size += len(more.requests)
            self._run_batch(conn, batches)
        self._stopping.set()
        checkpointer.join(5)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database every few seconds without blocking the writer."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=1000")
        try:
            while not self._stopping.wait(CHECKPOINT_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    log.warning("WAL checkpoint failed; will retry", exc_info=True)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batches: list[_Batch]) -> None:
        """Run the requests in one transaction (group commit). If any request fails, the batch is
        rolled back and each request runs again in a transaction of its own, so one failure stays
        local. Batches whose callers already got StoreTimeout are dropped unrun."""
        assert self._loop is not None
        with self._marks:
            batches = [batch for batch in batches if not batch.expired]
            for batch in batches:
                batch.started = True
        if not batches:
            return
        requests = [request for batch in batches for request in batch.requests]
        try:
            outcomes = self._transaction(conn, requests, isolate=False)
        except _BatchFailed:
            outcomes = [o for item in requests for o in self._transaction(conn, [item], isolate=True)]
        # One wake-up of the event loop for the whole batch, not one per request.
        self._loop.call_soon_threadsafe(_settle_all, outcomes, batches)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, batch: list[Request], *, isolate: bool) -> list[Outcome]:
        outcomes: list[Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, future in batch:
                try:
                    outcomes.append((future, fn(conn), None))
                except Exception as exc:  # any request's failure: replay the batch one by one
                    raise _BatchFailed(exc) from exc
            conn.execute("COMMIT")
        except _BatchFailed as failed:
            conn.execute("ROLLBACK")
            if not isolate:
                raise
            outcomes = [(future, None, failed.args[0]) for _, future in batch]
        except Exception as exc:  # BEGIN or COMMIT itself failed
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(future, None, exc) for _, future in batch]
        return outcomes

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn` for the writer thread; the future settles after its transaction commits."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._pending.append((fn, future))
        if len(self._pending) == 1:
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Hand this loop turn's requests to the writer, with one timeout for all of them."""
        assert self._loop is not None
        if not self._pending:  # close() flushed them already
            return
        requests, self._pending = self._pending, []
        batch = _Batch(requests)
        batch.timer = self._loop.call_later(CALL_TIMEOUT_SECONDS, self._expire, batch)
        self._requests.put(batch)

    def _expire(self, batch: _Batch) -> None:
        """The batch is not answered in time. Not started: it is dropped and never runs. Started:
        the callers are told the outcome is pending, and each gets a future for the real one."""
        assert self._loop is not None
        with self._marks:
            started = batch.started
            batch.expired = not started
        if not started:
            error = StoreTimeout(
                f"the store did not take the request within {CALL_TIMEOUT_SECONDS:.0f} s",
                retry_after=RETRY_AFTER_SECONDS,
            )
            for _, future in batch.requests:
                _settle(future, None, error)
            return
        batch.late = []
        for _, future in batch.requests:
            late: asyncio.Future[Any] = self._loop.create_future()
            late.add_done_callback(_consume)
            batch.late.append(late)
            message = f"the store has not finished the request within {CALL_TIMEOUT_SECONDS:.0f} s"
            _settle(future, None, StoreStalled(message, late))

    # --- jobs ---
    async def ping(self) -> bool:
        try:
            return await self._call(lambda c: c.execute("SELECT 1").fetchone()[0] == 1)
        except Exception:  # readiness reports an unreachable store as not ready
            return False

    async def insert_job(
        self, row: JobRow, idempotency: IdempotencyRecord | None = None, effects: Effects = NO_EFFECTS
    ) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO jobs"
                " (job_id, video_id, status, priority, created_at, updated_at, finished_at, doc, dedup_key)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            if idempotency is not None:
                conn.execute(
                    "INSERT INTO idempotency (key, body_hash, job_id, response, status, created_at, owner)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        idempotency.key,
                        idempotency.body_hash,
                        idempotency.job_id,
                        idempotency.response,
                        idempotency.status,
                        time.time(),
                        idempotency.owner,
                    ),
                )
            self._write_effects(conn, effects)

        await self._call(insert)

    async def save_job(self, job: Job, effects: Effects = NO_EFFECTS) -> None:
        """Write the job, and its effects in the same transaction (none if the job is gone)."""
        job_id, *rest = JobRow.of(job)
        values = (*rest, job_id)

        def save(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE jobs SET video_id=?, status=?, priority=?, created_at=?, updated_at=?, finished_at=?, doc=?,"
                " dedup_key=? WHERE job_id=?",
                values,
            ).rowcount
            if updated:
                self._write_effects(conn, effects)

        await self._call(save)

    def _write_effects(self, conn: sqlite3.Connection, effects: Effects) -> None:
        """The job change's events (the SSE ids are their sequences); the job's oldest beyond
        `events_kept` go when the sequence crosses a multiple of TRIM_EVERY. An id already stored
        keeps its event (a write that was reported failed may have committed after all)."""
        _write_deliveries(conn, effects.deliveries)
        events = effects.events
        if not events:
            return
        now = time.time()
        conn.executemany(
            "INSERT OR IGNORE INTO job_events (job_id, seq, type, data, created_at) VALUES (?, ?, ?, ?, ?)",
            [(*event, now) for event in events],
        )
        below = trim_below(events, self.events_kept)
        if below:
            conn.execute("DELETE FROM job_events WHERE job_id=? AND seq<=?", (events[0].job_id, below))

    # --- the event streams' table ---
    async def job_events(self, job_id: str, after: int) -> list[EventRow]:
        """The job's stored events after `after`, in order."""
        rows = await self._call(
            lambda c: c.execute(
                "SELECT job_id, seq, type, data FROM job_events WHERE job_id=? AND seq>? ORDER BY seq", (job_id, after)
            ).fetchall()
        )
        return [EventRow(*row) for row in rows]

    async def events_after(self, cursors: dict[str, int]) -> list[EventRow]:
        """The stored events of each job after its cursor, by job and in order (one call)."""
        items = list(cursors.items())

        def read(conn: sqlite3.Connection) -> list[EventRow]:
            out: list[EventRow] = []
            for job_id, after in items:
                out += [
                    EventRow(*row)
                    for row in conn.execute(
                        "SELECT job_id, seq, type, data FROM job_events WHERE job_id=? AND seq>? ORDER BY seq",
                        (job_id, after),
                    )
                ]
            return out

        return await self._call(read) if items else []

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._call(lambda c: c.execute("SELECT doc FROM jobs WHERE job_id=?", (job_id,)).fetchone())
        return Job.model_validate_json(row[0]) if row else None

    async def list_jobs(self, status: str | None, limit: int, before_seq: int | None) -> list[tuple[int, Job]]:
        sql = "SELECT seq, doc FROM jobs WHERE 1=1"
        params: list[Any] = []
        if status:
            sql += " AND status=?"
            params.append(status)
        if before_seq is not None:
            sql += " AND seq<?"
            params.append(before_seq)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        rows = await self._call(lambda c: c.execute(sql, params).fetchall())
        return [(seq, Job.model_validate_json(doc)) for seq, doc in rows]

    async def active_jobs(self) -> list[Job]:
        rows = await self._call(
            lambda c: c.execute("SELECT doc FROM jobs WHERE status IN (?, ?) ORDER BY seq", ACTIVE).fetchall()
        )
        return [Job.model_validate_json(doc) for (doc,) in rows]

    # --- idempotency ---
    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        row = await self._call(
            lambda c: c.execute(
                "SELECT key, body_hash, job_id, response, status, owner FROM idempotency WHERE key=?", (key,)
            ).fetchone()
        )
        return IdempotencyRecord(*row) if row else None

    # --- statistics ---
    async def record_stage_run(self, stage: str, seconds: float, media_seconds: float | None) -> None:
        row = (stage, seconds, media_seconds, time.time())
        await self._call(lambda c: c.execute("INSERT INTO stage_runs VALUES (?, ?, ?, ?)", row))

    async def stage_runs(self, since: float) -> list[tuple[str, float, float | None]]:
        return await self._call(
            lambda c: c.execute(
                "SELECT stage, seconds, media_seconds FROM stage_runs WHERE finished_at>=? ORDER BY finished_at",
                (since,),
            ).fetchall()
        )

    async def terminal_counts(self, since: float) -> dict[str, int]:
        rows = await self._call(
            lambda c: c.execute(
                "SELECT status, COUNT(*) FROM jobs WHERE finished_at>=? GROUP BY status", (since,)
            ).fetchall()
        )
        return {status: count for status, count in rows}

    # --- retention ---
    async def job_states(self, job_ids: list[str]) -> dict[str, tuple[str, float | None]]:
        """(status, finished_at) of each of these jobs that exists."""
        if not job_ids:
            return {}

        def read(conn: sqlite3.Connection) -> dict[str, tuple[str, float | None]]:
            out: dict[str, tuple[str, float | None]] = {}
            for start in range(0, len(job_ids), 500):
                part = job_ids[start : start + 500]
                marks = ",".join("?" * len(part))
                sql = f"SELECT job_id, status, finished_at FROM jobs WHERE job_id IN ({marks})"
                for job_id, status, finished_at in conn.execute(sql, part):
                    out[job_id] = (status, finished_at)
            return out

        return await self._call(read)

    async def delete_finished_jobs(self, finished_before: float, limit: int) -> list[str]:
        """Delete up to `limit` finished jobs that ended before the cutoff; returns their ids."""

        def delete(conn: sqlite3.Connection) -> list[str]:
            ids = [
                job_id
                for (job_id,) in conn.execute(
                    "SELECT job_id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?"
                    " AND status NOT IN (?, ?) ORDER BY finished_at LIMIT ?",
                    (finished_before, *ACTIVE, limit),
                )
            ]
            conn.executemany("DELETE FROM jobs WHERE job_id = ?", [(job_id,) for job_id in ids])
            conn.executemany("DELETE FROM job_events WHERE job_id = ?", [(job_id,) for job_id in ids])
            return ids

        return await self._call(delete)

    async def delete_idempotency(self, created_before: float) -> int:
        return await self._call(
            lambda c: c.execute("DELETE FROM idempotency WHERE created_at < ?", (created_before,)).rowcount
        )

    async def delete_stage_runs(self, finished_before: float) -> int:
        return await self._call(
            lambda c: c.execute("DELETE FROM stage_runs WHERE finished_at < ?", (finished_before,)).rowcount
        )

    # --- the outbox: webhook deliveries and Convex updates (the same writer as the jobs) ---
    async def record_deliveries(self, rows: Sequence[DeliveryRow]) -> None:
        """Outbox rows without a job change of their own (throttled progress events)."""
        rows = list(rows)
        if rows:
            await self._call(lambda c: _write_deliveries(c, rows))

    async def claim_deliveries(self, owner: str, now: float, limit: int, lease_seconds: float) -> list[Delivery]:
        """The oldest pending delivery of each (job, receiver) that is due and not claimed, claimed
        for `owner` until now + lease_seconds."""

        def claim(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(_DUE_HEADS, (now, now, limit)).fetchall()
            conn.executemany(
                "UPDATE webhook_deliveries SET claimed_by = ?, claim_expires = ? WHERE seq = ?",
                [(owner, now + lease_seconds, r[0]) for r in rows],
            )
            return [Delivery(*r[1:]) for r in rows]

        return await self._call(claim)

    async def next_delivery_at(self, now: float) -> float | None:
        """When the next delivery not claimed now falls due (None: nothing pending)."""
        row = await self._call(lambda c: c.execute(_NEXT_DUE, (now,)).fetchone())
        return row[0] if row else None

    async def record_attempt(
        self, owner: str, delivery: Delivery, attempt: Attempt, state: str, next_attempt_at: float | None
    ) -> bool:
        """Store an attempt and the delivery's new state, and end the claim; False (nothing stored)
        when the claim is no longer `owner`'s (it expired and another sender has it)."""
        number = delivery.attempts + 1

        def record(conn: sqlite3.Connection) -> bool:
            finished = None if state == PENDING else attempt.at
            cursor = conn.execute(
                "UPDATE webhook_deliveries SET attempts = ?, state = ?, next_attempt_at = ?, last_status = ?,"
                " last_error = ?, finished_at = ?, claimed_by = NULL, claim_expires = NULL"
                " WHERE id = ? AND claimed_by = ?",
                (
                    number,
                    state,
                    next_attempt_at if next_attempt_at is not None else attempt.at,
                    attempt.status,
                    attempt.error,
                    finished,
                    delivery.id,
                    owner,
                ),
            )
            if cursor.rowcount == 0:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO webhook_attempts (delivery_id, attempt, at, status, error, duration_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (delivery.id, number, attempt.at, attempt.status, attempt.error, attempt.duration_ms),
            )
            if state == STOPPED:
                conn.execute(_STOP_PAIR, (STOPPED, attempt.at, _GONE, delivery.job_id, delivery.url, PENDING))
            return True

        return await self._call(record)

    async def release_claims(self, owner: str) -> None:
        """`owner` stops sending (shutdown): what it claimed and did not record is due again."""

        def release(conn: sqlite3.Connection) -> None:
            for table in ("webhook_deliveries", "convex_updates"):
                conn.execute(
                    f"UPDATE {table} SET claimed_by = NULL, claim_expires = NULL WHERE claimed_by = ?", (owner,)
                )

        await self._call(release)

    async def delivery_backlog(self) -> int:
        return await self._call(
            lambda c: c.execute("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'").fetchone()[0]
        )

    async def purge_deliveries(self, finished_before: float) -> int:
        """Delete deliveries that ended before the cutoff, with their attempts (pending ones stay),
        and the Convex states sent before it."""

        def purge(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries"
                " WHERE state <> 'pending' AND finished_at IS NOT NULL AND finished_at < ?)",
                (finished_before,),
            )
            conn.execute(
                "DELETE FROM convex_updates WHERE version = sent_version AND updated_at < ?", (finished_before,)
            )
            return conn.execute(
                "DELETE FROM webhook_deliveries WHERE state <> 'pending' AND finished_at IS NOT NULL"
                " AND finished_at < ?",
                (finished_before,),
            ).rowcount

        return await self._call(purge)

    async def delivery_history(self, job_id: str) -> list[dict[str, Any]]:
        """Every delivery of a job with its attempts, oldest first, for the job JSON."""

        def read(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            deliveries = conn.execute(_HISTORY, (job_id,)).fetchall()
            attempts = conn.execute(_HISTORY_ATTEMPTS, (job_id,)).fetchall()
            return deliveries, attempts

        deliveries, attempts = await self._call(read)
        return history(deliveries, attempts)

    async def claim_convex(self, owner: str, now: float, limit: int, lease_seconds: float) -> list[ConvexUpdate]:
        def claim(conn: sqlite3.Connection) -> list[ConvexUpdate]:
            rows = conn.execute(
                "SELECT job_id, path, args, version, attempts FROM convex_updates WHERE version > sent_version"
                " AND next_attempt_at <= ? AND (claim_expires IS NULL OR claim_expires < ?)"
                " ORDER BY next_attempt_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE convex_updates SET claimed_by = ?, claim_expires = ? WHERE job_id = ?",
                [(owner, now + lease_seconds, r[0]) for r in rows],
            )
            return [ConvexUpdate(*r) for r in rows]

        return await self._call(claim)

    async def convex_done(
        self, owner: str, update: ConvexUpdate, sent: bool, next_attempt_at: float, error: str | None
    ) -> None:
        """`sent`: that version is done with (delivered, or refused for good); else it is tried
        again at next_attempt_at (a newer state written meanwhile goes then instead)."""
        if sent:
            sql, args = _CONVEX_SENT, (update.version, error, update.job_id, owner)
        else:
            sql, args = _CONVEX_RETRY, (next_attempt_at, error, update.job_id, owner)
        await self._call(lambda c: c.execute(sql, args))

    async def convex_backlog(self) -> int:
        return await self._call(
            lambda c: c.execute("SELECT COUNT(*) FROM convex_updates WHERE version > sent_version").fetchone()[0]
        )


_GONE = "receiver answered 410 Gone for this job"
_STOP_PAIR = (
    "UPDATE webhook_deliveries SET state = ?, finished_at = ?, last_error = ?, claimed_by = NULL, claim_expires = NULL"
    " WHERE job_id = ? AND url = ? AND state = ?"
)
_HEAD = (
    "d.state = 'pending' AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.job_id = d.job_id"
    " AND e.url = d.url AND e.state = 'pending' AND e.seq < d.seq)"
)
_DUE_HEADS = (
    "SELECT d.seq, d.id, d.job_id, d.url, d.event, d.body, d.created_at, d.attempts FROM webhook_deliveries d"
    f" WHERE {_HEAD} AND d.next_attempt_at <= ? AND (d.claim_expires IS NULL OR d.claim_expires < ?)"
    " ORDER BY d.next_attempt_at LIMIT ?"
)
_NEXT_DUE = (
    "SELECT MIN(CASE WHEN d.claim_expires > d.next_attempt_at THEN d.claim_expires ELSE d.next_attempt_at END)"
    f" FROM webhook_deliveries d WHERE {_HEAD} AND (d.claim_expires IS NULL OR d.claim_expires < ?)"
)
_HISTORY = (
    "SELECT id, event, state, attempts, created_at, next_attempt_at, last_status, last_error, finished_at"
    " FROM webhook_deliveries WHERE job_id = ? ORDER BY seq"
)
_HISTORY_ATTEMPTS = (
    "SELECT a.delivery_id, a.attempt, a.at, a.status, a.error, a.duration_ms FROM webhook_attempts a"
    " JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.job_id = ? ORDER BY a.delivery_id, a.attempt"
)
_CONVEX_UPSERT = (
    "INSERT INTO convex_updates (job_id, path, args, version, updated_at, next_attempt_at) VALUES (?, ?, ?, 1, ?, ?)"
    " ON CONFLICT (job_id) DO UPDATE SET path = excluded.path, args = excluded.args,"
    " version = convex_updates.version + 1, updated_at = excluded.updated_at,"
    # a sender backing off from an outage keeps its pace; otherwise the new state is due at once
    " next_attempt_at = CASE WHEN convex_updates.attempts = 0 THEN excluded.next_attempt_at"
    " ELSE convex_updates.next_attempt_at END"
)
_CONVEX_SENT = (
    "UPDATE convex_updates SET sent_version = MAX(sent_version, ?), attempts = 0, last_error = ?,"
    " claimed_by = NULL, claim_expires = NULL WHERE job_id = ? AND claimed_by = ?"
)
_CONVEX_RETRY = (
    "UPDATE convex_updates SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,"
    " claimed_by = NULL, claim_expires = NULL WHERE job_id = ? AND claimed_by = ?"
)


def _write_deliveries(conn: sqlite3.Connection, rows: Sequence[DeliveryRow]) -> None:
    """Record outbox rows (inside the caller's transaction). A webhook to a receiver that answered
    410 for the job is dropped; a progress or terminal event supersedes the unsent, unclaimed
    progress events of its (job, receiver). A Convex row replaces the job's previous state."""
    for row in rows:
        if row.target == CONVEX:
            conn.execute(_CONVEX_UPSERT, (row.job_id, row.event, row.body, row.created_at, row.created_at))
            continue
        stopped = conn.execute(
            "SELECT 1 FROM webhook_deliveries WHERE job_id = ? AND url = ? AND state = ? LIMIT 1",
            (row.job_id, row.target, STOPPED),
        ).fetchone()
        if stopped:
            continue
        if row.event in SUPERSEDING:
            conn.execute(
                "UPDATE webhook_deliveries SET state = ?, finished_at = ? WHERE job_id = ? AND url = ?"
                " AND state = 'pending' AND event = 'job.progress' AND (claim_expires IS NULL OR claim_expires < ?)",
                (SUPERSEDED, row.created_at, row.job_id, row.target, row.created_at),
            )
        conn.execute(
            "INSERT OR IGNORE INTO webhook_deliveries (id, job_id, url, event, body, created_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.job_id, row.target, row.event, row.body, row.created_at, row.created_at),
        )


Request = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


@dataclass(slots=True)
class _Batch:
    requests: list[Request]
    timer: asyncio.TimerHandle | None = None
    started: bool = False  # the writer took it (under SQLiteStore._marks)
    expired: bool = False  # its callers got StoreTimeout; the writer must skip it
    late: list[asyncio.Future[Any]] | None = None  # real outcomes, for callers that got StoreStalled


class _BatchFailed(Exception):
    """One request of a group commit failed; the batch is retried request by request."""


def _settle_all(outcomes: list[Outcome], batches: list[_Batch]) -> None:
    late: dict[int, asyncio.Future[Any]] = {}
    for batch in batches:
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.late is not None:
            late.update((id(future), outcome) for (_, future), outcome in zip(batch.requests, batch.late, strict=True))
    for future, result, error in outcomes:
        _settle(late.get(id(future), future), result, error)


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a late outcome's exception as retrieved: nobody may be following it."""
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
