"""The shared store's part in running several instances (real PostgreSQL): claims in the queue's
order with SKIP LOCKED, leases renewed and reaped, fenced writes, conditional cancel and retry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest

from klipstream.jobs.store import DeliveryRow, Effects, InstanceBeat, JobRow, LeaseLost
from klipstream.jobs.store.postgres import PostgresStore
from klipstream.models import Job, JobStatus, Priority, utcnow
from klipstream.queue import QueueFull

AGING = 600.0  # seconds per priority level, as KLIPSTREAM_AGING_SECONDS


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[Callable[[], PostgresStore]]:
    opened: list[PostgresStore] = []

    async def make(**bounds: int) -> PostgresStore:
        store = PostgresStore(postgres_url, timeout=10, **bounds)
        await store.open()
        opened.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in opened:
        await store.close()


def new_job(n: int, priority: Priority = Priority.NORMAL, age: float = 0.0) -> Job:
    created = utcnow() - timedelta(seconds=age)
    return Job(
        job_id=f"job{n:04d}",
        video_id=f"v{n}",
        url=f"https://www.twitch.tv/videos/{n}",
        priority=priority,
        created_at=created,
        updated_at=created,
    )


async def test_claims_follow_lanes_fifo_and_ageing_from_the_stored_enqueue_time(stores):
    store = await stores()
    jobs = [
        new_job(1, Priority.NORMAL, age=10),
        new_job(2, Priority.HIGH, age=5),
        new_job(3, Priority.NORMAL, age=20),
        new_job(4, Priority.LOW, age=AGING * 2 + 30),  # aged two levels: ahead of normal, behind high
        new_job(5, Priority.URGENT, age=1),
    ]
    for job in jobs:
        await store.insert_job(JobRow.of(job))
    assert await store.queue_place("job0001", AGING) == 5
    assert await store.queue_place("job0005", AGING) == 1
    order = []
    while (claimed := await store.claim("a", 30, AGING)) is not None:
        order.append(claimed[0])
    # urgent; low aged two levels and 30 s more (ahead of high); high; then normal, oldest first
    assert order == ["job0005", "job0004", "job0002", "job0003", "job0001"]
    assert await store.queue_place("job0001", AGING) is None  # running now
    assert set(store.leased()) == {j.job_id for j in jobs}


async def test_instances_claiming_at_once_never_take_the_same_job(stores):
    first, second, third = await stores(), await stores(), await stores()
    await asyncio.gather(*(first.insert_job(JobRow.of(new_job(n))) for n in range(200)))
    assert all([await first.ping(), await second.ping(), await third.ping()])  # connections open before the race

    async def drain(store: PostgresStore, owner: str) -> list[str]:
        taken = []
        while (claimed := await store.claim(owner, 30, AGING)) is not None:
            taken.append(claimed[0])
        return taken

    taken = await asyncio.gather(drain(first, "a"), drain(second, "b"), drain(third, "c"))
    everything = [job_id for part in taken for job_id in part]
    assert sorted(everything) == [f"job{n:04d}" for n in range(200)]  # each exactly once
    assert sum(1 for part in taken if part) >= 2, [len(part) for part in taken]  # they did claim side by side


async def test_the_cluster_running_limit_holds_when_instances_claim_at_once(stores):
    """KLIPSTREAM_CLUSTER_MAX_RUNNING_JOBS: three instances with eight claimers each race for 60
    queued jobs; the database lets exactly the limit run, and one more once one of them ends."""
    limit = 5
    instances = [await stores(max_running=limit) for _ in range(3)]
    await asyncio.gather(*(instances[0].insert_job(JobRow.of(new_job(n))) for n in range(60)))
    await asyncio.gather(*(store.ping() for store in instances for _ in range(8)))  # connections open

    async def claim_until_refused(store: PostgresStore, owner: str) -> list[str]:
        taken = []
        while (claimed := await store.claim(owner, 30, AGING)) is not None:
            taken.append(claimed[0])
        return taken

    taken = await asyncio.gather(
        *(claim_until_refused(store, f"i{i}") for i, store in enumerate(instances) for _ in range(8))
    )
    claimed = [job_id for part in taken for job_id in part]
    assert len(claimed) == limit and len(set(claimed)) == limit, claimed
    assert await instances[1].claim("i1", 30, AGING) is None  # still full
    done = Job.model_validate_json(
        await instances[0]._read(lambda c: c.fetchval("SELECT doc FROM jobs WHERE job_id = $1", claimed[0]))
    )
    done.status = JobStatus.COMPLETED
    done.finished_at = utcnow()
    owner = next(s for s in instances if claimed[0] in s.leased())
    await owner.save_job(done)
    again = await instances[2].claim("i2", 30, AGING)
    assert again is not None and again[0] not in claimed
    assert await instances[2].claim("i2", 30, AGING) is None
    unlimited = await stores()  # an instance without the setting claims freely
    assert await unlimited.claim("free", 30, AGING) is not None


async def test_the_queue_bound_holds_across_instances_submitting_at_once(stores):
    """KLIPSTREAM_MAX_QUEUED_JOBS with PostgreSQL: two instances insert 60 jobs at once against a
    bound of 20; exactly 20 are stored, the others are refused with QueueFull (the 429); a claim
    frees a place, and a retry is bounded like a new job."""
    first, second = await stores(max_queued=20), await stores(max_queued=20)
    results = await asyncio.gather(
        *(store.insert_job(JobRow.of(new_job(n))) for n in range(60) for store in [(first, second)[n % 2]]),
        return_exceptions=True,
    )
    assert all(r is None or isinstance(r, QueueFull) for r in results), results
    assert results.count(None) == 20
    assert await first.queued_counts() == {"normal": 20}
    with pytest.raises(QueueFull):
        await second.insert_job(JobRow.of(new_job(100)))
    claimed = await first.claim("a", 30, AGING)
    assert claimed is not None
    await second.insert_job(JobRow.of(new_job(101)))  # the claim made room for one
    with pytest.raises(QueueFull):
        await first.insert_job(JobRow.of(new_job(102)))
    failed = Job.model_validate_json(claimed[1])
    failed.status, failed.finished_at = JobStatus.FAILED, utcnow()
    await first.save_job(failed)
    first.release(failed.job_id)
    with pytest.raises(QueueFull):  # the queue is full: no retry either
        await first.requeue_finished(failed.model_copy(update={"status": JobStatus.QUEUED, "finished_at": None}))
    assert await second.claim("b", 30, AGING) is not None
    assert await first.requeue_finished(failed.model_copy(update={"status": JobStatus.QUEUED, "finished_at": None}))
    assert await first.queued_counts() == {"normal": 20}


async def test_an_expired_lease_is_reaped_and_the_old_owners_writes_are_refused(stores):
    owner, other = await stores(), await stores()
    job = new_job(1)
    await owner.insert_job(JobRow.of(job))
    claimed = await owner.claim("a", 0.2, AGING)
    assert claimed is not None and claimed[0] == job.job_id
    job.status = JobStatus.RUNNING
    await owner.save_job(job)  # fenced, and ours
    assert await owner.renew(0.2) == {job.job_id: False}
    assert await other.reap() == []  # not expired yet
    await asyncio.sleep(0.4)
    assert await other.reap() == [job.job_id]
    assert await owner.renew(30) == {}  # the lease is gone: the owner must stop
    stored = await other.get_job(job.job_id)
    assert stored is not None and stored.status is JobStatus.QUEUED
    retaken = await other.claim("b", 30, AGING)
    assert retaken is not None and retaken[0] == job.job_id
    job.warnings.append("written by a stale owner")
    with pytest.raises(LeaseLost):
        await owner.save_job(job)
    stored = await other.get_job(job.job_id)
    assert stored is not None and stored.warnings == []  # the stale write did not land
    fresh = Job.model_validate_json(retaken[1])
    fresh.status = JobStatus.RUNNING
    await other.save_job(fresh)  # the new owner writes
    rows = await other._read(lambda c: c.fetchrow("SELECT lease_owner, lease_attempts FROM jobs"))
    assert tuple(rows) == ("b", 1)


async def test_a_refused_write_stays_local_to_its_job(stores):
    """A batch holding a stale owner's write and other writes: only the stale one fails."""
    owner, other = await stores(), await stores()
    stale, fine = new_job(1), new_job(2)
    await owner.insert_job(JobRow.of(stale))
    await owner.claim("a", 0.1, AGING)
    await asyncio.sleep(0.3)
    await other.reap()
    await owner.insert_job(JobRow.of(fine))
    fine.warnings.append("saved")
    results = await asyncio.gather(owner.save_job(stale), owner.save_job(fine), return_exceptions=True)
    assert isinstance(results[0], LeaseLost) and results[1] is None
    stored = await other.get_job(fine.job_id)
    assert stored is not None and stored.warnings == ["saved"]


