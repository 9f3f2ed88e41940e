"""The in-memory priority queue of job ids and the worker pool that drains it.

The queue is only an index: the job store is written first, and on start the queue is rebuilt
from it. Priorities are lanes; a job's effective priority grows by one level for every
`aging_seconds` it waits, so a low job cannot starve behind a stream of urgent ones.

Every waiting job's score grows at the same rate, so the order of the jobs already queued never
changes with time: job x goes before job y exactly when x's lane level minus its enqueue time
(in ageing units) is larger. Each lane is therefore a sorted list by enqueue time, and a job's
place in line is one binary search per lane, with no re-sorting on the event loop however
long the queue is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sortedcontainers import SortedList

from klipstream.models import Priority

log = logging.getLogger(__name__)

# An entry of a lane: (enqueued_at (time.monotonic()), seq, job_id). Sorted by time, then arrival.
Entry = tuple[float, int, str]


class QueueFull(Exception):
    """The queue holds its configured maximum; the client should retry later."""


class JobQueue:
    def __init__(self, *, maxsize: int, aging_seconds: float) -> None:
        self.maxsize = maxsize
        self.aging_seconds = aging_seconds
        self._lanes: dict[Priority, SortedList[Entry]] = {p: SortedList() for p in Priority}
        # job id -> (priority value, entry). Plain strings and numbers only: the cyclic garbage
        # collector stops tracking such tuples, so 100,000 queued jobs add nothing to the objects
        # a full collection walks (an enum member in the tuple kept every one of them tracked).
        self._entries: dict[str, tuple[str, Entry]] = {}
        self._seq = 0
        self._reserved = 0  # places promised to submissions and retries still writing to the store
        # Jobs waiting in a shared store's queue, by priority, as last counted (klipstream.jobs.cluster):
        # with several instances the queue is the database's and this one stays empty.
        self.shared_counts: dict[str, int] = {}
        self._changed = asyncio.Event()
        self.paused = False
        # Places already computed, valid while the queue is unchanged: jobs run for minutes, so
        # most polls of a queued job find the queue as the previous poll left it.
        self._version = 0
        self._places: dict[str, tuple[int, int]] = {}

    def pause(self) -> None:
        """Stop handing out jobs; running ones are not affected."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._changed.set()

    def __len__(self) -> int:
        return len(self._entries) + sum(self.shared_counts.values())

    def poke(self) -> None:
        """Wake whoever waits for work: a job entered a shared queue."""
        self._changed.set()

    async def wait_changed(self, timeout: float) -> None:
        """Until the queue changes (a push, a resume, a poke) or `timeout` passes."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries

    def reserve(self) -> None:
        """Promise one place before an await (the store write), so concurrent submissions and
        retries cannot all pass the bound check and overfill the queue. Undo with `release()`, or
        consume with `push(..., reserved=True)`."""
        if self.full():
            raise QueueFull
        self._reserved += 1

    def release(self) -> None:
        self._reserved = max(0, self._reserved - 1)

    def full(self) -> bool:
        return len(self) + self._reserved >= self.maxsize

    def push(
        self, job_id: str, priority: Priority, *, waited: float = 0.0, force: bool = False, reserved: bool = False
    ) -> None:
        """Add a job; `waited` credits time already spent queued (kept across restarts).

        `reserved`: the place was promised by `reserve()`; `force`: ignore the bound (recovery)."""
        if reserved:
            self.release()
        elif not force and self.full():
            raise QueueFull
        self._seq += 1
        entry = (time.monotonic() - max(0.0, waited), self._seq, job_id)
        self._lanes[priority].add(entry)
        self._entries[job_id] = (priority.value, entry)
        self._version += 1
        self._changed.set()

    def place_for_new(self, priority: Priority) -> int:
        """The place a job of `priority` queued now would take: behind everything of its own
        level, and behind lower levels only as far as their ageing has carried them."""
        ahead = sum(n for p, n in self.shared_counts.items() if Priority(p).level >= priority.level)
        return ahead + self._place(priority, (time.monotonic(), self._seq + 1, ""))

    def remove(self, job_id: str) -> bool:
        found = self._entries.pop(job_id, None)
        if found is None:
            return False
        priority, entry = found
        self._lanes[Priority(priority)].remove(entry)
        self._forget(job_id)
        return True

    def pop_nowait(self) -> str | None:
        """The job with the highest aged priority; the earliest arrival among equals."""
        best: tuple[float, int, Priority] | None = None
        for priority, lane in self._lanes.items():
            if lane:
                enqueued_at, seq, _ = lane[0]
                # Larger is better; `now` is common to all jobs, so it can be left out.
                rank = (priority.level - enqueued_at / self.aging_seconds, -seq, priority)
                if best is None or rank[:2] > best[:2]:
                    best = rank
        if best is None:
            return None
        _, _, job_id = self._lanes[best[2]].pop(0)
        del self._entries[job_id]
        self._forget(job_id)
        return job_id

    def _forget(self, job_id: str) -> None:
        self._version += 1
        self._places.pop(job_id, None)

    async def pop(self) -> str:
        while True:
            job_id = None if self.paused else self.pop_nowait()
            if job_id is not None:
                return job_id
            self._changed.clear()
            await self._changed.wait()

    def position(self, job_id: str) -> int | None:
        """1-based place in line as things stand (jobs queued later at a higher level, or an
        ageing credit, can still move it)."""
        found = self._entries.get(job_id)
        if found is None:
            return None
        known = self._places.get(job_id)
        if known is not None and known[0] == self._version:
            return known[1]
        place = self._place(Priority(found[0]), found[1])
        self._places[job_id] = (self._version, place)
        return place

    def _place(self, priority: Priority, entry: Entry) -> int:
        """1 + the number of queued jobs that go first: in each lane, those that entered early
        enough that the lane's level difference is made up by their longer wait."""
        enqueued_at, seq, _ = entry
        ahead = 0
        for other, lane in self._lanes.items():
            if lane:
                cutoff = enqueued_at + (other.level - priority.level) * self.aging_seconds
                ahead += lane.bisect_left((cutoff, seq, ""))
        return ahead + 1

    def counts(self) -> dict[str, int]:
        return {p.value: len(lane) + self.shared_counts.get(p.value, 0) for p, lane in self._lanes.items()}

    def oldest_age(self) -> float | None:
        heads = [lane[0][0] for lane in self._lanes.values() if lane]
        return time.monotonic() - min(heads) if heads else None


class WorkerPool:
    """`size` workers, each running one job at a time: the global running-jobs limit."""

    def __init__(
        self,
        queue: JobQueue,
        run_job: Callable[[str], Awaitable[None]],
        size: int,
        next_job: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.queue = queue
        self.run_job = run_job
        self.size = size  # 0: an API-only instance, no workers
        # Where a free worker gets its next job: this process's queue, or a claim from a shared store.
        self.next_job = next_job or queue.pop
        self.running: dict[str, asyncio.Task[None]] = {}
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"worker-{i}") for i in range(self.size)]

    def alive(self) -> bool:
        if self.size == 0:
            return True  # nothing to run here by design
        return bool(self._workers) and all(not w.done() for w in self._workers)

    async def _work(self) -> None:
        while True:
            job_id = await self.next_job()
            task = asyncio.create_task(self.run_job(job_id), name=f"job-{job_id}")
            self.running[job_id] = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():  # the worker itself is being stopped
                    raise
            except Exception:  # the runner records job failures itself; this is a bug, keep the worker
                log.exception("job runner crashed", extra={"job_id": job_id})
            finally:
                self.running.pop(job_id, None)

    def cancel(self, job_id: str) -> bool:
        task = self.running.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
