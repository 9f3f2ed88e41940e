"""Versioned schema migrations: a database made before them is upgraded in place with its rows,
concurrent openers apply each migration once, and both backends stay at the same version."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from klipstream.jobs.store.migrations import POSTGRES, SQLITE, migrations, sqlite_statements, upgrade_sqlite
from klipstream.jobs.store.sqlite import SQLiteStore
from klipstream.models import Job

FIXTURES = Path(__file__).parent / "fixtures"


def legacy_database(path: Path) -> Job:
    """A database as the code before versioned migrations left it, with a job, a key, a stage
    record and a pending webhook delivery."""
    job = Job(job_id="legacy1", video_id="2000000001", url="https://www.twitch.tv/videos/2000000001")
    conn = sqlite3.connect(path)
    conn.executescript((FIXTURES / "sqlite_schema_before_migrations.sql").read_text())
    created = job.created_at.timestamp()
    conn.execute(
        "INSERT INTO jobs (job_id, video_id, status, priority, created_at, updated_at, finished_at, doc)"
        " VALUES (?, ?, 'queued', 'normal', ?, ?, NULL, ?)",
        (job.job_id, job.video_id, created, created, job.model_dump_json()),
    )
    conn.execute("INSERT INTO idempotency VALUES ('key1', 'hash', 'legacy1', '{}', 202, ?)", (created,))
    conn.execute("INSERT INTO stage_runs VALUES ('download', 3.0, 60.0, ?)", (time.time(),))
    conn.execute(
        "INSERT INTO webhook_deliveries (id, job_id, url, event, body, created_at, next_attempt_at)"
        " VALUES ('msg_1', 'legacy1', 'http://127.0.0.1:9/hook', 'job.started', '{}', ?, ?)",
        (created, created),
    )
    conn.commit()
    conn.close()
    return job


def versions(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()


async def test_a_database_from_before_migrations_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "klipstream.sqlite3"
    job = legacy_database(path)
    store = SQLiteStore(path)
    await store.open()
    assert await store.get_job(job.job_id) == job
    assert [j.job_id for j in await store.active_jobs()] == [job.job_id]
    assert (await store.get_idempotency("key1")).job_id == job.job_id  # type: ignore[union-attr]
    assert [r[0] for r in await store.stage_runs(0)] == ["download"]
    # The old outbox's pending delivery is the store's now (the same tables, in the same file).
    assert [d["id"] for d in await store.delivery_history(job.job_id)] == ["msg_1"]
    assert await store.delivery_backlog() == 1
    assert [d.id for d in await store.claim_deliveries("sender", time.time() + 1e6, 10, 30)] == ["msg_1"]
    await store.close()
    assert versions(path) == [(m.version, m.name) for m in migrations(SQLITE)]


async def test_a_database_from_the_hardening_release_keeps_its_rows(tmp_path: Path):
    """That release added `dedup_key` and `owner` at open, before migrations existed: migration 2
    meets the columns already there and keeps their values."""
    path = tmp_path / "klipstream.sqlite3"
    job = Job(
        job_id="hard1", video_id="2000000002", url="https://www.twitch.tv/videos/2000000002", dedup_key="2000000002:ab"
    )
    conn = sqlite3.connect(path)
    conn.executescript((FIXTURES / "sqlite_schema_hardening.sql").read_text())
    created = job.created_at.timestamp()
    conn.execute(
        "INSERT INTO jobs (job_id, video_id, status, priority, created_at, updated_at, finished_at, doc, dedup_key)"
        " VALUES (?, ?, 'queued', 'normal', ?, ?, NULL, ?, ?)",
        (job.job_id, job.video_id, created, created, job.model_dump_json(), job.dedup_key),
    )
    conn.execute("INSERT INTO idempotency VALUES ('o:k', 'hash', 'hard1', '{}', 202, ?, 'o')", (created,))
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    assert await store.get_job(job.job_id) == job
    record = await store.get_idempotency("o:k")
    assert record is not None and (record.job_id, record.owner) == ("hard1", "o")
    await store.close()
    assert versions(path) == [(m.version, m.name) for m in migrations(SQLITE)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT dedup_key FROM jobs").fetchone()[0] == "2000000002:ab"


def schema_shape(path: Path) -> dict[str, object]:
    """Tables with their columns and indexes with their columns and uniqueness, whatever the SQL
    text that made them (an `ALTER TABLE … ADD COLUMN` reads back differently from a CREATE)."""
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        shape: dict[str, object] = {}
        for table in tables:
            if table == "schema_version":
                continue
            shape[table] = [tuple(r[1:]) for r in conn.execute(f"PRAGMA table_info({table})")]
            for _, index, unique, origin, partial in conn.execute(f"PRAGMA index_list({table})"):
                columns = [r[2] for r in conn.execute(f"PRAGMA index_info({index})")]
                shape[f"{table}.{index}"] = (unique, origin, partial, columns)
        return shape


async def test_files_of_every_earlier_release_upgrade_to_the_schema_of_a_new_file(tmp_path: Path):
    """A new file, a file from before migrations, one from the hardening release (columns added at
    open) and one at version 1 (phase 1's migrations) all end with the same tables and indexes."""
    fresh = tmp_path / "fresh.sqlite3"
    before = tmp_path / "before.sqlite3"
    hardening = tmp_path / "hardening.sqlite3"
    version1 = tmp_path / "version1.sqlite3"
    legacy_database(before)
    with sqlite3.connect(hardening) as conn:
        conn.executescript((FIXTURES / "sqlite_schema_hardening.sql").read_text())
    conn = sqlite3.connect(version1, isolation_level=None)
    for statement in sqlite_statements(migrations(SQLITE)[0].sql):
        conn.execute(statement)
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    conn.execute("INSERT INTO schema_version VALUES (1, 'initial', 0)")
    conn.close()
    for path in (fresh, before, hardening, version1):
        conn = sqlite3.connect(path, isolation_level=None)
        upgrade_sqlite(conn)
        conn.close()
        assert versions(path) == [(m.version, m.name) for m in migrations(SQLITE)], path.name
    expected = schema_shape(fresh)
    assert "dedup_key" in [column[0] for column in expected["jobs"]]  # type: ignore[union-attr]
    assert "owner" in [column[0] for column in expected["idempotency"]]  # type: ignore[union-attr]
    for path in (before, hardening, version1):
        assert schema_shape(path) == expected, path.name


def test_openers_racing_on_a_new_file_apply_each_migration_once(tmp_path: Path):
    path = tmp_path / "klipstream.sqlite3"
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def open_and_upgrade() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")
        barrier.wait()
        try:
            upgrade_sqlite(conn)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=open_and_upgrade) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert versions(path) == [(m.version, m.name) for m in migrations(SQLITE)]


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path, monkeypatch):
    from klipstream.jobs.store import migrations as module

    path = tmp_path / "klipstream.sqlite3"
    broken = [
        *migrations(SQLITE),
        module.Migration(len(migrations(SQLITE)) + 1, "broken", "CREATE TABLE t (a);\nNOPE;"),
    ]
    monkeypatch.setattr(module, "migrations", lambda backend: broken)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        upgrade_sqlite(conn)
    except sqlite3.OperationalError:
        pass
    else:
        raise AssertionError("the broken migration was applied")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "t" not in tables and "jobs" not in tables and "schema_version" not in tables


