"""`klipstream db upgrade`: apply the schema migrations by hand.

The service applies them itself at start (under PostgreSQL's advisory lock, so instances starting
together do not race); running them beforehand, e.g. as a deploy step, keeps a long migration out
of the instances' start-up time. The database is the one `serve` would use: KLIPSTREAM_DATABASE_URL,
else the SQLite file in KLIPSTREAM_DATA_DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3

import asyncpg

from klipstream.cli.common import EXIT_UNREACHABLE, CliError
from klipstream.config import Settings
from klipstream.jobs.store.migrations import Upgrade, upgrade_postgres, upgrade_sqlite
from klipstream.jobs.store.postgres import UNAVAILABLE, redacted


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
