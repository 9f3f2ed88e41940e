"""The event stream: order, replay with Last-Event-ID, finished jobs, coalescing, slow subscribers."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from klipstream.api.context import BROADCASTER, SERVICE
from klipstream.jobs.stage import Stage, StageContext
from klipstream.models import DisplayStage
from tests.scheduler_stages import Recorder, simple_pipeline, writing_stage
from tests.sse_client import read_events
from tests.test_api_basics import URL, wait_status


async def open_job(client: Any, **extra: Any) -> str:
    resp = await client.post("/api/v1/analysis", json={"url": URL, **extra})
    return (await resp.json())["job_id"]


async def test_stream_snapshot_then_stages_then_one_terminal(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder, download=True))
    job_id = await open_job(client)
    resp = await client.get(f"/api/v1/analysis/{job_id}/stream")
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    reader = asyncio.create_task(read_events(resp))
    await asyncio.sleep(0.1)
    recorder.gate("download").set()
    events = await asyncio.wait_for(reader, 10)
    kinds = [e.event for e in events]
    assert kinds[0] == "snapshot" and events[0].json()["job_id"] == job_id
    assert kinds[-1] == "completed" and kinds.count("completed") == 1
    assert not {"failed", "cancelled"} & set(kinds)
    assert "stage" in kinds and "progress" in kinds
    ids = [int(e.id) for e in events[1:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    final = events[-1].json()
    assert final["status"] == "completed" and "results" in final
    displays = [
        s["display"] for e in events if e.event == "stage" for s in e.json()["stages"] if s["status"] == "running"
    ]
    assert {"Downloading", "Fetching chat", "Processing audio", "Transcribing"} <= set(displays)


async def test_replay_with_last_event_id(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder, transcribe=True))
    job_id = await open_job(client)
    first = await client.get(f"/api/v1/analysis/{job_id}/stream")
    seen = []
    async with asyncio.timeout(5):
        while True:
            line = (await first.content.readline()).decode().strip()
            if line.startswith("id:"):
                seen.append(int(line[3:]))
            if len(seen) >= 4:
                break
    first.close()  # the client drops; events keep flowing meanwhile
    await asyncio.sleep(0.2)
    recorder.gate("transcribe").set()
    await wait_status(client, job_id, {"completed"})
    again = await client.get(f"/api/v1/analysis/{job_id}/stream", headers={"Last-Event-ID": str(seen[-1])})
    events = await asyncio.wait_for(read_events(again), 5)
    assert events[0].event != "snapshot"  # a replay, not a fresh snapshot
    ids = [int(e.id) for e in events]
    assert ids[0] == seen[-1] + 1 and ids == list(range(ids[0], ids[0] + len(ids)))
    assert events[-1].event == "completed"


async def test_too_old_or_foreign_last_event_id_gets_a_snapshot(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder, download=True))
    job_id = await open_job(client)
    resp = await client.get(f"/api/v1/analysis/{job_id}/stream", headers={"Last-Event-ID": "999999"})
    line = b""
    async with asyncio.timeout(5):
        while not line.startswith(b"event:"):
            line = await resp.content.readline()
    assert line.strip() == b"event: snapshot"
    resp.close()
    recorder.gate("download").set()


async def test_finished_job_answers_snapshot_and_terminal_then_closes(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder))
    job_id = await open_job(client)
    await wait_status(client, job_id, {"completed"})
    resp = await client.get(f"/api/v1/analysis/{job_id}/stream")
    events = await asyncio.wait_for(read_events(resp), 5)
    assert [e.event for e in events] == ["snapshot", "completed"]


async def test_cancelled_job_ends_stream_with_cancelled(make_client, settings):
    recorder = Recorder()
    client = await make_client(settings, simple_pipeline(recorder, download=True))
    job_id = await open_job(client)
    resp = await client.get(f"/api/v1/analysis/{job_id}/stream")
    reader = asyncio.create_task(read_events(resp))
    await asyncio.sleep(0.1)
    await client.delete(f"/api/v1/analysis/{job_id}")
    events = await asyncio.wait_for(reader, 5)
    assert events[-1].event == "cancelled"
    assert [e.event for e in events].count("cancelled") == 1


def chatty_stage(reports: int) -> Stage:
    """Reports progress far faster than anyone should be told about it."""

    async def run(ctx: StageContext) -> None:
        for i in range(reports):
            ctx.progress(i / reports)
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        ctx.output_path("waveform").write_text("[]")
        ctx.add_artifact("waveform")

    return Stage("audio", DisplayStage.PROCESSING_AUDIO, run, provides=("waveform",))


async def test_progress_is_coalesced(make_client, settings):
    client = await make_client(settings, [chatty_stage(5000)])
    job_id = await open_job(client)
    resp = await client.get(f"/api/v1/analysis/{job_id}/stream")
    events = await asyncio.wait_for(read_events(resp), 10)
    progress = [e for e in events if e.event == "progress"]
    assert 0 < len(progress) < 60  # 5000 reports over ~1 s become a handful of events
    assert events[-1].event == "completed"


async def test_stalled_subscriber_does_not_slow_others(make_client, settings):
    recorder = Recorder()
    stages = [chatty_stage(6000), writing_stage("after", recorder, needs=("waveform",), gated=True)]
    client = await make_client(settings, stages)
    job_id = await open_job(client)
    host, port = client.server.host, client.server.port
    stalled = socket.create_connection((host, port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(f"GET /api/v1/analysis/{job_id}/stream HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    healthy = await client.get(f"/api/v1/analysis/{job_id}/stream")
    reader = asyncio.create_task(read_events(healthy))
    await asyncio.sleep(0.5)
    recorder.gate("after").set()
    events = await asyncio.wait_for(reader, 10)
    assert events[-1].event == "completed"
    service = client.app[SERVICE]
    topic = client.app[BROADCASTER].topics[job_id]
    assert len(topic.events) <= topic.events.maxlen  # memory is the ring, whatever the subscribers do
    assert service.cached(job_id).status.value == "completed"
    stalled.close()
