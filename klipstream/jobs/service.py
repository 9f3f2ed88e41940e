"""The job service: submit, look up, cancel and retry jobs; start, recover and drain the workers.

The HTTP handlers and the command line both drive jobs through this one class, so `klipstream
analyze` runs exactly the pipeline the server runs. Every state change is written to the store
before anyone is told about it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic_core import to_json

from klipstream.jobs.progress import compute_progress, initial_stage_states
from klipstream.jobs.runner import CancelReason, JobListener, JobRun, RunnerDeps
from klipstream.jobs.stage import Resource, Stage
from klipstream.jobs.store import IdempotencyRecord, JobRow, JobStore
from klipstream.models import Job, JobStatus, StageStatus, SubmitRequest, SubmitResponse, utcnow
from klipstream.network import video_id_for
from klipstream.queue import JobQueue, QueueFull, WorkerPool

log = logging.getLogger(__name__)
RECENT_JOBS = 500  # finished jobs kept in memory for polling; older ones are read from the store


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
        self.pool = WorkerPool(self.queue, self._run, self.settings.max_running_jobs)
        self.subscriptions: list[Subscription] = []
        self.active: dict[str, Job] = {}
        # New jobs as the JSON they were stored as, until something needs them as a `Job` (a
        # status poll, a cancel, a worker): most are first touched by the worker that runs them,
        # so a submission never pays for building the model.
        self.unparsed: dict[str, str] = {}
        self.recent: OrderedDict[str, Job] = OrderedDict()
        self.active_by_video: dict[str, str] = {}
        self.runs: dict[str, JobRun] = {}
        self.shutting_down = False
        self.shutdown_deadline: float | None = None  # time.monotonic() by which shutdown must end
        self.started = False
        self._inflight_keys: dict[str, tuple[str, asyncio.Future[SubmitOutcome]]] = {}
        self._new_stages = [{"name": s.name, "display": s.display.value} for s in stages]
        self._new_progress: tuple[int, dict[str, Any]] | None = None  # (timings version, progress)
        self.stream_url = stream_url or (lambda job_id: f"{self.base}/api/v1/analysis/{job_id}/stream")
        deps.listener = self._on_job_event

    @property
    def base(self) -> str:
        return self.settings.public_url.rstrip("/")

    # --- lifecycle ---
    async def start(self) -> None:
        await self.store.open()
        for stage, seconds, media in await self.store.stage_runs(time.time() - 7 * 86400):
            self.deps.timings.add(stage, seconds, media)
        await self._recover()
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
        await self.store.close()

    # --- submission ---
    async def submit(self, request: SubmitRequest, *, idempotency_key: str | None = None) -> SubmitOutcome:
        if self.shutting_down:
            raise ShuttingDown
        if idempotency_key:
            fingerprint = body_hash(request.model_dump(mode="json"))
            inflight = self._inflight_keys.get(idempotency_key)
            if inflight is not None:  # the first request with this key is still being answered
                first_fingerprint, first = inflight
                if first_fingerprint != fingerprint:
                    raise IdempotencyConflict
                outcome = await asyncio.shield(first)
                return SubmitOutcome(200, outcome.body, outcome.job_id)
            # Registered before the first await, so concurrent requests with this key wait for us.
            future: asyncio.Future[SubmitOutcome] = asyncio.get_running_loop().create_future()
            self._inflight_keys[idempotency_key] = (fingerprint, future)
            future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            try:
                outcome = await self._submit_once(request, idempotency_key, fingerprint)
                future.set_result(outcome)
                return outcome
            except asyncio.CancelledError:
                future.cancel()
                raise
            except Exception as exc:
                future.set_exception(exc)
                raise
            finally:
                del self._inflight_keys[idempotency_key]
        return await self._submit(request, None, "")

    async def _submit_once(self, request: SubmitRequest, key: str, fingerprint: str) -> SubmitOutcome:
        record = await self.store.get_idempotency(key)
        if record is None:
            return await self._submit(request, key, fingerprint)
        if record.body_hash != fingerprint:
            raise IdempotencyConflict
        return SubmitOutcome(200, record.response, record.job_id)

    async def _submit(self, request: SubmitRequest, key: str | None, fingerprint: str) -> SubmitOutcome:
        video_id = video_id_for(request.url)
        if not request.options.force:
            existing_id = self.active_by_video.get(video_id)
            if existing_id is not None:
                existing = self._job(existing_id)
                assert existing is not None  # active_by_video only names active jobs
                return SubmitOutcome(200, self._submit_body(existing, deduplicated=True), existing.job_id)
        if len(self.queue) >= self.queue.maxsize:
            raise QueueFull
        doc = self._new_job_doc(request, video_id)
        job_id = doc["job_id"]
        encoded = to_json(doc).decode()
        # Tracked before the await, so a concurrent duplicate sees it.
        self.unparsed[job_id] = encoded
        self.active_by_video.setdefault(video_id, job_id)
        body = self._new_job_body(doc, position=self.queue.place_for_new(request.priority))
        record = IdempotencyRecord(key, fingerprint, job_id, body, 202) if key else None
        try:
            await self.store.insert_job(JobRow.new(doc, encoded), record)
        except BaseException:
            self._untrack(job_id, video_id)
            raise
        self.queue.push(job_id, request.priority, force=True)
        if any(s.new_jobs for s in self.subscriptions):
            job = self._job(job_id)
            if job is not None:  # not cancelled in the meantime
                self._emit("queued", job)
        return SubmitOutcome(202, body, job_id)

    def _new_job_doc(self, request: SubmitRequest, video_id: str) -> dict[str, Any]:
        """A new job as plain data, in the shape of `Job`.

        It is encoded once (pydantic-core) for both the store and the response: submission is the
        hot path, and the `Job` model is built only when something reads the job.
        """
        job_id = new_job_id()
        now = utcnow()
        doc: dict[str, Any] = {
            "job_id": job_id,
            "video_id": video_id,
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
        return self._job(job_id) or self.recent.get(job_id)

    def live(self, job_id: str) -> Job | None:
        """The job from memory with its place in the queue brought up to date, or None when it
        has to be read from the store (`get`)."""
        job = self.cached(job_id)
        if job is not None and job.status is JobStatus.QUEUED:
            job.queue_position = self.queue.position(job_id)
        return job

    async def get(self, job_id: str) -> Job:
        job = self.live(job_id)
        if job is None:
            job = await self.store.get_job(job_id)
            if job is None:
                raise JobNotFound(job_id)
            self._remember(job)
        return job

    async def list(self, status: str | None, limit: int, cursor: int | None) -> tuple[list[Job], int | None]:
        rows = await self.store.list_jobs(status, limit + 1, cursor)
        jobs = [self.cached(job.job_id) or job for _, job in rows[:limit]]
        next_cursor = rows[limit - 1][0] if len(rows) > limit else None
        return jobs, next_cursor

    # --- control ---
    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.status.terminal:
            return job
        if self.queue.remove(job_id):
            job.status = JobStatus.CANCELLED
            job.finished_at = utcnow()
            job.queue_position = None
            for state in job.stages:
                if not state.status.done:
                    state.status = StageStatus.CANCELLED
            job.progress = compute_progress(job, self.stages, self.deps.timings)
            await self.store.save_job(job)
            self._emit("cancelled", job)
            return job
        run = self.runs.get(job_id)
        task = self.pool.running.get(job_id)
        if run is not None and task is not None:
            run.cancel_reason = CancelReason.USER
            task.cancel()
            await asyncio.wait([task], timeout=2.5)
        return job

    async def retry(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise InvalidTransition(f"only failed or cancelled jobs can be retried; this one is {job.status.value}")
        if not job.options.force and job.video_id in self.active_by_video:
            raise InvalidTransition("another job for this video is already queued or running")
        if len(self.queue) >= self.queue.maxsize:
            raise QueueFull
        job.status = JobStatus.QUEUED
        job.error = None
        job.finished_at = None
        job.retry_count += 1
        for state in job.stages:
            if state.status in (StageStatus.FAILED, StageStatus.CANCELLED, StageStatus.SKIPPED):
                state.status = StageStatus.PENDING
                state.error = None
        job.progress = compute_progress(job, self.stages, self.deps.timings)
        job.updated_at = utcnow()
        self.recent.pop(job_id, None)
        self._track(job)
        await self.store.save_job(job)
        self.queue.push(job_id, job.priority)
        job.queue_position = self.queue.position(job_id)
        self._emit("queued", job)
        return job

    # --- running ---
    async def _run(self, job_id: str) -> None:
        job = self._job(job_id)
        if job is None:  # cancelled while queued, or a stale entry
            return
        self._warm_up()
        run = JobRun(self.deps, self.stages, job)
        self.runs[job_id] = run
        try:
            await run.run()
        finally:
            self.runs.pop(job_id, None)
            if job.status is JobStatus.QUEUED and not self.shutting_down:
                self.queue.push(job_id, job.priority, force=True)

    def _warm_up(self) -> None:
        """Start the transcription workers when a job starts, so loading the model overlaps the
        download and decode instead of delaying the transcription stage."""
        transcriber = self.deps.transcriber
        if transcriber is not None and any(s.resource is Resource.TRANSCRIPTION for s in self.stages):
            task = asyncio.create_task(transcriber.start())
            task.add_done_callback(_log_warm_up_failure)

    # --- bookkeeping ---
    def listen(self, listener: JobListener, *, new_jobs: bool = True) -> None:
        self.subscriptions.append(Subscription(listener, new_jobs))

    def unlisten(self, listener: JobListener) -> None:
        self.subscriptions = [s for s in self.subscriptions if s.listener is not listener]

    def _track(self, job: Job) -> None:
        self.active[job.job_id] = job
        self.active_by_video.setdefault(job.video_id, job.job_id)

    def _untrack(self, job_id: str, video_id: str) -> None:
        self.active.pop(job_id, None)
        self.unparsed.pop(job_id, None)
        if self.active_by_video.get(video_id) == job_id:
            del self.active_by_video[video_id]

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
            self._untrack(job.job_id, job.video_id)
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
