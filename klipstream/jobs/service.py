"""The job service: submit, look up, cancel and retry jobs; start, recover and drain the workers.

The HTTP handlers and the command line both drive jobs through this one class, so `klipstream
analyze` runs exactly the pipeline the server runs. Every state change is written to the store
before anyone is told about it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pydantic_core import to_json

from klipstream.errors import DatabaseUnavailable
from klipstream.jobs.cluster import Cluster
from klipstream.jobs.progress import compute_progress, initial_stage_states
from klipstream.jobs.runner import CancelReason, Committed, EffectsOf, JobListener, JobRun, RunnerDeps
from klipstream.jobs.stage import Resource, Stage
from klipstream.jobs.store import (
    NO_EFFECTS,
    Effects,
    EventRow,
    IdempotencyRecord,
    JobRow,
    JobStore,
    SharedJobStore,
    StoreStalled,
)
from klipstream.models import (
    RESULT_NEUTRAL_OPTIONS,
    Job,
    JobOptions,
    JobStatus,
    Priority,
    StageStatus,
    SubmitRequest,
    SubmitResponse,
    utcnow,
)
from klipstream.network import video_id_for
from klipstream.queue import JobQueue, WorkerPool

log = logging.getLogger(__name__)
RECENT_JOBS = 500  # finished jobs kept in memory for polling; older ones are read from the store
CANCEL_WAIT_SECONDS = 2.5  # how long a cancel waits for the job to stop (here or on its instance)
READ_CACHE_SECONDS = 0.25  # shared store: how long a job read from it answers polls of the job
READ_CACHE_SIZE = 10_000
STORE_WAIT_SECONDS = 30.0  # how long a duplicate submission waits for the first one's row


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


class JobNotFound(Exception):
    pass


class InvalidTransition(Exception):
    """E.g. retrying a job that is still running."""


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class Subscription:
    listener: JobListener
    # Also called when a job is first queued. That event makes the service parse the new job
    # into a `Job` during the request, so only listeners that act on new jobs ask for it.
    new_jobs: bool


class EffectsProducer(Protocol):
    """Makes the rows a job change writes in the same transaction as the job (the store's
    `Effects`), and learns when they committed (klipstream.jobs.events.StreamEvents)."""

    def effects(self, kind: str | None, job: Job) -> Effects: ...
    def committed(self, job: Job, effects: Effects) -> None: ...


class EventFeed(Protocol):
    """Where the stored events of a job followed here go (the broadcaster), and from which event
    on: klipstream.jobs.cluster reads the newer ones from the table."""

    def cursor(self, job_id: str) -> int | None: ...
    def publish(self, rows: list[EventRow]) -> None: ...


class SubmitOutcome(NamedTuple):
    status: int  # 202 new, 200 deduplicated or idempotent replay
    body: str  # JSON, exactly what the client gets (and what an idempotent replay gets again)
    job_id: str


_ID_RANDOM = random.Random(os.urandom(32))  # seeded once, not a getrandom() call per job


def new_job_id() -> str:
    """Time-ordered and unique: 12 hex digits of milliseconds, then 48 random bits.

    Ids are names, not secrets (access is by API key), so a seeded generator is enough.
    """
    return f"{int(time.time() * 1000):012x}{_ID_RANDOM.getrandbits(48):012x}"


def _log_warm_up_failure(task: asyncio.Task[None]) -> None:
    # The transcription stage reports a pool that cannot start; this is only the early attempt.
    if not task.cancelled() and task.exception() is not None:
        log.warning("transcription workers could not be started ahead of time: %s", task.exception())


def body_hash(payload: Any) -> str:
    return hashlib.sha256(repr(payload).encode()).hexdigest()


def dedup_key(video_id: str, chat_url: str | None, options: JobOptions) -> str:
    """The key under which submissions share one active job: the video id, plus a digest of every
    option that changes the results (all of them but RESULT_NEUTRAL_OPTIONS, so an option added
    later counts by default). A plain string, derivable from the stored job, so a database can put
    a unique index on (key) over active jobs."""
    if not options.model_fields_set and chat_url is None:
        return video_id  # the common case, without dumping the options
    affecting = {k: v for k, v in options.model_dump(exclude_defaults=True).items() if k not in RESULT_NEUTRAL_OPTIONS}
    if chat_url is not None and chat_url.strip():
        affecting["chat_url"] = chat_url.strip()
    if not affecting:
        return video_id
    canonical = json.dumps(affecting, sort_keys=True, separators=(",", ":"))
    return f"{video_id}:{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def job_dedup_key(job: Job) -> str:
    """A stored job's key (jobs stored before keys existed get theirs derived)."""
    return job.dedup_key or dedup_key(job.video_id, job.chat_url, job.options)