def test_both_backends_have_the_same_versions():
    """A schema change adds the same version to both directories, so one number describes both."""
    assert [(m.version, m.name) for m in migrations(SQLITE)] == [(m.version, m.name) for m in migrations(POSTGRES)]


def test_statement_splitting_keeps_comments_and_semicolons_in_strings():
    script = "-- a comment; with a semicolon\nCREATE TABLE a (x TEXT DEFAULT 'p;q');  -- trailing\n\nDROP TABLE a;\n"
    assert sqlite_statements(script) == [
        "-- a comment; with a semicolon\nCREATE TABLE a (x TEXT DEFAULT 'p;q');  -- trailing",
        "DROP TABLE a;",
    ]


def test_db_upgrade_command_on_sqlite(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    legacy_database(data / "klipstream.sqlite3")
    env = {**os.environ, "KLIPSTREAM_DATA_DIR": str(data)}
    env.pop("KLIPSTREAM_DATABASE_URL", None)
    cmd = [sys.executable, "-m", "klipstream", "db", "upgrade"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    numbers = [m.version for m in migrations(SQLITE)]
    latest = numbers[-1]
    applied = ", ".join(str(n) for n in numbers)
    assert first.stdout.strip() == f"{data / 'klipstream.sqlite3'}: schema version {latest} (applied {applied})"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert second.stdout.strip().endswith(f"schema version {latest} (up to date)")
    with sqlite3.connect(data / "klipstream.sqlite3") as conn:
        assert json.loads(conn.execute("SELECT doc FROM jobs").fetchone()[0])["job_id"] == "legacy1"