async def test_a_refused_fenced_save_writes_none_of_its_outbox_rows(stores):
    """A stale owner's save is refused, and so are the webhook and Convex rows it carries."""
    owner, other = await stores(), await stores()
    job = new_job(1)
    await owner.insert_job(JobRow.of(job))
    await owner.claim("a", 0.1, AGING)
    await asyncio.sleep(0.3)
    await other.reap()
    job.status = JobStatus.COMPLETED
    rows = [
        DeliveryRow("msg_stale", job.job_id, "http://receiver/hook", "job.completed", "{}", 1.0),
        DeliveryRow("", job.job_id, "convex:", "video:markCompleted", "{}", 1.0),
    ]
    with pytest.raises(LeaseLost):
        await owner.save_job(job, Effects(deliveries=rows))
    assert await other.delivery_backlog() == 0 and await other.convex_backlog() == 0


async def test_cancel_and_retry_are_conditional_on_the_stored_state(stores):
    api, worker = await stores(), await stores()
    running, queued = new_job(1), new_job(2)
    running.dedup_key, queued.dedup_key = "v1:key", "v2:key"
    await api.insert_job(JobRow.of(running))
    await api.insert_job(JobRow.of(queued))
    assert (await worker.claim("w", 30, AGING))[0] == running.job_id  # type: ignore[index]
    cancelled = queued.model_copy(update={"status": JobStatus.CANCELLED, "finished_at": utcnow()})
    assert await api.cancel_queued(cancelled)
    assert not await api.cancel_queued(running.model_copy(update={"status": JobStatus.CANCELLED}))
    assert not await api.request_cancel(queued.job_id)  # not running
    assert await api.request_cancel(running.job_id)
    assert await worker.renew(30) == {running.job_id: True}
    again = cancelled.model_copy(update={"status": JobStatus.QUEUED, "finished_at": None})
    assert await api.requeue_finished(again)
    assert not await api.requeue_finished(again)  # queued now: a second retry loses
    stored = await api.get_job(queued.job_id)
    assert stored is not None and stored.status is JobStatus.QUEUED
    found = await api.active_job("v2:key")
    assert found is not None and found.job_id == queued.job_id
    assert await api.active_job("v9:key") is None
    assert await api.queued_counts() == {"normal": 1}


