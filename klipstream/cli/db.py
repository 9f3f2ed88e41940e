"""`klipstream db upgrade`: apply the schema migrations by hand; `klipstream db copy`: move an
SQLite job store, with its unsent webhook deliveries and Convex updates, into PostgreSQL.

The service applies them itself at start (under PostgreSQL's advisory lock, so instances starting
together do not race); running them beforehand, e.g. as a deploy step, keeps a long migration out
of the instances' start-up time. The database is the one `serve` would use: KLIPSTREAM_DATABASE_URL,
else the SQLite file in KLIPSTREAM_DATA_DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from klipstream.cli.common import EXIT_UNREACHABLE, EXIT_USAGE, CliError
from klipstream.config import Settings
from klipstream.integrations.outbox import PENDING_ATTEMPTS, PENDING_DELIVERIES
from klipstream.jobs.store import ACTIVE, JobRow
from klipstream.jobs.store.migrations import Upgrade, upgrade_postgres, upgrade_sqlite
from klipstream.jobs.store.postgres import IMPORT_ATTEMPTS, IMPORT_CONVEX, IMPORT_DELIVERIES, UNAVAILABLE, redacted
from klipstream.models import Job, JobStatus, StageStatus


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if settings.database_url:
        where = redacted(settings.database_url)
        try:
            result = asyncio.run(_upgrade_postgres(settings))
        except UNAVAILABLE as exc:
            raise CliError(f"cannot reach {where}: {type(exc).__name__}: {exc}", EXIT_UNREACHABLE) from None
    else:
        where = str(settings.database_path)
        try:
            result = _upgrade_sqlite(settings)
        except sqlite3.Error as exc:
            raise CliError(f"cannot upgrade {where}: {exc}", EXIT_UNREACHABLE) from None
    done = f"applied {', '.join(map(str, result.applied))}" if result.applied else "up to date"
    print(f"{where}: schema version {result.after} ({done})")
    return 0


async def _upgrade_postgres(settings: Settings) -> Upgrade:
    conn = await asyncpg.connect(settings.database_url, timeout=settings.database_timeout_seconds)
    try:
        return await upgrade_postgres(conn)
    finally:
        await conn.close()


def _upgrade_sqlite(settings: Settings) -> Upgrade:
    settings.database_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(settings.database_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        return upgrade_sqlite(conn)
    finally:
        conn.close()


# --- db copy ---
COPY_BATCH = 500  # rows read from SQLite and written to PostgreSQL per statement: memory stays flat
CONNECT_TIMEOUT_SECONDS = 10.0
# The job columns copied, in the order of the SQLite SELECT and of the PostgreSQL arrays. The lease
# columns are not: a lease names an instance of the cluster, and the SQLite instance is not one.
_JOB_COLUMNS = (
    "job_id, video_id, status, priority, created_at, updated_at, finished_at, doc, dedup_key,"
    " COALESCE(enqueued_at, created_at), lease_attempts"
)
# One batch of jobs, in source order (so the identity column keeps the list order). An active job
# whose dedup key an active job of the target already holds is copied unshared (key ''), as
# PostgreSQL's migration 4 does with duplicates: its unique index allows one active job per key.
_COPY_JOBS = """
INSERT INTO jobs
    (job_id, video_id, status, priority, created_at, updated_at, finished_at, doc, dedup_key, enqueued_at,
     lease_attempts)
SELECT r.job_id, r.video_id, r.status, r.priority, r.created_at, r.updated_at, r.finished_at, r.doc,
    CASE WHEN r.dedup_key <> '' AND r.status IN ('queued', 'running') AND EXISTS (
        SELECT 1 FROM jobs t
        WHERE t.dedup_key = r.dedup_key AND t.status IN ('queued', 'running') AND t.job_id <> r.job_id
    ) THEN '' ELSE r.dedup_key END,
    r.enqueued_at, r.lease_attempts
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[], $7::float8[],
    $8::text[], $9::text[], $10::float8[], $11::int[]) WITH ORDINALITY
    AS r (job_id, video_id, status, priority, created_at, updated_at, finished_at, doc, dedup_key, enqueued_at,
          lease_attempts, n)
ORDER BY r.n
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
"""
_COPY_IDEMPOTENCY = """
INSERT INTO idempotency (key, body_hash, job_id, response, status, created_at, owner)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::float8[], $7::text[])
ON CONFLICT (key) DO NOTHING
RETURNING key
"""
# stage_runs has no key: a row is there already when one with the same values is.
_COPY_STAGE_RUNS = """
INSERT INTO stage_runs (stage, seconds, media_seconds, finished_at)
SELECT r.stage, r.seconds, r.media_seconds, r.finished_at
FROM unnest($1::text[], $2::float8[], $3::float8[], $4::float8[]) AS r (stage, seconds, media_seconds, finished_at)
WHERE NOT EXISTS (
    SELECT 1 FROM stage_runs s
    WHERE s.stage = r.stage AND s.finished_at = r.finished_at AND s.seconds = r.seconds
        AND s.media_seconds IS NOT DISTINCT FROM r.media_seconds
)
RETURNING stage
"""


@dataclass
class Copied:
    """What `db copy` did with one table's rows."""

    table: str
    read: int = 0
    written: int = 0  # new in the target; the rest were there already (an earlier copy)
    note: str = ""

    def line(self) -> str:
        there = self.read - self.written
        return f"{self.table}: {self.written} copied, {there} already there" + (f" ({self.note})" if self.note else "")


