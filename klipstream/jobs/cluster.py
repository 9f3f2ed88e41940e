"""This instance's part in a cluster of instances sharing one PostgreSQL store.

With a shared store the queue is the database's: a free worker claims the next job with
`FOR UPDATE SKIP LOCKED` (klipstream.jobs.store.postgres) and holds it under a lease. Every
`KLIPSTREAM_HEARTBEAT_SECONDS` this instance, in one loop:

* renews the leases of the jobs it runs, and learns which of them were cancelled on another
  instance (`cancel_requested`) or lost (reaped after an expiry): those stop at once, the lost ones
  without writing anything (their writes would be refused anyway: fencing);
* reaps: every instance returns the jobs whose lease expired to the queue, so the jobs of an
  instance killed with `kill -9` run again elsewhere about `KLIPSTREAM_LEASE_SECONDS` later;
* writes its heartbeat row (`instances`) and counts the shared queue by priority, for queue
  positions and the queue bound of submissions made here.

When the database cannot be reached for longer than a lease, another instance may have reaped this
one's jobs: they are stopped here too, so that no stage runs on two instances at once.

Event streams of a job running on another instance are fed from the `job_events` table: every
commit that writes events notifies "job_id:seq" in its transaction, and this instance then reads
the rows after the last one its broadcaster has, for all the jobs its streams follow, in one query
per wake-up however many subscribers there are (every STREAM_POLL_SECONDS without notifications).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from klipstream.errors import DatabaseUnavailable
from klipstream.jobs.runner import CancelReason
from klipstream.jobs.store import InstanceBeat, SharedJobStore
from klipstream.models import JobStatus

if TYPE_CHECKING:
    from klipstream.jobs.service import EventFeed, JobService

log = logging.getLogger(__name__)
STREAM_POLL_SECONDS = 0.25  # without notifications: how often the events of followed jobs are read
# With notifications: how often they are read all the same, in case one was missed (the listening
# connection broke and is not back yet).
STREAM_NOTIFIED_POLL_SECONDS = 2.0


class _Watch:
    """A job followed here (streams), with where its stored events go."""

    def __init__(self, feed: EventFeed) -> None:
        self.subscribers = 0
        self.feed = feed


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Cluster:
    def __init__(self, service: JobService, store: SharedJobStore) -> None:
        self.service = service
        self.store = store
        self.settings = service.settings
        self.id = self.settings.instance_id or new_instance_id()
        self.started_at = time.time()
        self.claimed: dict[str, str] = {}  # job id -> stored JSON, between a claim and its run
        # When the last successful renewal was sent: the leases held here last until at least
        # then + KLIPSTREAM_LEASE_SECONDS by the database's clock (it set the expiry later still).
        self.last_renewed = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._claim_warned = False
        self.watched: dict[str, _Watch] = {}
        self._follower: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # a followed job has new events (a notification): read them now
        self._fresh: set[str] = set()  # the followed jobs notified since the last read
        self.notified = False  # LISTEN/NOTIFY works; else polling alone

    async def start(self) -> None:
        self.notified = self.settings.database_notify and await self.store.listen(self._on_change)
        if self.settings.database_notify and not self.notified:
            log.warning(
                "LISTEN/NOTIFY does not reach this instance (a transaction-pooling proxy such as PgBouncer?): "
                "it learns of other instances' jobs by polling (claims every %g s, streams every %g s)",
                self.settings.claim_poll_seconds,
                STREAM_POLL_SECONDS,
            )
        await self.store.heartbeat_instance(self._beat())
        await self._count_queue()
        self._task = asyncio.create_task(self._loop(), name="cluster-heartbeat")
        self._watchdog = asyncio.create_task(self._watch_leases(), name="cluster-lease-watchdog")
        log.info(
            "instance %s joined the cluster (%s)",
            self.id,
            f"runs up to {self.settings.max_running_jobs} jobs" if self.settings.max_running_jobs else "API only",
        )

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            self._follower = None
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._watchdog = None
        with contextlib.suppress(Exception):  # gone from the list; its row would age out anyway
            await asyncio.wait_for(self.store.remove_instance(self.id), 2)

    def _on_change(self, payload: str) -> None:
        """Jobs changed on some instance: a new or re-queued one may wait for a worker here, and a
        followed one ("job_id:seq", sent with its events) has events for this instance's streams."""
        self.service.queue.poke()
        if not self.watched:
            return
        if payload == "*":
            self._fresh.update(self.watched)
            self._changed.set()
            return
        for item in payload.split(","):
            job_id, colon, seq = item.partition(":")
            watch = self.watched.get(job_id)
            if watch is None or not colon or not seq.isdigit():
                continue
            cursor = watch.feed.cursor(job_id)
            if cursor is None or int(seq) > cursor:
                self._fresh.add(job_id)
                self._changed.set()

    # --- streams of jobs running elsewhere: their stored events (notified, else polled) ---
    def watch(self, job_id: str, feed: EventFeed) -> Callable[[], None]:
        """Follow a job's events for this instance's streams: when notified (or every
        STREAM_POLL_SECONDS), the rows after the feed's cursor are read from the table and
        published to the feed. Skipped while the job runs here (its runner publishes them)."""
        watch = self.watched.get(job_id)
        if watch is None:
            watch = self.watched[job_id] = _Watch(feed)
        watch.subscribers += 1
        if self._follower is None or self._follower.done():
            self._follower = asyncio.create_task(self._follow(), name="cluster-streams")

        def release() -> None:
            watch.subscribers -= 1
            if watch.subscribers <= 0 and self.watched.get(job_id) is watch:
                del self.watched[job_id]

        return release

    async def _follow(self) -> None:
        poll = STREAM_NOTIFIED_POLL_SECONDS if self.notified else STREAM_POLL_SECONDS
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + poll
        while self.watched:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, next_poll - loop.time()))
            self._changed.clear()
            if loop.time() >= next_poll:  # every followed job
                jobs, next_poll = set(self.watched), loop.time() + poll
            else:  # the notified ones
                jobs = self._fresh & set(self.watched)
            self._fresh.clear()
            cursors = {}
            for job_id in jobs:
                watch = self.watched[job_id]
                cursor = watch.feed.cursor(job_id)
                if cursor is not None and job_id not in self.service.runs:  # running here: its runner publishes
                    cursors[job_id] = cursor
            if not cursors:
                continue
            try:
                rows = await self.store.events_after(cursors)
            except Exception as exc:  # the next poll tries again; streams keep their heartbeats
                log.warning("reading followed jobs' events failed: %s", exc)
                continue
            for job_id in cursors:
                watch = self.watched.get(job_id)
                mine = [row for row in rows if row.job_id == job_id]
                if watch is not None and mine:
                    watch.feed.publish(mine)

    def _beat(self) -> InstanceBeat:
        return InstanceBeat(
            self.id,
            socket.gethostname(),
            os.getpid(),
            self.started_at,
            len(self.service.pool.running),
            self.settings.max_running_jobs,
        )

    # --- claiming (the workers' source of jobs) ---
    async def next_job(self) -> str:
        """The id of a job claimed for this instance; waits while nothing is queued (woken by a
        submission or retry made here, else every KLIPSTREAM_CLAIM_POLL_SECONDS)."""
        queue = self.service.queue
        while True:
            if not queue.paused and not self.service.shutting_down:
                claimed = await self._claim()
                if claimed is not None:
                    job_id, doc = claimed
                    self.claimed[job_id] = doc
                    return job_id
            await queue.wait_changed(self.settings.claim_poll_seconds)

    async def _claim(self) -> tuple[str, str] | None:
        try:
            claimed = await self.store.claim(self.id, self.settings.lease_seconds, self.settings.aging_seconds)
        except DatabaseUnavailable as exc:
            if not self._claim_warned:
                log.warning("cannot claim jobs: %s", exc.message)
                self._claim_warned = True
            return None
        self._claim_warned = False
        return claimed

    # --- heartbeat: leases, cancels, reaper ---
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as exc:
                log.warning("cluster heartbeat failed: %s", exc.message)
                self._stop_if_lease_expired()
            except Exception:  # the next beat tries again; nothing here may stop the instance
                log.exception("cluster heartbeat failed")
                self._stop_if_lease_expired()

    async def tick(self) -> None:
        held = set(self.store.leased())
        sent = time.monotonic()
        alive = await self.store.renew(self.settings.lease_seconds)
        self.last_renewed = sent
        for job_id in held:
            if job_id not in alive:
                self._lost(job_id)
            elif alive[job_id]:
                self._cancel_requested(job_id)
        reaped = await self.store.reap()
        if reaped:
            log.warning("re-queued %d jobs whose lease expired: %s", len(reaped), ", ".join(reaped))
            self.service.queue.poke()
        await self.store.heartbeat_instance(self._beat())
        await self._count_queue()
        if self.notified and not self.store.listening():
            await self._listen_again()

    async def _listen_again(self) -> None:
        """The LISTEN connection was lost (the database restarted): listen on a new one, so that
        other instances' changes wake this one again rather than only its polling."""
        log.warning("the connection receiving job change notifications was lost; listening again")
        self.notified = await self.store.listen(self._on_change)
        if not self.notified:
            log.warning("job change notifications no longer arrive; this instance polls")

    async def _count_queue(self) -> None:
        self.service.queue.shared_counts = await self.store.queued_counts()

    def _lost(self, job_id: str) -> None:
        run = self.service.runs.get(job_id)
        if run is not None and run.job.status is JobStatus.RUNNING:
            log.error("lost the lease of a running job; stopping it here", extra={"job_id": job_id})
            run.lease_lost()
        elif run is None and job_id in self.service.pool.running:  # claimed, not started: never start it
            self.service.lost_before_start.add(job_id)

    def _cancel_requested(self, job_id: str) -> None:
        run = self.service.runs.get(job_id)
        if run is not None:
            if run.cancel_reason is None:
                run.cancel_reason = CancelReason.USER
                self.service.pool.cancel(job_id)
        elif job_id in self.service.pool.running:
            self.service.cancel_before_start.add(job_id)

    async def _watch_leases(self) -> None:
        """Stop this instance's runs before their leases can expire, whatever holds up the
        heartbeat: a renewal waiting on a slow database (up to its timeout), a starved event loop,
        an outage. The heartbeat checks only between its beats; this checks every half beat."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds / 2)
            self._stop_if_lease_expired()

    def _stop_if_lease_expired(self) -> None:
        """No renewal for nearly a whole lease: stop the runs here, one heartbeat before another
        instance's reaper may give their jobs to someone else, so that no stage of a job runs on
        two instances at once (the margin covers the stop itself)."""
        if time.monotonic() - self.last_renewed <= self.settings.lease_seconds - self.settings.heartbeat_seconds:
            return
        for job_id, run in list(self.service.runs.items()):
            if run.job.status is JobStatus.RUNNING:
                log.error("leases not renewed for %.0f s; stopping the job here", self.settings.lease_seconds)
                run.lease_lost()
                self.store.release(job_id)
