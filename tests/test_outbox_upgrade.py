"""The outbox's upgrade path (issue 14): the pending webhook deliveries an earlier release left in
the data directory's SQLite file are sent once the service runs on PostgreSQL, with their
webhook-id, exactly once across restarts; on SQLite they were always in the store's own file
(tests/test_migrations.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

from klipstream.config import Settings
from klipstream.integrations.outbox import MOVED, import_local_outbox
from klipstream.jobs.store.postgres import PostgresStore
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_migrations import legacy_database
from tests.test_outbox_process import Receiver


async def test_an_old_outbox_files_pending_deliveries_are_sent_from_postgres_once(
    make_client: Callable[..., Any], make_settings: Callable[..., Settings], postgres_url: str
):
    receiver = Receiver()
    await receiver.start()
    try:
        settings = make_settings(database_url=postgres_url, webhook_retry_base_seconds=0.05, outbox_poll_seconds=0.1)
        settings.data_dir.mkdir(parents=True)
        legacy_database(settings.database_path)  # a file with one pending delivery, msg_1, as before migrations
        with sqlite3.connect(settings.database_path) as conn:
            conn.execute("UPDATE webhook_deliveries SET url = ?, body = ?", (receiver.url, _body("legacy1")))
        client = await make_client(settings, simple_pipeline(Recorder()))
        async with asyncio.timeout(15):
            while not receiver.delivered("job.started"):
                await asyncio.sleep(0.05)
        assert [r.webhook_id for r in receiver.requests] == ["msg_1"]  # its id kept
        await client.close()
        with sqlite3.connect(settings.database_path) as conn:
            assert conn.execute("SELECT state FROM webhook_deliveries").fetchall() == [(MOVED,)]
        again = await make_client(settings, simple_pipeline(Recorder()))  # a restart: nothing is imported again
        await asyncio.sleep(0.5)
        await again.close()
        assert [r.webhook_id for r in receiver.requests] == ["msg_1"]
        store = PostgresStore(postgres_url)
        await store.open()
        try:
            assert [d["state"] for d in await store.delivery_history("legacy1")] == ["delivered"]
            # Interrupted after the import, before the file was marked: importing again adds nothing.
            with sqlite3.connect(settings.database_path) as conn:
                conn.execute("UPDATE webhook_deliveries SET state = 'pending'")
            assert await import_local_outbox(settings.database_path, store) == 0
            assert await store.delivery_backlog() == 0
        finally:
            await store.close()
    finally:
        await receiver.stop()


def _body(job_id: str) -> str:
    return f'{{"type":"job.started","timestamp":"2025-01-01T00:00:00Z","data":{{"job_id":"{job_id}"}}}}'
