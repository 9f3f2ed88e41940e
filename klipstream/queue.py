"""The in-memory priority queue of job ids and the worker pool that drains it.

The queue is only an index: the job store is written first, and on start the queue is rebuilt
from it. Priorities are FIFO lanes; a job's effective priority grows by one level for every
`aging_seconds` it waits, so a low job cannot starve behind a stream of urgent ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from klipstream.models import Priority

log = logging.getLogger(__name__)


@dataclass(slots=True)
class QueueEntry:
    job_id: str
    priority: Priority
    seq: int
    enqueued_at: float  # time.monotonic()
    removed: bool = field(default=False)

    def score(self, now: float, aging_seconds: float) -> float:
        return self.priority.level + (now - self.enqueued_at) / aging_seconds


class QueueFull(Exception):
    """The queue holds its configured maximum; the client should retry later."""


class JobQueue:
    def __init__(self, *, maxsize: int, aging_seconds: float) -> None:
        self.maxsize = maxsize
        self.aging_seconds = aging_seconds
        self._lanes: dict[Priority, deque[QueueEntry]] = {p: deque() for p in Priority}
        self._entries: dict[str, QueueEntry] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self.paused = False
        self._lane_counts = {p: 0 for p in Priority}
        self._positions: dict[str, int] = {}
        self._positions_at = -1.0

    def pause(self) -> None:
        """Stop handing out jobs; running ones are not affected."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._changed.set()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries

    def push(self, job_id: str, priority: Priority, *, waited: float = 0.0, force: bool = False) -> int:
        """Add a job; `waited` credits time already spent queued (kept across restarts)."""
        if not force and len(self._entries) >= self.maxsize:
            raise QueueFull
        self._seq += 1
        entry = QueueEntry(job_id, priority, self._seq, time.monotonic() - max(0.0, waited))
        self._lanes[priority].append(entry)
        self._entries[job_id] = entry
        self._lane_counts[priority] += 1
        self._changed.set()
        return self._estimate(entry)

    def remove(self, job_id: str) -> bool:
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        self._lane_counts[entry.priority] -= 1
        entry.removed = True  # dropped lazily when it reaches the head of its lane
        return True

    def _heads(self) -> list[QueueEntry]:
        heads = []
        for lane in self._lanes.values():
            while lane and lane[0].removed:
                lane.popleft()
            if lane:
                heads.append(lane[0])
        return heads

    def pop_nowait(self) -> str | None:
        heads = self._heads()
        if not heads:
            return None
        now = time.monotonic()
        best = max(heads, key=lambda e: (e.score(now, self.aging_seconds), -e.seq))
        self._lanes[best.priority].popleft()
        del self._entries[best.job_id]
        self._lane_counts[best.priority] -= 1
        return best.job_id

    async def pop(self) -> str:
        while True:
            job_id = None if self.paused else self.pop_nowait()
            if job_id is not None:
                return job_id
            self._changed.clear()
            await self._changed.wait()

    def position(self, job_id: str) -> int | None:
        """1-based place in line as things stand (ageing may still move it).

        Ranking every entry costs O(n log n), so the ranking is shared by all callers for a while;
        a job queued since then gets its lane-based estimate.
        """
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        now = time.monotonic()
        # Re-rank at most every 0.25 s, and less often for very long queues (sorting 50,000
        # entries takes tens of milliseconds of event loop).
        if now - self._positions_at > max(0.25, len(self._entries) / 20_000):
            order = sorted(self._entries.values(), key=lambda e: (-e.score(now, self.aging_seconds), e.seq))
            self._positions = {e.job_id: i for i, e in enumerate(order, 1)}
            self._positions_at = now
        return self._positions.get(job_id) or self._estimate(entry)

    def _estimate(self, entry: QueueEntry) -> int:
        """Place of the newest entry of its lane: behind everything in its own and higher lanes."""
        level = entry.priority.level
        return sum(n for p, n in self._lane_counts.items() if p.level >= level)

    def counts(self) -> dict[str, int]:
        return {p.value: n for p, n in self._lane_counts.items()}

    def oldest_age(self) -> float | None:
        if not self._entries:
            return None
        return time.monotonic() - min(e.enqueued_at for e in self._entries.values())


class WorkerPool:
    """`size` workers, each running one job at a time: the global running-jobs limit."""

    def __init__(self, queue: JobQueue, run_job: Callable[[str], Awaitable[None]], size: int) -> None:
        self.queue = queue
        self.run_job = run_job
        self.size = size
        self.running: dict[str, asyncio.Task[None]] = {}
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"worker-{i}") for i in range(self.size)]

    def alive(self) -> bool:
        return bool(self._workers) and all(not w.done() for w in self._workers)

    async def _work(self) -> None:
        while True:
            job_id = await self.queue.pop()
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
