"""Durable outbox for webhook deliveries, in the job store's SQLite file.

A delivery is written here before anything is sent, so a crash, a deploy or a receiver that is
down for hours loses nothing: the next process picks up what is still pending. It has its own
aiosqlite connection (WAL, busy_timeout) so it never contends with the job store's connection for
more than a short write.

Deliveries of one job to one receiver go out in the order they were recorded: the oldest pending
one of a (job, url) pair is the only one of that pair that is due, so a receiver never sees
`job.completed` before `job.started`, and a receiver that is down does not hold up another
receiver of the same job (a deduplicated submission attaches its callback to a shared job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from klipstream.jobs.store.migrations import upgrade_sqlite

InFlight = Iterable[str]  # ids of deliveries being sent now
Pair = tuple[str, str]  # (job id, url): one receiver of one job

OPEN_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds between tries of opening a file another process holds
PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"  # gave up: a permanent refusal or 24 h of failures
STOPPED = "stopped"  # the receiver answered 410 Gone for this job
SUPERSEDED = "superseded"  # an unsent progress event replaced by a newer one


@dataclass(frozen=True)
class NewDelivery:
    id: str
    job_id: str
    url: str
    event: str
    body: str
    created_at: float


@dataclass(frozen=True)
class Delivery(NewDelivery):
    """A stored delivery that is due: what was queued, and how often it has been tried."""

    attempts: int


@dataclass(frozen=True)
class Attempt:
    at: float
    status: int | None  # HTTP status, None when no answer came
    error: str | None
    duration_ms: float


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        # One connection is shared by the delivery loop and the recorder: transactions must not
        # interleave on it, or SQLite refuses the second BEGIN.
        self._transaction_lock = asyncio.Lock()

    async def open(self) -> None:
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Processes opening one file together (instances sharing a data directory) can meet a
        # lock SQLite reports at once, without waiting out the busy timeout (a switch to WAL, a
        # last connection's checkpoint): a few tries, bounded.
        for delay in (*OPEN_RETRY_DELAYS, None):
            try:
                self._db = await self._connect()
                return
            except sqlite3.OperationalError as exc:
                if delay is None or "locked" not in str(exc):
                    raise
                await asyncio.sleep(delay)

    async def _connect(self) -> aiosqlite.Connection:
        await asyncio.to_thread(_upgrade, self.path)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            # The busy timeout first: switching to WAL takes a lock another process may hold.
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            await db.close()
            raise
        db.row_factory = aiosqlite.Row
        return db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("Outbox.open() was not called")
        return self._db

    async def add(self, deliveries: Iterable[NewDelivery], in_flight: InFlight = ()) -> int:
        """Record deliveries in one transaction; returns how many were recorded.

        Deliveries to a receiver that answered 410 for the job are dropped. A new progress or
        terminal event supersedes unsent progress events of the same job and receiver that are not
        being sent right now.
        """
        busy = list(in_flight)
        recorded = 0
        async with self._transaction():
            for d in deliveries:
                async with self.db.execute(
                    "SELECT 1 FROM webhook_deliveries WHERE job_id = ? AND url = ? AND state = ? LIMIT 1",
                    (d.job_id, d.url, STOPPED),
                ) as cur:
                    if await cur.fetchone():
                        continue
                if d.event == "job.progress" or d.event in ("job.completed", "job.failed", "job.cancelled"):
                    marks = ",".join("?" * len(busy))
                    await self.db.execute(
                        f"UPDATE webhook_deliveries SET state = ?, finished_at = ? WHERE job_id = ? AND url = ?"
                        f" AND state = ? AND event = 'job.progress' AND id NOT IN ({marks})",
                        (SUPERSEDED, d.created_at, d.job_id, d.url, PENDING, *busy),
                    )
                await self.db.execute(
                    "INSERT OR IGNORE INTO webhook_deliveries"
                    " (id, job_id, url, event, body, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (d.id, d.job_id, d.url, d.event, d.body, d.created_at, d.created_at),
                )
                recorded += 1
        return recorded

    _HEADS = (
        "FROM webhook_deliveries d WHERE d.state = 'pending' AND d.seq = (SELECT MIN(p.seq) FROM webhook_deliveries p"
        " WHERE p.job_id = d.job_id AND p.url = d.url AND p.state = 'pending')"
    )

    async def due(self, now: float, limit: int, exclude: Iterable[Pair] = ()) -> list[Delivery]:
        """The oldest pending delivery of each (job, receiver) whose next attempt time has come,
        except for the pairs in `exclude` (being sent now)."""
        skip = set(exclude)
        async with self.db.execute(
            f"SELECT d.id, d.job_id, d.url, d.event, d.body, d.created_at, d.attempts {self._HEADS} "
            "AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at LIMIT ?",
            (now, limit + len(skip)),
        ) as cur:
            rows = await cur.fetchall()
        due = [Delivery(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows if (r[1], r[2]) not in skip]
        return due[:limit]

    async def next_due_at(self, exclude: Iterable[Pair] = ()) -> float | None:
        skip = set(exclude)
        async with self.db.execute(
            f"SELECT d.job_id, d.url, d.next_attempt_at {self._HEADS} ORDER BY d.next_attempt_at LIMIT ?",
            (len(skip) + 1,),
        ) as cur:
            rows = await cur.fetchall()
        return next((r[2] for r in rows if (r[0], r[1]) not in skip), None)

    async def record(self, delivery: Delivery, attempt: Attempt, state: str, next_attempt_at: float | None) -> None:
        """Store an attempt and the delivery's new state in one transaction."""
        number = delivery.attempts + 1
        async with self._transaction():
            await self.db.execute(
                "INSERT OR REPLACE INTO webhook_attempts (delivery_id, attempt, at, status, error, duration_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (delivery.id, number, attempt.at, attempt.status, attempt.error, attempt.duration_ms),
            )
            finished = None if state == PENDING else attempt.at
            await self.db.execute(
                "UPDATE webhook_deliveries SET attempts = ?, state = ?, next_attempt_at = ?, last_status = ?,"
                " last_error = ?, finished_at = ? WHERE id = ?",
                (
                    number,
                    state,
                    next_attempt_at if next_attempt_at is not None else attempt.at,
                    attempt.status,
                    attempt.error,
                    finished,
                    delivery.id,
                ),
            )
            if state == STOPPED:
                await self.db.execute(
                    "UPDATE webhook_deliveries SET state = ?, finished_at = ?, last_error = ? "
                    "WHERE job_id = ? AND url = ? AND state = ?",
                    (
                        STOPPED,
                        attempt.at,
                        "receiver answered 410 Gone for this job",
                        delivery.job_id,
                        delivery.url,
                        PENDING,
                    ),
                )

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._transaction_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    async def purge(self, finished_before: float) -> int:
        """Delete deliveries that ended before the cutoff, with their attempts; pending ones stay."""
        async with self._transaction():
            await self.db.execute(
                "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries"
                " WHERE state <> ? AND finished_at IS NOT NULL AND finished_at < ?)",
                (PENDING, finished_before),
            )
            cursor = await self.db.execute(
                "DELETE FROM webhook_deliveries WHERE state <> ? AND finished_at IS NOT NULL AND finished_at < ?",
                (PENDING, finished_before),
            )
            return cursor.rowcount

    async def backlog(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        """Every delivery of a job with its attempts, oldest first, for the job JSON."""
        async with self.db.execute(
            "SELECT id, event, state, attempts, created_at, next_attempt_at, last_status, last_error, finished_at"
            " FROM webhook_deliveries WHERE job_id = ? ORDER BY seq",
            (job_id,),
        ) as cur:
            deliveries = await cur.fetchall()
        async with self.db.execute(
            "SELECT a.delivery_id, a.attempt, a.at, a.status, a.error, a.duration_ms FROM webhook_attempts a"
            " JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.job_id = ? ORDER BY a.delivery_id, a.attempt",
            (job_id,),
        ) as cur:
            attempts = await cur.fetchall()
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


def _upgrade(path: Path) -> None:
    """The outbox's tables are part of the store's versioned schema (migrations/sqlite/)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        upgrade_sqlite(conn)
    finally:
        conn.close()


def dumps(value: Any) -> str:
    """Compact JSON: the exact bytes that are signed are the bytes that are sent."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