async def test_instances_are_listed_with_their_heartbeats(stores):
    store = await stores()
    await store.heartbeat_instance(InstanceBeat("a", "host", 1, 100.0, 2, 4))
    await store.heartbeat_instance(InstanceBeat("a", "host", 1, 100.0, 3, 4))
    await store.heartbeat_instance(InstanceBeat("b", "host", 2, 200.0, 0, 0))
    rows = await store.instances()
    assert [(r["id"], r["running"], r["max_running"]) for r in rows] == [("a", 3, 4), ("b", 0, 0)]
    assert all(r["heartbeat_at"] > 0 for r in rows)
    await store.remove_instance("a")
    assert [r["id"] for r in await store.instances()] == ["b"]
    await store.heartbeat_instance(InstanceBeat("gone", "host", 3, 300.0, 1, 1))
    await store._with_connection(lambda c: c.execute("UPDATE instances SET heartbeat_at = 0 WHERE id = 'gone'"))
    await store.reap()  # every instance's reaper also forgets instances silent for an hour
    assert [r["id"] for r in await store.instances()] == ["b"]


def test_cluster_settings_are_validated(tmp_path):
    from klipstream.cli.local import local_settings
    from klipstream.config import ConfigError, Settings

    url = "postgresql://klip@db.internal/klipstream"
    api_only = Settings.from_env({"KLIPSTREAM_DATABASE_URL": url, "KLIPSTREAM_MAX_RUNNING_JOBS": "0"})
    assert api_only.max_running_jobs == 0
    assert local_settings(api_only, tmp_path).max_running_jobs == 1  # a local run still runs its job
    with pytest.raises(ConfigError, match="API-only instance"):
        Settings.from_env({"KLIPSTREAM_MAX_RUNNING_JOBS": "0"})  # SQLite: nobody else would run the jobs
    with pytest.raises(ConfigError, match="KLIPSTREAM_HEARTBEAT_SECONDS"):
        Settings.from_env({"KLIPSTREAM_LEASE_SECONDS": "2", "KLIPSTREAM_HEARTBEAT_SECONDS": "1"})
    with pytest.raises(ConfigError, match="KLIPSTREAM_LEASE_SECONDS"):
        Settings.from_env({"KLIPSTREAM_LEASE_SECONDS": "0"})


async def test_job_changes_are_notified_to_listening_instances(stores, monkeypatch):
    """LISTEN/NOTIFY: a commit names the jobs it wrote to every listener; a listener whose own
    notification does not come back (a transaction-pooling proxy) says so, and polling stays."""
    from klipstream.jobs.store import postgres as postgres_module

    listener, writer = await stores(), await stores()
    heard: list[str] = []
    got = asyncio.Event()

    def on_change(payload: str) -> None:
        heard.append(payload)
        got.set()

    assert await listener.listen(on_change)
    await writer.insert_job(JobRow.of(new_job(1)))
    await asyncio.wait_for(got.wait(), 5)
    assert heard == ["job0001"]
    monkeypatch.setattr(postgres_module, "LISTEN_SELF_TEST_SECONDS", 0.0)  # the self-test cannot come back in time
    deaf = await stores()
    assert not await deaf.listen(on_change)
    assert deaf._listener is None
