"""Versioned schema migrations, one mechanism for both backends.

Each backend has a directory of numbered SQL files (`sqlite/0001_initial.sql`,
`postgres/0001_initial.sql`, …); a database records the versions it has in `schema_version`. At
start (and by `klipstream db upgrade`) the files whose version is not recorded are applied in
order, each with its version row, all in one transaction. Numbers need not be consecutive: branches
developed side by side reserve theirs, and a database that got a later number first still gets the
earlier ones once they land (migrations are written to be independent of one another's order).

* SQLite: `BEGIN IMMEDIATE` takes the database's write lock first, so two processes opening the
  same file apply each migration once.
* PostgreSQL: the transaction first takes a transaction-scoped advisory lock, so instances starting
  together queue behind one another instead of racing on the DDL; the second one finds the schema
  current and applies nothing. PostgreSQL's DDL is transactional: a failing migration leaves the
  database as it was.

A database newer than this code (a later version recorded) is used as it is, with a warning:
migrations add and never take away what running code reads, so a rolling deploy can run old and
new instances on one database.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

SQLITE = "sqlite"
POSTGRES = "postgres"
# pg_advisory_xact_lock key of the schema migrations: "klip" in ASCII.
ADVISORY_LOCK_KEY = 0x6B6C6970
LOCK_WAIT = "60s"  # how long an instance waits for another one's migrations before it gives up

_VERSION_TABLE = {
    SQLITE: "CREATE TABLE IF NOT EXISTS schema_version"
    " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)",
    POSTGRES: "CREATE TABLE IF NOT EXISTS schema_version"
    " (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Upgrade:
    """What an upgrade found and did."""

    before: int  # the version recorded before
    after: int  # the version recorded now
    applied: tuple[int, ...]  # versions applied by this call


def migrations(backend: str) -> list[Migration]:
    """The backend's migrations in version order, read from `NNNN_name.sql` files."""
    found: list[Migration] = []
    for entry in resources.files(__package__).joinpath(backend).iterdir():
        stem, dot, ext = entry.name.partition(".")
        if not dot or ext != "sql":
            continue
        number, _, name = stem.partition("_")
        found.append(Migration(int(number), name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise RuntimeError(f"{backend} migrations must have distinct numbers from 1; found {versions}")
    return found


def latest(backend: str) -> int:
    found = migrations(backend)
    return found[-1].version if found else 0


def versions(backend: str) -> list[int]:
    """The versions this code has, in order (numbers reserved by branches not merged yet are gaps)."""
    return [m.version for m in migrations(backend)]


def _newer_warning(backend: str, current: int) -> None:
    log.warning(
        "the %s database is at schema version %d, newer than this code knows (%d); using it as it is",
        backend,
        current,
        latest(backend),
    )


# --- SQLite ---
def sqlite_statements(script: str) -> list[str]:
    """Split a script into statements (sqlite3 runs one per execute; executescript would commit)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(part.strip().startswith("--") or not part.strip() for part in pending.splitlines()):
        raise ValueError(f"unterminated SQL statement: {pending.strip()[:80]!r}")
    return statements


_ADD_COLUMN = re.compile(r"^ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)\s", re.IGNORECASE)


def _column_present(conn: sqlite3.Connection, statement: str) -> bool:
    """An `ALTER TABLE t ADD COLUMN c` whose column exists already: SQLite has no `IF NOT EXISTS`
    for columns, and a file from the release before versioned migrations may hold columns that a
    later migration adds (the hardening release added its own at open)."""
    code = "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
    match = _ADD_COLUMN.match(code.strip())
    if match is None:
        return False
    table, column = match.groups()
    return column in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def upgrade_sqlite(conn: sqlite3.Connection) -> Upgrade:
    """Bring an SQLite database to the latest version in one transaction.

    `conn` must be in autocommit mode (isolation_level=None), so the BEGIN here is the only one.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_VERSION_TABLE[SQLITE])
        before = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        recorded = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
        applied = []
        for migration in migrations(SQLITE):
            if migration.version in recorded:
                continue
            for statement in sqlite_statements(migration.sql):
                if not _column_present(conn, statement):
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            applied.append(migration.version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    result = Upgrade(before, applied[-1] if applied else before, tuple(applied))
    _report(SQLITE, result)
    return result


# --- PostgreSQL ---
async def upgrade_postgres(conn: asyncpg.Connection) -> Upgrade:
    """Bring a PostgreSQL database to the latest version, serialised across instances."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
        await conn.execute(_VERSION_TABLE[POSTGRES])
        before = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        recorded = {row[0] for row in await conn.fetch("SELECT version FROM schema_version")}
        applied = []
        for migration in migrations(POSTGRES):
            if migration.version in recorded:
                continue
            await conn.execute(migration.sql)  # no arguments: the simple protocol runs the whole script
            await conn.execute(
                "INSERT INTO schema_version (version, name) VALUES ($1, $2)", migration.version, migration.name
            )
            applied.append(migration.version)
    result = Upgrade(before, applied[-1] if applied else before, tuple(applied))
    _report(POSTGRES, result)
    return result


def _report(backend: str, result: Upgrade) -> None:
    if result.applied:
        log.info("%s schema upgraded from version %d to %d", backend, result.before, result.after)
    elif result.before > latest(backend):
        _newer_warning(backend, result.before)
