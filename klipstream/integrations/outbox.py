"""The outbox's upgrade path, and the JSON encoding of what it sends.

The outbox now lives in the job store (klipstream/jobs/store, migration 6): webhook deliveries and
Convex updates are written in the same transaction as the job change that causes them, and sent by
klipstream.integrations.webhooks and .convex. Before, webhook deliveries were written to the data
directory's SQLite file by a connection of their own, after the change. With SQLite as the job
store that file *is* the store, so its pending deliveries are simply sent. With PostgreSQL, an
instance whose data directory holds such a file (the move from one SQLite instance to several)
imports the file's pending deliveries at start, once: they are marked `moved` in the file, and the
import is keyed by delivery id, so a repeated or interrupted import sends nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from klipstream.jobs.store.postgres import PostgresStore

log = logging.getLogger(__name__)

MOVED = "moved"  # a delivery of the local file imported into the shared store (a state of the file only)
# What an old file's pending webhook deliveries are read as, in the order of the import's arrays.
PENDING_DELIVERIES = (
    "SELECT id, job_id, url, event, body, created_at, next_attempt_at, attempts, last_status, last_error"
    " FROM webhook_deliveries WHERE state = 'pending' ORDER BY seq"
)
PENDING_ATTEMPTS = (
    "SELECT a.delivery_id, a.attempt, a.at, a.status, a.error, a.duration_ms FROM webhook_attempts a"
    " JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.state = 'pending'"
)


def dumps(value: Any) -> str:
    """Compact JSON: the exact bytes that are signed are the bytes that are sent."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def import_local_outbox(path: Path, store: PostgresStore) -> int:
    """Move the pending webhook deliveries of an SQLite file into the shared store; how many
    were new there. Nothing happens when the file or its outbox table does not exist."""
    read = await asyncio.to_thread(_read_pending, path)
    if read is None:
        return 0
    deliveries, attempts = read
    if not deliveries:
        return 0
    imported = await store.import_deliveries(deliveries, attempts)
    await asyncio.to_thread(_mark_moved, path, [row[0] for row in deliveries])
    log.info("imported %d pending webhook deliveries from %s into the shared job store", imported, path)
    return imported


def _read_pending(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] | None:
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'webhook_deliveries'")
        if found.fetchone() is None:
            return None
        return conn.execute(PENDING_DELIVERIES).fetchall(), conn.execute(PENDING_ATTEMPTS).fetchall()
    finally:
        conn.close()


def _mark_moved(path: Path, ids: list[str]) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE webhook_deliveries SET state = ?, finished_at = ?, last_error = ?"
            " WHERE id = ? AND state = 'pending'",
            [(MOVED, time.time(), "moved to the shared job store (PostgreSQL)", i) for i in ids],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