def cmd_db_copy(args: argparse.Namespace) -> int:
    """Copy the state of an SQLite job store into PostgreSQL (docs/deploy.md, the move to several
    instances). Idempotent: rows the target holds already (same job id, same idempotency key, same
    stage run) are left as they are, so an interrupted or repeated copy is simply run again."""
    url = args.to or Settings.from_env().database_url
    if not url:
        raise CliError("no target database: give --to postgresql://… or set KLIPSTREAM_DATABASE_URL", EXIT_USAGE)
    source = Path(args.source)
    if not source.is_file():
        raise CliError(f"cannot copy from {source}: no such file", EXIT_USAGE)
    where = redacted(url)
    conn = _open_source(source)
    try:
        try:
            tables = asyncio.run(_copy(conn, url))
        except UNAVAILABLE as exc:
            raise CliError(f"cannot reach {where}: {type(exc).__name__}: {exc}", EXIT_UNREACHABLE) from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise CliError(f"copy to {where} failed, no rows were written: {type(exc).__name__}: {exc}") from None
        except sqlite3.Error as exc:
            raise CliError(f"cannot read {source}: {exc}; no rows were written", EXIT_UNREACHABLE) from None
    finally:
        conn.close()
    for copied in tables:
        print(copied.line())
    print(f"copied {source} into {where}")
    return 0


def _open_source(path: Path) -> sqlite3.Connection:
    """The SQLite file, locked for this process alone while the copy runs.

    In exclusive locking mode the first transaction takes the file's exclusive lock, which SQLite
    refuses while another connection has the file open: a server still using the file is detected
    here, and none can start writing to it until the copy is done."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=1.0)
    except sqlite3.Error as exc:
        raise CliError(f"cannot open {path}: {exc}", EXIT_USAGE) from None
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
        if found is None:
            raise CliError(f"{path} is not a KlipStream job store (it has no jobs table)", EXIT_USAGE)
        upgrade_sqlite(conn)  # takes the exclusive lock (BEGIN IMMEDIATE) and keeps it
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise CliError(
                f"{path} is in use (a server still has it open): stop that server, then copy", EXIT_USAGE
            ) from None
        raise CliError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise CliError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    except BaseException:
        conn.close()
        raise
    return conn


async def _copy(source: sqlite3.Connection, url: str) -> list[Copied]:
    """Upgrade the target, then copy every table in one transaction: all of it arrives, or none."""
    target = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        await upgrade_postgres(target)
        source.execute("BEGIN")  # one snapshot of the source for the whole copy
        try:
            async with target.transaction():
                tables = [
                    await _copy_jobs(source, target),
                    await _copy_rows(
                        source,
                        target,
                        "idempotency",
                        "SELECT key, body_hash, job_id, response, status, created_at, owner FROM idempotency"
                        " ORDER BY created_at, key",
                        _COPY_IDEMPOTENCY,
                    ),
                    await _copy_rows(
                        source,
                        target,
                        "stage_runs",
                        "SELECT stage, seconds, media_seconds, finished_at FROM stage_runs ORDER BY finished_at",
                        _COPY_STAGE_RUNS,
                    ),
                    # The outbox: what the SQLite instance had not sent yet is sent by the cluster
                    # (same webhook-id). Finished deliveries are history and stay behind.
                    await _copy_rows(source, target, "webhook_deliveries", PENDING_DELIVERIES, IMPORT_DELIVERIES),
                    await _copy_rows(source, target, "webhook_attempts", PENDING_ATTEMPTS, IMPORT_ATTEMPTS),
                    await _copy_rows(
                        source,
                        target,
                        "convex_updates",
                        "SELECT job_id, path, args, updated_at FROM convex_updates WHERE version > sent_version",
                        IMPORT_CONVEX,
                    ),
                ]
        finally:
            source.execute("COMMIT")
    finally:
        await target.close()
    return tables


async def _copy_jobs(source: sqlite3.Connection, target: asyncpg.Connection) -> Copied:
    copied = Copied("jobs")
    requeued = 0
    active_keys: set[str] = set()  # of the active jobs read so far: the target allows one per key
    cursor = source.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq")
    while rows := cursor.fetchmany(COPY_BATCH):
        batch, running = [], set()
        for row in rows:
            row = list(row)
            if row[2] == JobStatus.RUNNING.value:
                row = _requeued(row)
                running.add(row[0])
            if row[2] in ACTIVE and row[8]:
                if row[8] in active_keys:
                    row[8] = ""  # a second active job of one key (an old file): copied unshared
                else:
                    active_keys.add(row[8])
            batch.append(row)
        copied.read += len(batch)
        written = {r["job_id"] for r in await target.fetch(_COPY_JOBS, *zip(*batch, strict=True))}
        copied.written += len(written)
        requeued += len(running & written)
    if requeued:
        copied.note = f"{requeued} running re-queued"
    return copied


def _requeued(row: list[Any]) -> list[Any]:
    """A job that was running when the SQLite instance stopped, as that instance's start-up would
    resume it (JobService._recover): queued again, its running stage pending; completed stages stay
    completed, so it continues after them. No lease: any instance of the cluster may claim it."""
    job = Job.model_validate_json(row[7])
    job.status = JobStatus.QUEUED
    for state in job.stages:
        if state.status is StageStatus.RUNNING:
            state.status = StageStatus.PENDING
    fresh = JobRow.of(job)
    return [*fresh[:8], row[8], row[9], row[10]]


async def _copy_rows(
    source: sqlite3.Connection, target: asyncpg.Connection, table: str, select: str, insert: str
) -> Copied:
    copied = Copied(table)
    cursor = source.execute(select)
    while rows := cursor.fetchmany(COPY_BATCH):
        copied.read += len(rows)
        copied.written += len(await target.fetch(insert, *zip(*rows, strict=True)))
    return copied
