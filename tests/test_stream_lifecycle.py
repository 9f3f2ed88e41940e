"""Streams leave nothing behind and use only public API (issue 13, items 13 and 14)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

from klipstream.api.context import BROADCASTER
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.sse_client import read_events
from tests.test_api_basics import URL, wait_status

ADMIN = {"Authorization": "Bearer admin"}


async def stats(client: Any) -> dict[str, Any]:
    return (await (await client.get("/api/v1/queue/stats", headers=ADMIN)).json())["streams"]


async def test_streams_on_a_finished_job_leave_no_topic(make_client, make_settings):
    client = await make_client(make_settings(admin_token="admin"), simple_pipeline(Recorder()))
    resp = await client.post("/api/v1/analysis", json={"url": URL})
    job_id = (await resp.json())["job_id"]
    await wait_status(client, job_id, {"completed"})
    for _ in range(20):
        stream = await client.get(f"/api/v1/analysis/{job_id}/stream")
        assert stream.status == 200
        events = await asyncio.wait_for(read_events(stream), 5)
        assert [e.event for e in events] == ["snapshot", "completed"]
        last_id = events[-1].id
    # a client that already has the end is told to stop reconnecting
    again = await client.get(f"/api/v1/analysis/{job_id}/stream", headers={"Last-Event-ID": str(last_id)})
    assert again.status == 204
    assert job_id not in client.app[BROADCASTER].topics  # no topic for a job that publishes nothing more
    after = await stats(client)
    assert after["topics"] == 0 and after["subscribers"] == 0, after


def test_no_private_attributes_of_aiohttp_or_asyncio():
    """`_ping`, `_req`, `_payload_writer`, `Semaphore._value`: none of the service's code reaches
    into another library's private attributes."""
    root = Path(__file__).resolve().parent.parent / "klipstream"
    private = {"_ping", "_req", "_payload_writer", "_value", "_server", "_transport", "_waiters"}
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{path.relative_to(root)}:{node.lineno} .{node.attr}")
    assert not found, found


def test_web_framework_versions_are_bounded():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    deps = [line.strip().strip('",') for line in text.splitlines() if line.strip().startswith('"aiohttp')]
    assert deps and all("<" in dep for dep in deps), deps


async def test_event_published_while_the_snapshot_is_written_is_not_missed(make_client, make_settings, monkeypatch):
    """The cursor is taken before the snapshot is written: an event that arrives while that write
    waits on the socket is delivered after the snapshot."""
    from klipstream.api import streams

    client = await make_client(make_settings(admin_token="admin"), simple_pipeline(Recorder()))
    await client.post("/api/v1/queue/pause", headers=ADMIN)
    job_id = (await (await client.post("/api/v1/analysis", json={"url": URL})).json())["job_id"]
    broadcaster = client.app[BROADCASTER]
    original = streams.EventStream.write
    published: list[int] = []

    async def write_while_an_event_arrives(self, data):  # type: ignore[no-untyped-def]
        if not published:
            topic = broadcaster.topics[job_id]
            event = topic.put(topic.last_id + 1, "stage", '{"during": "snapshot"}')
            published.append(event.id)
        await original(self, data)

    monkeypatch.setattr(streams.EventStream, "write", write_while_an_event_arrives)
    resp = await client.get(f"/api/v1/analysis/{job_id}/stream")
    events = []
    from klipstream.sse import SseParser

    parser = SseParser()
    async with asyncio.timeout(5):
        async for chunk in resp.content.iter_any():
            events += parser.feed(chunk)
            if len(events) >= 2:
                break
    resp.close()
    assert [e.event for e in events[:2]] == ["snapshot", "stage"]
    assert events[1].json() == {"during": "snapshot"} and int(events[1].id) == published[0]