class JobService:
    def __init__(
        self,
        deps: RunnerDeps,
        stages: list[Stage],
        *,
        stream_url: Callable[[str], str] | None = None,
    ) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.store: JobStore = deps.store
        self.stages = stages
        self.queue = JobQueue(maxsize=self.settings.max_queued_jobs, aging_seconds=self.settings.aging_seconds)
        # With a shared store (several instances) the queue is the database's: workers claim from
        # it, and memory holds only the jobs running here (klipstream.jobs.cluster).
        self.shared: SharedJobStore | None = self.store if getattr(self.store, "shared", False) else None  # type: ignore[assignment]
        self.cluster = Cluster(self, self.shared) if self.shared is not None else None
        self.pool = WorkerPool(
            self.queue,
            self._run,
            self.settings.max_running_jobs,
            self.cluster.next_job if self.cluster is not None else None,
        )
        self.subscriptions: list[Subscription] = []
        self.active: dict[str, Job] = {}
        # New jobs as the JSON they were stored as, until something needs them as a `Job` (a
        # status poll, a cancel, a worker): most are first touched by the worker that runs them,
        # so a submission never pays for building the model.
        self.unparsed: dict[str, str] = {}
        self.recent: OrderedDict[str, Job] = OrderedDict()
        self._reads: dict[str, tuple[float, Job]] = {}  # shared store: job id -> (monotonic time, job read)
        self.active_by_key: dict[str, str] = {}  # dedup key -> the active job that answers it
        self.runs: dict[str, JobRun] = {}
        # Popped by a worker but not started yet when a DELETE came: the worker ends them cancelled.
        self.cancel_before_start: set[str] = set()
        # Claimed but not started yet when their lease was lost: the worker drops them.
        self.lost_before_start: set[str] = set()
        # Inserts in flight (job id -> None, or the future a duplicate submission waits on until the
        # first one's row is written or refused): no future is made unless a duplicate comes.
        self._inserting: dict[str, asyncio.Future[None] | None] = {}
        self.shutting_down = False
        self.shutdown_deadline: float | None = None  # time.monotonic() by which shutdown must end
        self.started = False
        self._inflight_keys: dict[str, tuple[str, asyncio.Future[SubmitOutcome]]] = {}
        self._new_stages = [{"name": s.name, "display": s.display.value} for s in stages]
        self._new_progress: tuple[int, dict[str, Any]] | None = None  # (timings version, progress)
        self.stream_url = stream_url or (lambda job_id: f"{self.base}/api/v1/analysis/{job_id}/stream")
        # What each job change writes in its own transaction (add_effects): (producer, whether it
        # also wants the "queued" change of a new job, which makes a submission parse its job).
        self.producers: list[tuple[EffectsOf, bool]] = []
        self._on_commit: list[Committed] = []  # told once a change's effects committed (add_effects)
        self._closing: list[Callable[[float], Awaitable[None]]] = []  # before_store_closes
        deps.listener = self._on_job_event
        deps.effects = self.effects
        deps.committed = self._committed

    @property
    def base(self) -> str:
        return self.settings.public_url.rstrip("/")

    # --- lifecycle ---
    async def start(self) -> None:
        await self.store.open()
        for stage, seconds, media in await self.store.stage_runs(time.time() - 7 * 86400):
            self.deps.timings.add(stage, seconds, media)
        if self.cluster is None:
            await self._recover()
        else:  # other instances' running jobs are theirs: expired leases come back through the reaper
            await self.cluster.start()
        self.pool.start()
        self.started = True

    async def _recover(self) -> None:
        """Rebuild the queue from the store: queued jobs in order, interrupted jobs resumed."""
        for job in await self.store.active_jobs():
            if job.status is JobStatus.RUNNING:
                job.status = JobStatus.QUEUED
                for state in job.stages:
                    if state.status is StageStatus.RUNNING:
                        state.status = StageStatus.PENDING
                await self.store.save_job(job)
            waited = max(0.0, time.time() - job.created_at.timestamp())
            self.queue.push(job.job_id, job.priority, waited=waited, force=True)
            self._track(job)
        if self.active:
            log.info("recovered %d unfinished jobs", len(self.active))

    async def shutdown(self, deadline: float) -> None:
        """Stop taking work, checkpoint running jobs back to queued, close the store by `deadline`."""
        self.shutting_down = True
        self.shutdown_deadline = deadline
        self.queue.pause()
        for job_id, run in list(self.runs.items()):
            run.cancel_reason = CancelReason.SHUTDOWN
            self.pool.cancel(job_id)
        running = list(self.pool.running.values())
        if running:
            await asyncio.wait(running, timeout=max(0.1, deadline - time.monotonic() - 2.5))
        await self.pool.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        for close in self._closing:
            try:
                await close(max(0.5, min(2.0, deadline - time.monotonic() - 1.0)))
            except Exception:
                log.exception("closing before the store failed")
        await self.store.close()

    # --- submission ---
    async def submit(
        self, request: SubmitRequest, *, idempotency_key: str | None = None, owner: str = ""
    ) -> SubmitOutcome:
        """Accept a job (202), or answer with the active job of the same video and options (200).

        `owner` is a hash of the API key that made the request: an Idempotency-Key is scoped to it,
        so another client's key can neither replay nor block this one.
        """
        if self.shutting_down:
            raise ShuttingDown
        if idempotency_key:
            scoped = f"{owner}:{idempotency_key}"
            fingerprint = body_hash(request.model_dump(mode="json"))
            inflight = self._inflight_keys.get(scoped)
            if inflight is not None:  # the first request with this key is still being answered
                first_fingerprint, first = inflight
                if first_fingerprint != fingerprint:
                    raise IdempotencyConflict
                outcome = await asyncio.shield(first)
                return SubmitOutcome(200, outcome.body, outcome.job_id)
            # Registered before the first await, so concurrent requests with this key wait for us.
            future: asyncio.Future[SubmitOutcome] = asyncio.get_running_loop().create_future()
            self._inflight_keys[scoped] = (fingerprint, future)
            future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            try:
                outcome = await self._submit_once(request, IdempotencyRecord(scoped, fingerprint, "", "", 0, owner))
                future.set_result(outcome)
                return outcome
            except asyncio.CancelledError:
                future.cancel()
                raise
            except Exception as exc:
                future.set_exception(exc)
                raise
            finally:
                del self._inflight_keys[scoped]
        return await self._submit(request, None)

    async def _submit_once(self, request: SubmitRequest, key: IdempotencyRecord) -> SubmitOutcome:
        record = await self.store.get_idempotency(key.key)
        if record is None:
            return await self._submit(request, key)
        if record.body_hash != key.body_hash:
            raise IdempotencyConflict
        return SubmitOutcome(200, record.response, record.job_id)

    async def _submit(
        self, request: SubmitRequest, key: IdempotencyRecord | None, *, separate: bool = False
    ) -> SubmitOutcome:
        """`separate`: a job of its own although an active job has the key (see `_lost_race`).

        With a shared store a duplicate of a job this instance does not hold is found by the
        unique index over active keys when the insert is refused, not by a read before it: the
        common case, a new video, costs no extra round trip."""
        video_id = video_id_for(request.url)
        dedup = dedup_key(video_id, request.chat_url, request.options)
        if not request.options.force and not separate:
            existing = await self._active_for(dedup) if dedup in self.active_by_key else None
            if existing is not None:
                if request.callback_url:
                    await self._attach_callback(existing, request.callback_url)
                position = await self._shared_place(existing) if self.shared is not None else None
                body = self._submit_body(existing, deduplicated=True, position=position)
                return SubmitOutcome(200, body, existing.job_id)
        if self.shared is None:
            # raises QueueFull; the place is held across the store write. A shared store holds the
            # bound itself, across instances: its insert raises QueueFull.
            self.queue.reserve()
        try:
            doc = self._new_job_doc(request, video_id, dedup)
            if separate:  # a key of its own: the unique index over active keys must not refuse it
                doc["dedup_key"] = f"{dedup}#{doc['job_id']}"
            encoded = to_json(doc).decode()
            body = self._new_job_body(doc, position=self.queue.place_for_new(request.priority))
        except BaseException:
            self.queue.release()
            raise
        job_id = doc["job_id"]
        record = dataclasses.replace(key, job_id=job_id, response=body, status=202) if key else None
        # Tracked before the await, so a concurrent duplicate sees it (and waits for the insert).
        self.unparsed[job_id] = encoded
        self.active_by_key.setdefault(dedup, job_id)
        self._inserting[job_id] = None
        try:
            await self.store.insert_job(JobRow.new(doc, encoded), record, self._new_job_effects(encoded))
        except StoreStalled as stalled:
            # The row may still commit: the job stays tracked (and its place held) until the store
            # says, so a duplicate, or a retry with the same Idempotency-Key, finds it.
            stalled.outcome.add_done_callback(lambda done: self._late_insert(done, job_id, dedup, request.priority))
            raise
        except BaseException as exc:
            self._untrack(job_id, dedup)
            self._inserted(job_id)
            self.queue.release()
            if self.shared is not None and isinstance(exc, Exception) and not isinstance(exc, DatabaseUnavailable):
                lost = await self._lost_race(request, key, dedup, separate)
                if lost is not None:
                    return lost
            raise
        self._inserted(job_id)
        if self.shared is not None:
            self._queued_elsewhere(job_id, dedup, request.priority)
            return SubmitOutcome(202, body, job_id)
        self.queue.push(job_id, request.priority, reserved=True)
        self._announce_new(job_id)
        return SubmitOutcome(202, body, job_id)

    async def _lost_race(
        self, request: SubmitRequest, key: IdempotencyRecord | None, dedup: str, separate: bool
    ) -> SubmitOutcome | None:
        """An insert into the shared store was refused by a unique index: the Idempotency-Key was
        stored by another request, or an active job holds the dedup key. Answer with theirs. A
        new callback can only be attached to a job running here (its runner's memory is the
        job's state), so a submission whose callback an active job elsewhere lacks gets a job of
        its own, under a key of its own."""
        assert self.shared is not None
        if key is not None:
            record = await self.store.get_idempotency(key.key)
            if record is not None:
                if record.body_hash != key.body_hash:
                    raise IdempotencyConflict
                return SubmitOutcome(200, record.response, record.job_id)
        if request.options.force or separate:
            return None
        existing = await self.shared.active_job(dedup)
        if existing is None:
            return None
        run = self.runs.get(existing.job_id)
        callback = request.callback_url
        if run is not None:
            existing = run.job
            if callback:
                await self._attach_callback(existing, callback)
        elif callback and callback != existing.callback_url and callback not in existing.callbacks:
            return await self._submit(request, key, separate=True)
        body = self._submit_body(existing, deduplicated=True, position=await self._shared_place(existing))
        return SubmitOutcome(200, body, existing.job_id)

    def _queued_elsewhere(self, job_id: str, dedup: str, priority: Priority) -> None:
        """A job just stored in the shared queue: wake this instance's claimers, and forget it
        (whichever instance claims it holds it in memory from then on)."""
        self._announce_new(job_id)
        self._untrack(job_id, dedup)
        self.queue.release()
        counts = self.queue.shared_counts
        counts[priority.value] = counts.get(priority.value, 0) + 1
        self.queue.poke()

    async def _requeue_shared(self, again: Job, key: str, effects: Effects) -> bool:
        assert self.shared is not None
        try:
            return await self.shared.requeue_finished(again, effects)
        except DatabaseUnavailable:
            raise
        except Exception:  # the unique index: another job of the key became active meanwhile
            other = await self.shared.active_job(key)
            if other is not None and other.job_id != again.job_id:
                raise InvalidTransition("another job for this video is already queued or running") from None
            raise

    async def _shared_place(self, job: Job) -> int | None:
        assert self.shared is not None
        if job.status is not JobStatus.QUEUED:
            return None
        return await self.shared.queue_place(job.job_id, self.settings.aging_seconds)

    def _late_insert(self, outcome: asyncio.Future[None], job_id: str, dedup: str, priority: Priority) -> None:
        """The store finished an insert after its submission was answered 503: queue the job if the
        row committed (it was accepted after all), forget it if not."""
        if outcome.cancelled() or outcome.exception() is not None:
            self._untrack(job_id, dedup)
            self._inserted(job_id)
            self.queue.release()
            return
        self._inserted(job_id)
        log.info("a submission the store was slow to write committed; queueing it", extra={"job_id": job_id})
        if self.shared is not None:
            self._queued_elsewhere(job_id, dedup, priority)
            return
        self.queue.push(job_id, priority, reserved=True)
        self._announce_new(job_id)

    def _new_job_effects(self, encoded: str) -> Effects:
        """The outbox rows of a new job (its "queued" change), when a producer wants them."""
        if not any(new_jobs for _, new_jobs in self.producers):
            return NO_EFFECTS  # the common case: the submission never builds the model
        job = Job.model_validate_json(encoded)
        return self._compose((producer for producer, new_jobs in self.producers if new_jobs), "queued", job)

    def _announce_new(self, job_id: str) -> None:
        if any(s.new_jobs for s in self.subscriptions):
            job = self._job(job_id)
            if job is not None:  # not cancelled in the meantime
                self._emit("queued", job)

    def _inserted(self, job_id: str) -> None:
        """The insert of `job_id` is settled (written, or refused and untracked): wake duplicates."""
        waiter = self._inserting.pop(job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _active_for(self, dedup: str) -> Job | None:
        """The active job that answers this key, once its row is in the store."""
        while True:
            job_id = self.active_by_key.get(dedup)
            if job_id is None:
                return None
            if job_id not in self._inserting:
                return self._job(job_id)
            # Its first submission is still being written: answer with it only once it exists.
            waiter = self._inserting[job_id]
            if waiter is None:
                waiter = self._inserting[job_id] = asyncio.get_running_loop().create_future()
            await asyncio.wait([waiter], timeout=STORE_WAIT_SECONDS)
            if not waiter.done():
                raise TimeoutError("the job store has not confirmed the job this submission duplicates")

    async def _attach_callback(self, job: Job, url: str) -> None:
        """A deduplicated submission's callback receives the shared job's events from now on."""
        if url == job.callback_url or url in job.callbacks:
            return
        job.callbacks.append(url)
        try:
            await self.store.save_job(job)
        except BaseException:
            job.callbacks.remove(url)
            raise

    def _new_job_doc(self, request: SubmitRequest, video_id: str, dedup: str) -> dict[str, Any]:
        """A new job as plain data, in the shape of `Job`.

        It is encoded once (pydantic-core) for both the store and the response: submission is the
        hot path, and the `Job` model is built only when something reads the job.
        """
        job_id = new_job_id()
        now = utcnow()
        doc: dict[str, Any] = {
            "job_id": job_id,
            "video_id": video_id,
            "dedup_key": dedup,
            "url": request.url,
            "priority": request.priority.value,
            "progress": self._new_job_progress(),
            "stages": self._new_stages,
            "created_at": now,
            "updated_at": now,
            "status_url": f"{self.base}/api/v1/analysis/{job_id}/status",
            "stream_url": self.stream_url(job_id),
        }
        if request.chat_url is not None:
            doc["chat_url"] = request.chat_url
        if request.callback_url is not None:
            doc["callback_url"] = request.callback_url
        if request.options.model_fields_set:
            doc["options"] = request.options.model_dump(exclude_defaults=True)
        return doc

    def _new_job_progress(self) -> dict[str, Any]:
        """Progress of a job that has not started: the same for every new job until the stage
        timings behind its ETA change."""
        version = self.deps.timings.version
        if self._new_progress is None or self._new_progress[0] != version:
            blank = Job(job_id="", video_id="", url="", stages=initial_stage_states(self.stages))
            progress = compute_progress(blank, self.stages, self.deps.timings).model_dump(mode="json")
            self._new_progress = (version, progress)
        return self._new_progress[1]

    @staticmethod
    def _new_job_body(doc: dict[str, Any], position: int) -> str:
        """The 202 body: a `SubmitResponse`, encoded from the new job's plain data."""
        body = {
            "job_id": doc["job_id"],
            "video_id": doc["video_id"],
            "status": "queued",
            "progress": doc["progress"],
            "queue_position": position,
            "status_url": doc["status_url"],
            "stream_url": doc["stream_url"],
            "created_at": doc["created_at"],
            "deduplicated": False,
        }
        return to_json(body).decode()

    def _submit_body(self, job: Job, *, deduplicated: bool, position: int | None = None) -> str:
        return SubmitResponse(
            job_id=job.job_id,
            video_id=job.video_id,
            status=job.status,
            progress=job.progress,
            queue_position=position if position is not None else self.queue.position(job.job_id),
            status_url=job.status_url,
            stream_url=job.stream_url,
            created_at=job.created_at,
            deduplicated=deduplicated,
        ).model_dump_json()

    # --- lookup ---
    def cached(self, job_id: str) -> Job | None:
        if self.shared is not None:  # only a job running here is known better here than in the store
            run = self.runs.get(job_id)
            return run.job if run is not None else None
        return self._job(job_id) or self.recent.get(job_id)

    def live(self, job_id: str) -> Job | None:
        """The job from memory with its place in the queue brought up to date, or None when it
        has to be read from the store (`get`)."""
        job = self.cached(job_id)
        if job is not None and job.status is JobStatus.QUEUED:
            job.queue_position = self.queue.position(job_id)
        return job

    async def get(self, job_id: str, *, fresh: bool = False) -> Job:
        """The job: from memory when it is running here (or, with SQLite, known here), else from
        the store. With a shared store a read is reused for READ_CACHE_SECONDS (polls of one job
        by many clients cost one read), unless `fresh` (cancel and retry decide on it)."""
        job = self.live(job_id)
        if job is not None:
            return job
        if self.shared is not None:
            now = time.monotonic()
            hit = self._reads.get(job_id)
            if hit is not None and not fresh and now - hit[0] < READ_CACHE_SECONDS:
                return hit[1]
        job = await self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if self.shared is not None:
            job.queue_position = await self._shared_place(job)
            self._reads.pop(job_id, None)
            if not fresh:  # a fresh read is the caller's to change
                if len(self._reads) >= READ_CACHE_SIZE:
                    self._reads.clear()
                self._reads[job_id] = (now, job)
        else:
            self._remember(job)
        return job

    async def list(self, status: str | None, limit: int, cursor: int | None) -> tuple[list[Job], int | None]:
        rows = await self.store.list_jobs(status, limit + 1, cursor)
        jobs = [self.cached(job.job_id) or job for _, job in rows[:limit]]
        next_cursor = rows[limit - 1][0] if len(rows) > limit else None
        return jobs, next_cursor

    # --- control ---
    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id, fresh=True)
        if job.status.terminal:
            return job
        if self.shared is not None and job_id not in self.pool.running:
            return await self._cancel_elsewhere(job)
        if self.queue.remove(job_id):
            try:
                await self._cancel_unstarted(job)
            except BaseException:
                self.queue.push(job_id, job.priority, force=True)  # not cancelled: back in line
                raise
            return job
        run = self.runs.get(job_id)
        task = self.pool.running.get(job_id)
        if task is None:
            return job
        if run is not None:
            run.cancel_reason = CancelReason.USER
            task.cancel()
        else:
            # A worker took it from the queue but has not started it: the worker ends it cancelled.
            self.cancel_before_start.add(job_id)
        await asyncio.wait([task], timeout=2.5)
        return job

    async def _cancel_elsewhere(self, job: Job) -> Job:
        """Cancel a job of the shared store that does not run here: a queued one by a conditional
        write (no instance has claimed it), a running one by flagging it for its instance, whose
        heartbeat stops it; then wait (bounded) for it to end."""
        assert self.shared is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_SECONDS
        for _ in range(3):  # the job may change state between the read and the write
            if job.status is JobStatus.QUEUED:
                self._mark_cancelled(job)
                effects = self.effects("cancelled", job)
                if await self.shared.cancel_queued(job, effects):
                    self._committed(job, effects)
                    self._emit("cancelled", job)
                    return job
            elif job.status is JobStatus.RUNNING:
                if await self.shared.request_cancel(job.job_id):
                    break
            else:
                return job
            fresh = await self.store.get_job(job.job_id)
            if fresh is None:
                raise JobNotFound(job.job_id)
            job = fresh
        while loop.time() < deadline and not job.status.terminal:
            await asyncio.sleep(0.1)
            job = await self.store.get_job(job.job_id) or job
        return job

    def _mark_cancelled(self, job: Job) -> None:
        job.status = JobStatus.CANCELLED
        job.finished_at = utcnow()
        job.queue_position = None
        for state in job.stages:
            if not state.status.done:
                state.status = StageStatus.CANCELLED
        job.progress = compute_progress(job, self.stages, self.deps.timings)
        job.updated_at = utcnow()

    async def _cancel_unstarted(self, job: Job) -> None:
        """Cancel a job no stage has run for in this attempt; it stops being the video's active job."""
        before = job.model_copy(deep=True)
        self._mark_cancelled(job)
        effects = self.effects("cancelled", job)
        try:
            await self.store.save_job(job, effects)
        except BaseException:
            for name in Job.model_fields:
                setattr(job, name, getattr(before, name))
            raise
        self._committed(job, effects)
        self._on_job_event("cancelled", job)

    async def retry(self, job_id: str) -> Job:
        job = await self.get(job_id, fresh=True)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise InvalidTransition(f"only failed or cancelled jobs can be retried; this one is {job.status.value}")
        key = job_dedup_key(job)
        if not job.options.force and self.active_by_key.get(key, job_id) != job_id:
            raise InvalidTransition("another job for this video is already queued or running")
        if not job.options.force and self.shared is not None:
            other = await self.shared.active_job(key)
            if other is not None and other.job_id != job_id:
                raise InvalidTransition("another job for this video is already queued or running")
        if self.shared is None:  # a shared store bounds the queue itself (requeue_finished)
            self.queue.reserve()  # raises QueueFull before anything changes
        try:
            again = job.model_copy(deep=True)
            again.status = JobStatus.QUEUED
            again.dedup_key = key
            again.error = None
            again.finished_at = None
            again.retry_count += 1
            for state in again.stages:
                if state.status in (StageStatus.FAILED, StageStatus.CANCELLED, StageStatus.SKIPPED):
                    state.status = StageStatus.PENDING
                    state.error = None
                    state.started_at = None
                    state.finished_at = None
            again.progress = compute_progress(again, self.stages, self.deps.timings)
            again.updated_at = utcnow()
            effects = self.effects("queued", again)
            if self.shared is None:
                await self.store.save_job(again, effects)
            elif not await self._requeue_shared(again, key, effects):
                raise InvalidTransition("the job changed meanwhile (retried on another instance?)")
        except BaseException:
            self.queue.release()
            raise
        self._committed(again, effects)
        if self.shared is not None:
            self.queue.release()
            counts = self.queue.shared_counts
            counts[again.priority.value] = counts.get(again.priority.value, 0) + 1
            self.queue.poke()
            again.queue_position = await self._shared_place(again)
            self._emit("queued", again)
            return again
        self.recent.pop(job_id, None)
        self._track(again)
        self.queue.push(job_id, again.priority, reserved=True)
        again.queue_position = self.queue.position(job_id)
        self._emit("queued", again)
        return again

    # --- running ---
    async def _run(self, job_id: str) -> None:
        if self.shared is not None:
            try:
                await self._run_claimed(job_id)
            finally:
                self.shared.release(job_id)
            return
        job = self._job(job_id)
        if job is None:  # cancelled while queued, or a stale entry
            return
        if job_id in self.cancel_before_start:
            try:
                await self._cancel_unstarted(job)  # forgets the id once the cancellation is stored
            except Exception:
                log.exception("could not store the cancellation; the job goes back in line", extra={"job_id": job_id})
                self.queue.push(job_id, job.priority, force=True)
            return
        try:
            await self._execute(job)
        finally:
            if job.status is JobStatus.QUEUED and not self.shutting_down:
                self.queue.push(job_id, job.priority, force=True)

    async def _run_claimed(self, job_id: str) -> None:
        """Run a job this instance claimed from the shared store, under its lease."""
        assert self.cluster is not None
        doc = self.cluster.claimed.pop(job_id, None)
        if doc is None or job_id in self.lost_before_start:
            self.lost_before_start.discard(job_id)
            return
        job = Job.model_validate_json(doc)
        self._track(job)
        try:
            if job_id in self.cancel_before_start:
                try:
                    await self._cancel_unstarted(job)
                except Exception:  # its lease lapses and the reaper re-queues it
                    log.exception("could not store the cancellation", extra={"job_id": job_id})
                return
            await self._execute(job)
        finally:
            if not job.status.terminal:  # back in the shared queue, or lost: no longer this instance's
                self._untrack(job_id, job_dedup_key(job))

    async def _execute(self, job: Job) -> None:
        """Run a job's stages here, registered in `runs` while they run (cancel finds it there)."""
        self._warm_up()
        run = JobRun(self.deps, self.stages, job)
        self.runs[job.job_id] = run
        try:
            await run.run()
        finally:
            self.runs.pop(job.job_id, None)

    def _warm_up(self) -> None:
        """Start the transcription workers when a job starts, so loading the model overlaps the
        download and decode instead of delaying the transcription stage."""
        transcriber = self.deps.transcriber
        if transcriber is not None and any(s.resource is Resource.TRANSCRIPTION for s in self.stages):
            task = asyncio.create_task(transcriber.start())
            task.add_done_callback(_log_warm_up_failure)

    # --- bookkeeping ---
    def before_store_closes(self, close: Callable[[float], Awaitable[None]]) -> None:
        """`close(budget)` runs at shutdown once the jobs are checkpointed, while the store is open."""
        self._closing.append(close)

    def add_effects(self, producer: EffectsOf, *, new_jobs: bool = False, committed: Committed | None = None) -> None:
        """`producer` makes rows that every job change writes in its own transaction (webhook
        deliveries, Convex updates, job events); `new_jobs`: also for a submission's new job;
        `committed` is told once a change's rows committed (the stream publishes its events)."""
        self.producers.append((producer, new_jobs))
        if committed is not None:
            self._on_commit.append(committed)

    def effects(self, kind: str | None, job: Job) -> Effects:
        """The rows this job change writes with it, from every producer."""
        if not self.producers:
            return NO_EFFECTS
        return self._compose((producer for producer, _ in self.producers), kind, job)

    @staticmethod
    def _compose(producers: Iterable[EffectsOf], kind: str | None, job: Job) -> Effects:
        parts = []
        for producer in producers:
            try:
                parts.append(producer(kind, job))
            except Exception:  # a producer's bug must not stop the job's checkpoint
                log.exception("effects producer failed on %s", kind, extra={"job_id": job.job_id})
        if len(parts) == 1:
            return parts[0]
        return Effects(*(tuple(row for rows in fields for row in rows) for fields in zip(*parts, strict=True)))

    def _committed(self, job: Job, effects: Effects) -> None:
        for committed in self._on_commit:
            try:
                committed(job, effects)
            except Exception:  # one producer's bug must not stop the others
                log.exception("publishing committed effects failed", extra={"job_id": job.job_id})

    def listen(self, listener: JobListener, *, new_jobs: bool = True) -> None:
        self.subscriptions.append(Subscription(listener, new_jobs))

    def watch(self, job_id: str, feed: EventFeed) -> Callable[[], None]:
        """Someone here follows the job (an event stream): with a shared store, while the job does
        not run here, its new stored events are read from the table into `feed`. Returns the
        call that ends the watch."""
        if self.cluster is None:
            return lambda: None
        return self.cluster.watch(job_id, feed)

    def unlisten(self, listener: JobListener) -> None:
        self.subscriptions = [s for s in self.subscriptions if s.listener is not listener]

    def _track(self, job: Job) -> None:
        job.dedup_key = job_dedup_key(job)
        self.active[job.job_id] = job
        self.active_by_key.setdefault(job.dedup_key, job.job_id)

    def _untrack(self, job_id: str, key: str) -> None:
        self.active.pop(job_id, None)
        self.unparsed.pop(job_id, None)
        self.cancel_before_start.discard(job_id)
        if self.active_by_key.get(key) == job_id:
            del self.active_by_key[key]

    def _job(self, job_id: str) -> Job | None:
        """The queued or running job with this id, parsed the first time anything needs it."""
        job = self.active.get(job_id)
        if job is None:
            doc = self.unparsed.pop(job_id, None)
            if doc is not None:
                job = self.active[job_id] = Job.model_validate_json(doc)
        return job

    def _remember(self, job: Job) -> None:
        self.recent[job.job_id] = job
        self.recent.move_to_end(job.job_id)
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    def _on_job_event(self, kind: str, job: Job) -> None:
        if job.status.terminal:
            self._untrack(job.job_id, job_dedup_key(job))
            self._remember(job)
        self._emit(kind, job)

    def _emit(self, kind: str, job: Job) -> None:
        for subscription in self.subscriptions:
            try:
                subscription.listener(kind, job)
            except Exception:  # one listener's bug must not stop the others
                log.exception("listener failed on %s", kind, extra={"job_id": job.job_id})

    # --- statistics ---
    def running_summary(self) -> list[dict[str, Any]]:
        out = []
        for job_id in self.pool.running:
            job = self.active.get(job_id)
            if job is not None:
                stages = [s.name for s in job.stages if s.status is StageStatus.RUNNING]
                out.append(
                    {
                        "job_id": job_id,
                        "video_id": job.video_id,
                        "stages": stages,
                        "percentage": job.progress.percentage,
                    }
                )
        return out

    def queued_counts(self) -> dict[str, int]:
        return self.queue.counts()
