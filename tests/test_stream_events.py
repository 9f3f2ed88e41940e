"""Job events in the `job_events` table: one sequence of SSE ids on every instance and across
restarts. Real server processes (SQLite, and several on one throwaway PostgreSQL) and the real
PostgreSQL store; nothing mocked."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from klipstream.jobs.store import Effects, EventRow, JobRow, LeaseLost
from klipstream.jobs.store.postgres import PostgresStore
from klipstream.models import Job, JobStatus
from klipstream.sse import SseEvent, SseParser
from tests.test_cluster import URL, cluster, post  # noqa: F401 (cluster: the fixture)
from tests.test_process_lifecycle import ServerProcess, wait_for

AGING = 600.0


def stage_event(job: Job, type_: str = "stage") -> Effects:
    job.event_seq += 1
    return Effects(events=(EventRow(job.job_id, job.event_seq, type_, f'{{"seq": {job.event_seq}}}'),))


async def test_a_refused_fenced_save_writes_no_event_and_notifies_nothing(postgres_url: str):
    """The events of a change commit with it: a stale owner's save is refused and neither its event
    nor its notification exists; the new owner's save writes its event and notifies "job_id:seq"
    (in the same transaction); a write of another job in the same batch is not affected."""
    stale, owner, watcher = (PostgresStore(postgres_url, timeout=10) for _ in range(3))
    for store in (stale, owner, watcher):
        await store.open()
    try:
        heard: list[str] = []
        assert await watcher.listen(heard.append)
        job = Job(job_id="job-fenced", video_id="v1", url=URL)
        bystander = Job(job_id="job-bystander", video_id="v2", url=URL)
        await stale.insert_job(JobRow.of(job))
        await stale.insert_job(JobRow.of(bystander))
        assert (await stale.claim("a", 0.1, AGING)) is not None
        await asyncio.sleep(0.3)
        assert await owner.reap() == [job.job_id]
        retaken = await owner.claim("b", 30, AGING)
        assert retaken is not None
        job.status = JobStatus.RUNNING
        results = await asyncio.gather(
            stale.save_job(job, stage_event(job)),  # the stale owner: fenced out
            stale.save_job(bystander, stage_event(bystander)),  # same batch, another job
            return_exceptions=True,
        )
        assert isinstance(results[0], LeaseLost) and results[1] is None, results
        assert await owner.job_events(job.job_id, 0) == []
        assert [e.seq for e in await owner.job_events(bystander.job_id, 0)] == [1]
        fresh = Job.model_validate_json(retaken[1])
        fresh.status = JobStatus.RUNNING
        await owner.save_job(fresh, stage_event(fresh))
        assert [(e.seq, e.data) for e in await watcher.job_events(job.job_id, 0)] == [(1, '{"seq": 1}')]
        stored = await watcher.get_job(job.job_id)
        assert stored is not None and stored.event_seq == 1
        async with asyncio.timeout(5):
            while f"{job.job_id}:1" not in heard:
                await asyncio.sleep(0.02)
        assert f"{bystander.job_id}:1" in heard
        assert heard.count(f"{job.job_id}:1") == 1  # the refused save notified nothing
    finally:
        for store in (stale, owner, watcher):
            await store.close()


def parse(text: bytes) -> list[SseEvent]:
    return SseParser().feed(text)


async def read_until(stream: aiohttp.ClientResponse, done: Any, timeout: float = 30) -> list[SseEvent]:
    """Events of `stream` until `done(events)` or the server closes it."""
    parser = SseParser()
    events: list[SseEvent] = []
    async with asyncio.timeout(timeout):
        async for chunk in stream.content.iter_any():
            events += parser.feed(chunk)
            if done(events):
                break
    return events


def triples(events: list[SseEvent]) -> list[tuple[int, str, str]]:
    return [(int(e.id or 0), e.event, e.data) for e in events]


async def test_last_event_id_after_a_restart_replays_from_the_table(tmp_path: Path):
    """SQLite, one instance: a client that had events up to id k before the server restarted
    (SIGTERM: the job is re-queued) reconnects to the new process with Last-Event-ID k and gets
    exactly the events after k (the re-queue, the new run, the end), not a fresh snapshot. The
    shutdown's `reconnect` frame repeats the last event's id, so Last-Event-ID stays that one."""
    server = ServerProcess(tmp_path, env={"TEST_STEP_SECONDS": "0.15"})
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            status, first = await post(http, f"{server.base}/api/v1/analysis", json={"url": URL})
            assert status == 202
            job_url = f"{server.base}/api/v1/analysis/{first['job_id']}"
            async with http.get(f"{job_url}/stream") as stream:
                before = await read_until(stream, lambda ev: sum(e.event == "stage" for e in ev) >= 3)
                server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                before += await read_until(stream, lambda ev: any(e.event == "reconnect" for e in ev))
            assert before[0].event == "snapshot" and before[-1].event == "reconnect", triples(before)
            had = [e for e in before[1:] if e.event != "reconnect"]
            last = int(had[-1].id or 0)
            assert int(before[-1].id or 0) == last
            assert [int(e.id or 0) for e in had] == list(range(int(had[0].id or 0), last + 1))
            assert await asyncio.to_thread(server.proc.wait, 10) == 0  # type: ignore[union-attr]
            await server.start()
            async with http.get(f"{job_url}/stream", headers={"Last-Event-ID": str(last)}) as again:
                after = await read_until(again, lambda ev: False)
            assert after and after[0].event != "snapshot", triples(after)
            ids = [int(e.id or 0) for e in after]
            assert ids == list(range(last + 1, last + 1 + len(ids))), triples(after)
            assert after[-1].event == "completed"
            assert any(e.event == "stage" and e.json()["kind"] == "requeued" for e in after)
            assert [e.json()["kind"] for e in after if e.event == "stage"].count("started") == 1
            job = await wait_for(http, job_url, lambda j: j["status"] == "completed")
            assert job["event_seq"] == ids[-1]
    finally:
        server.stop()


@pytest.mark.parametrize("notify", ["true", "false"], ids=["notified", "polling"])
async def test_streams_on_every_instance_carry_the_same_events_and_replay_anywhere(cluster, notify: str):  # noqa: F811
    """A runs the job; B and C run nothing. A stream on A (the owner's in-memory path) and one on B
    (rows read from the table when woken by NOTIFY, or by polling) carry the same events: ids,
    types and data. A third client drops off B midway and reconnects to C with Last-Event-ID: it
    gets exactly the events it missed (replayed from the table), then the rest live."""
    a, b, c = await cluster(("a", 1), ("b", 0), ("c", 0), KLIPSTREAM_DATABASE_NOTIFY=notify)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a.base}/api/v1/queue/pause") as resp:
            assert resp.status == 200, await resp.text()
        status, first = await post(http, f"{b.base}/api/v1/analysis", json={"url": URL})
        assert status == 202
        path = f"/api/v1/analysis/{first['job_id']}/stream"
        on_a = await http.get(f"{a.base}{path}")
        on_b = await http.get(f"{b.base}{path}")
        dropping = await http.get(f"{b.base}{path}")
        readers = [asyncio.create_task(read_until(s, lambda ev: False)) for s in (on_a, on_b)]
        await asyncio.sleep(0.3)  # the streams are open (snapshot sent) before the job starts
        async with http.post(f"{a.base}/api/v1/queue/resume") as resp:
            assert resp.status == 200
        early = await read_until(dropping, lambda ev: len(ev) >= 4)  # the snapshot and three events
        dropping.close()
        last = int(early[-1].id or 0)
        async with http.get(f"{c.base}{path}", headers={"Last-Event-ID": str(last)}) as on_c:
            rest = await read_until(on_c, lambda ev: False)
        seen_a, seen_b = await asyncio.gather(*readers)
    assert seen_a[0].event == seen_b[0].event == "snapshot"
    reference = triples(seen_a[1:])
    assert reference[-1][1] == "completed" and [kind for _, kind, _ in reference].count("completed") == 1
    ids = [event_id for event_id, _, _ in reference]
    assert ids == list(range(1, len(ids) + 1)), reference  # nothing happened before the streams opened
    assert {"stage", "progress"} <= {kind for _, kind, _ in reference}
    assert triples(seen_b[1:]) == reference
    assert triples(early[1:]) == reference[: len(early) - 1]
    assert triples(rest) == [event for event in reference if event[0] > last]
