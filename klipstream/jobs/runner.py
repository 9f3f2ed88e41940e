"""Runs one job's stages: as soon as a stage's inputs exist, under per-resource limits.

The pipeline is a list of `Stage` declarations in dependency order. The runner starts every stage
whose needed artifacts exist (so chat runs beside the download, chat analysis beside
transcription), checkpoints each finished stage to the store, publishes its artifacts while later
stages run, retries retryable failures with backoff, and turns everything that happens into job
events. A resumed job (retry, restart, or claimed by another instance) skips the stages whose
outputs are on disk or, with shared storage, restorable from the job's checkpoints
(klipstream.jobs.checkpoints): a completed stage copies there what later stages still need.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klipstream.artifacts import spec
from klipstream.errors import (
    DatabaseUnavailable,
    InsufficientResources,
    InternalError,
    KlipstreamError,
    StageUnavailable,
    StorageError,
    TimeLimitExceeded,
    classify,
)
from klipstream.jobs.checkpoints import CheckpointStore, LocalCheckpoints, consumers
from klipstream.jobs.progress import compute_progress
from klipstream.jobs.stage import ProgressSink, Resource, Stage, StageContext
from klipstream.jobs.store import NO_EFFECTS, Effects, LeaseLost
from klipstream.models import (
    Checkpoint,
    Job,
    JobError,
    JobStatus,
    StageState,
    StageStatus,
    VideoInfo,
    utcnow,
)
from klipstream.retry import RetryPolicy

if TYPE_CHECKING:
    import aiohttp

    from klipstream.config import Settings
    from klipstream.integrations.storage import Storage
    from klipstream.jobs.store import JobStore
    from klipstream.jobs.timings import StageTimings
    from klipstream.transcription.pool import Transcriber

log = logging.getLogger(__name__)

JobListener = Callable[[str, Job], None]  # (event kind, job): started, stage_changed, progress, ...
# The rows a job change writes with the job (event stream rows, ...), by the change's kind (None: a
# checkpoint no one is told about); and what is told they committed.
EffectsOf = Callable[[str | None, Job], Effects]
Committed = Callable[[Job, Effects], None]


def _no_effects(kind: str | None, job: Job) -> Effects:
    return NO_EFFECTS


def _nothing_committed(job: Job, effects: Effects) -> None:
    return None


# A terminal state is written with retries: a job must not stay "running" in the store because
# one write failed. Delays between the attempts, in seconds.
FINAL_SAVE_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)
# A shared store (PostgreSQL) that cannot be reached: a state change is written again after these
# delays (the last one repeating) until the database is back, while the running stages go on.
OUTAGE_SAVE_DELAYS = (0.25, 0.5, 1.0, 2.0)


class CancelReason:
    USER = "user"  # DELETE: the job ends cancelled
    SHUTDOWN = "shutdown"  # SIGTERM: the job goes back to the queue
    LEASE_LOST = "lease_lost"  # another instance may run it now: stop, and write nothing more


@dataclass
class RunnerDeps:
    """What every job run shares: settings, the store, limits, and the transcription pool."""

    settings: Settings
    store: JobStore
    http: aiohttp.ClientSession
    storage: Storage
    timings: StageTimings
    listener: JobListener
    limits: dict[Resource, ResourceLimit] = field(default_factory=dict)
    transcriber: Transcriber | None = None  # None in pipelines without a transcription stage
    user_http: aiohttp.ClientSession | None = None  # for user-supplied URLs (klipstream.network)
    effects: EffectsOf = _no_effects  # composed by the JobService from its producers
    committed: Committed = _nothing_committed
    checkpoints: CheckpointStore = field(default_factory=LocalCheckpoints)  # shared storage, or the data dir


class ResourceLimit:
    """At most `size` stages at once in one resource pool, counting its holders itself so the
    statistics need nothing but public API (asyncio.Semaphore does not say how many hold it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self._semaphore = asyncio.Semaphore(size)

    async def __aenter__(self) -> None:
        await self._semaphore.acquire()
        self.in_use += 1

    async def __aexit__(self, *exc: object) -> None:
        self.in_use -= 1
        self._semaphore.release()


def resource_limits(settings: Settings) -> dict[Resource, ResourceLimit]:
    return {
        Resource.NETWORK: ResourceLimit(settings.network_concurrency),
        Resource.CPU: ResourceLimit(settings.cpu_concurrency),
        Resource.TRANSCRIPTION: ResourceLimit(settings.transcribe_workers),
    }


class StageFailed(Exception):
    """The job cannot go on; `stage` is None when it failed before any stage (its directory)."""

    def __init__(self, stage: str | None, error: KlipstreamError) -> None:
        super().__init__(f"{stage or 'job'}: {error.message}")
        self.stage = stage
        self.error = error


def workdir_error(exc: OSError) -> KlipstreamError:
    """Why the job's working directory could not be prepared: a full disk is worth another try
    later; anything else (permissions, a read-only or missing mount) is the server's fault."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientResources(
            "The server has no disk space left for this job's working files.", code="disk_full"
        )
    return InternalError(
        f"The job's working directory could not be prepared: {exc.strerror or type(exc).__name__}.",
        code="workdir_unusable",
        suggested_action="The server's data directory is not writable; an operator must fix it, then retry the job.",
    )


def job_error(error: KlipstreamError, stage: str | None) -> JobError:
    return JobError(
        error_type=error.error_type,
        error_code=error.code,
        message=error.message,
        stage=stage,
        is_retryable=error.retryable,
        retry_after_seconds=error.retry_after,
        suggested_action=error.suggested_action,
    )


class JobRun(ProgressSink):
    """One attempt at running a job, from start (or resume) to a terminal or re-queued state."""

    def __init__(self, deps: RunnerDeps, stages: list[Stage], job: Job) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.stages = stages
        self.by_name = {s.name: s for s in stages}
        self.producers = {key: s.name for s in stages for key in s.provides}
        self.job = job
        self.workdir = deps.settings.jobs_dir / job.job_id
        self.available: dict[str, Path] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.publishing: set[asyncio.Task[None]] = set()
        self.cancel_reason: str | None = None
        # Where a stage's retry is decided: retryable errors only, KLIPSTREAM_STAGE_RETRIES times.
        self.retry = RetryPolicy(
            self.settings.stage_retries + 1, self.settings.retry_base_seconds, 300.0, max_retry_after=300.0
        )
        self._stage_started: dict[str, float] = {}
        self._last_persist = 0.0
        self._last_progress = 0.0
        self._persisting: asyncio.Task[None] | None = None  # the progress checkpoint in flight
        self._dirty = False  # a change to save once more after the background save in flight
        # One save of this job at a time: its events get consecutive sequences and are published
        # in the order they committed (the store writes a job's rows in order anyway).
        self._save_lock = asyncio.Lock()
        self._task: asyncio.Task[Any] | None = None

    def lease_lost(self) -> None:
        """The lease of this job is gone (a shared store re-queued it): stop at once, writing
        nothing more; another instance runs it from its last checkpoint."""
        if self.cancel_reason != CancelReason.LEASE_LOST:
            log.error("lease lost; stopping this run of the job", extra={"job_id": self.job.job_id})
        self.cancel_reason = CancelReason.LEASE_LOST
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    # --- entry point ---
    async def run(self) -> None:
        """Run to a terminal state (or back to the queue on shutdown); never raises for a job's
        own failure, so the worker never has to guess the job's state."""
        self._task = asyncio.current_task()
        try:
            await self._start()
            await self._restore()
            await self._schedule()
            await self._finish_publishing()
        except asyncio.CancelledError:
            await self._stop_stages()
            if self.cancel_reason == CancelReason.SHUTDOWN:
                await self._requeue()
            elif self.cancel_reason != CancelReason.LEASE_LOST:
                await self._cancelled()
            return
        except Exception as exc:
            await self._stop_stages()
            if self.cancel_reason == CancelReason.LEASE_LOST:  # whatever failed after that, write nothing
                return
            if isinstance(exc, StageFailed):
                await self._failed(exc.stage, exc.error)
            else:  # a bug in the runner itself: the job still ends, classified
                log.exception("job run failed outside any stage", extra={"job_id": self.job.job_id})
                await self._failed(None, classify(exc))
            return
        await self._completed()

    async def _start(self) -> None:
        await self._prepare_workdir()
        job = self.job
        job.status = JobStatus.RUNNING
        job.attempts += 1
        job.started_at = job.started_at or utcnow()
        job.error = None
        job.queue_position = None
        self._refresh_progress()
        await self._save("started")
        self._emit("started")

    async def _prepare_workdir(self) -> None:
        """`_prepare`, with backoff when the disk is full; other file-system errors fail the job."""
        attempt = 0
        while True:
            attempt += 1
            try:
                self._prepare()
                return
            except OSError as exc:
                error = workdir_error(exc)
                if not error.retryable or self.retry.exhausted(attempt):
                    raise StageFailed(None, error) from exc
                delay = self.retry.delay(attempt, None)
                log.warning(
                    "preparing the job directory failed (%s); trying again in %.1f s",
                    exc,
                    delay,
                    extra={"job_id": self.job.job_id},
                )
                await asyncio.sleep(delay)

    # --- preparation ---
    def _prepare(self) -> None:
        """Reconcile stored stage states with the pipeline and the files actually on disk."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        known = {s.name: s for s in self.job.stages}
        states = []
        for stage in self.stages:
            state = known.get(stage.name) or StageState(name=stage.name, display=stage.display)
            if not state.status.done:
                self._reset(state)
            states.append(state)
        self.job.stages = states
        self._reconcile()
        self._remove_partial_files()
        self._collect_available()

    @staticmethod
    def _reset(state: StageState) -> None:
        state.status = StageStatus.PENDING
        state.progress = 0.0
        state.error = None
        state.finished_at = None

    def _reconcile(self) -> None:
        """Completed stages whose outputs are neither here nor restorable run again; repeated
        until stable, because a stage that runs again makes its own inputs needed."""
        changed = True
        while changed:
            changed = False
            for stage in self.stages:
                state = self.job.stage(stage.name)
                if state.status is StageStatus.COMPLETED and not self._outputs_present(stage):
                    if self.deps.checkpoints.remote:
                        self._rerun_warning(stage, "an output it made is neither here nor checkpointed")
                    self._reset(state)
                    changed = True

    def _outputs_present(self, stage: Stage) -> bool:
        """With the data directory as the checkpoint every output must be on disk (as always);
        with shared checkpoints an output may instead be restorable, or not needed at all (published
        already, and read by no stage that still runs)."""
        for key in stage.provides:
            filename = self.job.artifacts.get(key)
            if filename is None or (self.workdir / filename).is_file():
                continue
            if not self.deps.checkpoints.remote:
                return False
            if key in self.job.checkpoints:
                continue
            if key not in self._needed_keys():
                continue
            return False
        return True

    def _needed_keys(self) -> set[str]:
        """Artifacts this run must have on disk: read by a stage that still runs, or published
        outputs of completed stages whose publication was not recorded (published again)."""
        needed = {
            key
            for stage in self.stages
            if self.job.stage(stage.name).status is StageStatus.PENDING
            and (stage.wanted is None or stage.wanted(self.job.options))
            for key in (*stage.needs, *stage.uses)
        }
        for stage in self.stages:
            if self.job.stage(stage.name).status is StageStatus.COMPLETED:
                needed.update(
                    key
                    for key in stage.provides
                    if key in self.job.artifacts and spec(key).published and key not in self.job.results
                )
        return needed

    def _collect_available(self) -> None:
        """The artifacts on disk whose producer completed (a stage that runs again rewrites its own)."""
        self.available.clear()
        for key, filename in self.job.artifacts.items():
            producer = self.producers.get(key)
            if producer is not None and self.job.stage(producer).status is not StageStatus.COMPLETED:
                continue
            path = self.workdir / filename
            if path.is_file():
                self.available[key] = path

    async def _restore(self) -> None:
        """Bring back from the checkpoints what the remaining stages need; an output that cannot be
        restored (missing, corrupt) makes its stage run again, with a warning, not a failure."""
        if not self.deps.checkpoints.remote:
            self._republish_unrecorded()
            return
        restored: list[str] = []
        while True:
            missing = [
                key
                for key in sorted(self._needed_keys())
                if key in self.job.artifacts
                and self.producers.get(key) is not None
                and self.job.stage(self.producers[key]).status is StageStatus.COMPLETED
                and not (self.workdir / self.job.artifacts[key]).is_file()
            ]
            if not missing:
                break
            for key in missing:
                if await self._restore_one(key):
                    restored.append(key)
                else:
                    self._reset(self.job.stage(self.producers[key]))
            self._reconcile()
        self._collect_available()
        if restored:
            log.info("restored %s from checkpoints", ", ".join(restored), extra={"job_id": self.job.job_id})
        self._republish_unrecorded()

    async def _restore_one(self, key: str) -> bool:
        checkpoint = self.job.checkpoints.get(key)
        producer = self.by_name[self.producers[key]]
        try:
            if checkpoint is None:
                raise StorageError(f"no checkpoint of {key!r} was recorded", code="checkpoint_missing")
            await self.deps.checkpoints.restore(checkpoint, self.workdir / self.job.artifacts[key])
            return True
        except (asyncio.CancelledError, LeaseLost):
            raise
        except Exception as exc:  # missing, corrupt or unreachable: the stage runs again instead
            error = classify(exc)
            self.job.checkpoints.pop(key, None)
            self._rerun_warning(producer, f"its checkpoint of {key} could not be restored ({error.message})", error)
            return False

    def _rerun_warning(self, stage: Stage, why: str, error: KlipstreamError | None = None) -> None:
        """A completed stage runs again on resume: the job says so (it takes longer), it does not fail."""
        self.job.warnings.append(f"{stage.display.value}: {why}; the step runs again.")
        log.warning(
            "completed stage %s runs again: %s",
            stage.name,
            why,
            extra={
                "job_id": self.job.job_id,
                "stage": stage.name,
                "error_type": error.error_type if error else "checkpoint_missing",
            },
        )

    def _republish_unrecorded(self) -> None:
        """Outputs of completed stages whose publication was in flight when the last run stopped."""
        for stage in self.stages:
            if self.job.stage(stage.name).status is not StageStatus.COMPLETED:
                continue
            for key in stage.provides:
                path = self.available.get(key)
                if path is not None and spec(key).published and key not in self.job.results:
                    task = asyncio.create_task(self._publish(key, path), name=f"publish-{key}")
                    self.publishing.add(task)

    def _remove_partial_files(self) -> None:
        """Delete everything in the job directory that is not a checkpointed artifact."""
        keep = {self.workdir / name for name in self.job.artifacts.values()}
        for path in self.workdir.iterdir():
            if path in keep:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # --- scheduling ---
    async def _schedule(self) -> None:
        while True:
            if self._start_ready_stages():  # stages were skipped: one checkpoint, one event
                await self._save("stage_changed")
                self._emit("stage_changed")
            if not self.tasks:
                return
            done, _ = await asyncio.wait(self.tasks.values(), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = task.get_name()
                del self.tasks[name]
                task.result()  # re-raises StageFailed

    def _start_ready_stages(self) -> bool:
        """Start the stages whose inputs exist; True when some were skipped (not wanted, or an
        input they need cannot exist), a change the caller stores and announces."""
        skipped = False
        changed = True
        while changed:
            changed = False
            for stage in self.stages:
                state = self.job.stage(stage.name)
                if state.status is not StageStatus.PENDING or stage.name in self.tasks:
                    continue
                if stage.wanted is not None and not stage.wanted(self.job.options):
                    state.status = StageStatus.SKIPPED
                    state.message = "not requested for this job"
                    state.finished_at = utcnow()
                    changed = skipped = True
                    continue
                readiness = self._readiness(stage)
                if readiness == "skip":
                    state.status = StageStatus.SKIPPED
                    state.message = "an input it needs is unavailable for this video"
                    state.finished_at = utcnow()
                    changed = skipped = True
                elif readiness == "ready":
                    self.tasks[stage.name] = asyncio.create_task(self._run_stage(stage), name=stage.name)
        return skipped

    def _readiness(self, stage: Stage) -> str:
        for key in stage.needs:
            if key in self.available:
                continue
            producer = self.producers.get(key)
            if producer is None or self.job.stage(producer).status.done:
                return "skip"
            return "wait"
        for key in stage.uses:
            producer = self.producers.get(key)
            if key not in self.available and producer is not None and not self.job.stage(producer).status.done:
                return "wait"
        return "ready"

    # --- one stage ---
    async def _run_stage(self, stage: Stage) -> None:
        state = self.job.stage(stage.name)
        attempt = 0
        while True:
            attempt += 1
            try:
                ctx = await self._attempt(stage, state)
                break
            except StageUnavailable as exc:
                state.status = StageStatus.UNAVAILABLE
                state.message = str(exc)
                state.finished_at = utcnow()
                self.job.warnings.append(f"{stage.display.value}: {exc}")
                await self._save("stage_changed")
                self._emit("stage_changed")
                return
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as exc:  # every failure is classified below, by type
                error = classify(exc)
                if not isinstance(exc, KlipstreamError):
                    log.exception("stage %s raised", stage.name, extra={"job_id": self.job.job_id, "stage": stage.name})
                state.error = job_error(error, stage.name)
                if not error.retryable or self.retry.exhausted(attempt):
                    state.status = StageStatus.FAILED
                    state.finished_at = utcnow()
                    raise StageFailed(stage.name, error) from exc
                delay = self.retry.delay(attempt, error.retry_after)
                state.status = StageStatus.PENDING
                state.message = f"retrying in {delay:.1f} s after: {error.message}"
                await self._save("stage_changed")
                self._emit("stage_changed")
                await asyncio.sleep(delay)
        await self._stage_completed(stage, state, ctx)

    async def _attempt(self, stage: Stage, state: StageState) -> StageContext:
        async with self.deps.limits[stage.resource]:
            ctx = StageContext(
                job=self.job,
                stage=stage,
                workdir=self.workdir,
                settings=self.settings,
                http=self.deps.http,
                inputs={k: self.available[k] for k in (*stage.needs, *stage.uses) if k in self.available},
                sink=self,
                transcriber=self.deps.transcriber,
                user_http=self.deps.user_http,
            )
            state.status = StageStatus.RUNNING
            state.progress = 0.0
            state.attempts += 1
            state.started_at = utcnow()
            state.message = None
            self._stage_started[stage.name] = time.monotonic()
            self._refresh_progress()
            await self._save("stage_changed")
            self._emit("stage_changed")
            timeout = stage.timeout(ctx) if stage.timeout else self.settings.stage_timeout_seconds
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    await stage.run(ctx)
            except TimeoutError:
                ctx.cancelled.set()
                if deadline.expired():
                    raise TimeLimitExceeded(
                        f"The {stage.display.value.lower()} step did not finish within {timeout:.0f} s.",
                        code="stage_timeout",
                    ) from None
                raise
            except BaseException:
                ctx.cancelled.set()
                raise
            return ctx

    async def _stage_completed(self, stage: Stage, state: StageState, ctx: StageContext) -> None:
        for key, path in ctx.outputs.items():
            self.available[key] = path
            self.job.artifacts[key] = path.name
        await self._checkpoint_outputs(stage, ctx.outputs)
        seconds = time.monotonic() - self._stage_started.get(stage.name, time.monotonic())
        state.status = StageStatus.COMPLETED
        state.progress = 1.0
        state.finished_at = utcnow()
        state.error = None
        media_seconds = self.job.video.duration_seconds if self.job.video else None
        self.deps.timings.add(stage.name, seconds, media_seconds)
        self._refresh_progress()
        await self._save("stage_changed")
        try:
            await self.deps.store.record_stage_run(stage.name, seconds, media_seconds)
        except DatabaseUnavailable as exc:  # a statistic (ETAs): not worth stopping the job for
            log.warning("stage timing not recorded: %s", exc.message, extra={"job_id": self.job.job_id})
        self._emit("stage_changed")
        await self._discard_spent_checkpoints()
        for key, path in ctx.outputs.items():
            if spec(key).published:
                task = asyncio.create_task(self._publish(key, path), name=f"publish-{key}")
                self.publishing.add(task)

    async def _checkpoint_outputs(self, stage: Stage, outputs: dict[str, Path]) -> None:
        """Copy to shared storage the unpublished outputs a later stage of this job reads, before
        the stage is stored as completed (so a completed stage in the job row has their checkpoints).
        A published output's checkpoint is its published object (`_publish`), not a second copy.
        A failed copy is a warning: the job goes on; only a resume elsewhere runs the stage again."""
        if not self.deps.checkpoints.remote:
            return
        for key, path in outputs.items():
            if spec(key).published or not consumers(key, self.stages, self.job.options):
                continue
            try:
                self.job.checkpoints[key] = await self.deps.checkpoints.save(self.job.job_id, key, path)
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as exc:
                self.job.checkpoints.pop(key, None)
                log.warning(
                    "could not checkpoint %s; a resume on another instance runs %s again: %s",
                    key,
                    stage.name,
                    classify(exc).message,
                    extra={"job_id": self.job.job_id, "stage": stage.name},
                )

    async def _discard_spent_checkpoints(self) -> None:
        """Drop checkpoints every reader of which has completed (the media once the audio is
        decoded, the PCM once transcribed): storage holds what a resume needs, not the history."""
        spent = [key for key in self.job.checkpoints if self._spent(key)]
        for key in spent:
            checkpoint = self.job.checkpoints.pop(key)
            try:
                await self.deps.checkpoints.discard(checkpoint)
            except Exception:  # the job's end (or the janitor) removes it
                log.warning("could not discard checkpoint %s", key, exc_info=True, extra={"job_id": self.job.job_id})

    def _spent(self, key: str) -> bool:
        """Every stage of this job that reads `key` has completed."""
        return all(
            self.job.stage(s.name).status is StageStatus.COMPLETED
            for s in consumers(key, self.stages, self.job.options)
        )

    async def _publish(self, key: str, path: Path) -> None:
        stored = await self.deps.storage.put(self.job.video_id, spec(key), path)
        self.job.results[key] = stored.url
        self.job.result_uris[key] = stored.uri
        if (
            self.deps.checkpoints.remote
            and stored.md5_base64 is not None
            and consumers(key, self.stages, self.job.options)
            and not self._spent(key)
        ):
            # the published copy is the checkpoint; its MD5 refuses a restore if another job of the
            # same video has replaced the object since
            self.job.checkpoints[key] = Checkpoint(
                file=path.name, uri=stored.uri, size=stored.size, md5=stored.md5_base64
            )
        self._persist_soon()  # a resume elsewhere then knows it is published and need not restore it

    async def _finish_publishing(self) -> None:
        if not self.publishing:
            return
        results = await asyncio.gather(*self.publishing, return_exceptions=True)
        self.publishing.clear()
        for result in results:
            if isinstance(result, BaseException):
                error = result if isinstance(result, KlipstreamError) else StorageError(f"Publishing failed: {result}")
                raise StageFailed("publish", error)

    async def _stop_stages(self) -> None:
        """Cancel running stages and wait (bounded) for their cleanup: subprocesses, threads."""
        pending = [*self.tasks.values(), *self.publishing]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.8)
        self.tasks.clear()
        self.publishing.clear()
        shutdown = self.cancel_reason == CancelReason.SHUTDOWN
        for state in self.job.stages:
            if state.status is StageStatus.RUNNING:
                # Shutdown: it runs again in the next process. Cancel or failure: it was stopped.
                state.status = StageStatus.PENDING if shutdown else StageStatus.CANCELLED
                state.finished_at = None if shutdown else utcnow()

    # --- terminal states ---
    async def _completed(self) -> None:
        job = self.job
        job.status = JobStatus.COMPLETED
        job.finished_at = utcnow()
        self._refresh_progress()
        await self._save_final("completed")
        self._emit("completed")
        if not self.settings.keep_workdirs:
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)
        await self._remove_checkpoints()

    async def _remove_checkpoints(self) -> None:
        """A completed job needs no checkpoints; failed and cancelled jobs keep theirs for a retry
        until the janitor's KLIPSTREAM_RETAIN_WORKDIRS_SECONDS."""
        if not self.deps.checkpoints.remote or self.cancel_reason == CancelReason.LEASE_LOST:
            return
        try:
            async with asyncio.timeout(60):
                await self.deps.checkpoints.remove_job(self.job.job_id)
        except Exception:  # the janitor removes them later
            log.warning("could not remove the job's checkpoints", exc_info=True, extra={"job_id": self.job.job_id})

    async def _failed(self, stage: str | None, error: KlipstreamError) -> None:
        job = self.job
        job.status = JobStatus.FAILED
        job.error = job_error(error, stage)
        job.finished_at = utcnow()
        self._close_unfinished_stages(f"not run: the job failed{f' in {stage}' if stage else ''}")
        self._refresh_progress()
        await self._save_final("failed")
        log.warning(
            "job failed: %s",
            error.message,
            extra={"job_id": job.job_id, "stage": stage, "error_type": error.error_type},
        )
        self._emit("failed")

    async def _cancelled(self) -> None:
        job = self.job
        job.status = JobStatus.CANCELLED
        job.finished_at = utcnow()
        self._close_unfinished_stages("not run: the job was cancelled")
        try:
            await asyncio.to_thread(self._remove_partial_files)
        except OSError:
            log.warning("could not remove partial files", exc_info=True, extra={"job_id": job.job_id})
        self._refresh_progress()
        await self._save_final("cancelled")
        self._emit("cancelled")

    async def _requeue(self) -> None:
        """Shutdown: checkpoint and hand the job back to the queue for the next process."""
        self.job.status = JobStatus.QUEUED
        self._refresh_progress()
        await self._save("requeued")
        self._emit("requeued")

    # --- ProgressSink, called by stages ---
    def stage_progress(self, stage: str, fraction: float, detail: str | None) -> None:
        state = self.job.stage(stage)
        if state.status is not StageStatus.RUNNING:
            return
        state.progress = round(fraction, 4)
        if detail is not None:
            state.message = detail
        self._refresh_progress()
        self._emit("progress")
        # A progress event (and checkpoint of the job) at most every KLIPSTREAM_STREAM_PROGRESS_SECONDS.
        if time.monotonic() - self._last_progress >= self.settings.stream_progress_seconds and self._persisting is None:
            self._last_progress = time.monotonic()
            self._persisting = asyncio.create_task(self._save_in_background("progress"))

    def warn(self, stage: str, message: str) -> None:
        self.job.warnings.append(f"{self.by_name[stage].display.value}: {message}")

    def set_video(self, info: VideoInfo) -> None:
        self.job.video = info
        self.job.updated_at = utcnow()
        self._persisting = self._persisting or asyncio.create_task(self._save_in_background())

    def _persist_soon(self) -> None:
        """Save the job in the background, once more after a save already under way (which may
        have serialised the job before this change)."""
        self._dirty = True
        if self._persisting is None:
            self._persisting = asyncio.create_task(self._save_in_background())

    def set_highlights(self, highlights: list[dict[str, Any]]) -> None:
        self.job.highlights = highlights

    # --- progress, ETA, persistence ---
    def _refresh_progress(self) -> None:
        self.job.progress = compute_progress(self.job, self.stages, self.deps.timings, self._stage_started)
        self.job.updated_at = utcnow()

    async def _save(self, kind: str | None = None, effects: Effects | None = None) -> None:
        """Write the job with the effects of the change `kind` (its stream event, webhook
        deliveries, Convex update) in one transaction; once committed, they are published. A
        failed write's event sequence is not reused (the write may still have committed): the
        stream skips it, and a subscriber behind the gap gets a fresh snapshot.

        With a shared store, a database outage does not end the run: the write (with its effects)
        is made again until the database is back (the running stages go on meanwhile, and this
        checkpoint lands then). The outage cannot outlast the lease unnoticed: the cluster's lease
        watchdog stops a run whose lease went unrenewed for nearly a lease (`lease_lost`, which
        cancels this wait), since another instance may take the job after that."""
        async with self._save_lock:
            self._last_persist = time.monotonic()
            if effects is None:
                if kind in ("progress", "stage_changed") and self.job.status is not JobStatus.RUNNING:
                    kind = None  # a background save that ran after the run ended: no event after the last
                effects = self.deps.effects(kind, self.job)
            shared = self.deps.store.shared
            waits = 0
            while True:
                try:
                    await self.deps.store.save_job(self.job, effects)
                    break
                except LeaseLost:
                    self.lease_lost()
                    raise
                except DatabaseUnavailable as exc:
                    if not shared or self.cancel_reason == CancelReason.LEASE_LOST:
                        raise
                    delay = OUTAGE_SAVE_DELAYS[min(waits, len(OUTAGE_SAVE_DELAYS) - 1)]
                    if waits == 0:
                        log.warning(
                            "the job database is unavailable (%s); the job goes on and is saved when it is back",
                            exc.message,
                            extra={"job_id": self.job.job_id},
                        )
                    waits += 1
                    await asyncio.sleep(delay)
            if waits:
                log.info("the job database is back; job saved", extra={"job_id": self.job.job_id})
            self.deps.committed(self.job, effects)

    def _close_unfinished_stages(self, reason: str) -> None:
        """A job that ended early: stages that never started are skipped, stages that started (and
        were waiting for a retry) are cancelled; none stays pending."""
        now = utcnow()
        for state in self.job.stages:
            if state.status in (StageStatus.PENDING, StageStatus.RUNNING):
                state.status = StageStatus.CANCELLED if state.started_at else StageStatus.SKIPPED
                state.finished_at = now
                state.message = reason

    async def _save_final(self, kind: str) -> None:
        """Write a terminal state, retrying: the job's event goes out even if the store stays down
        (then the store still says running, and the next process runs the job again; the event is
        published here unstored, so this instance's streams end). Every try
        carries the same outbox rows: a try that committed although it seemed to fail and a later
        one write each delivery once (same id)."""
        effects = self.deps.effects(kind, self.job)
        for delay in (*FINAL_SAVE_DELAYS, None):
            try:
                await self._save(kind, effects)
                return
            except LeaseLost:
                return  # another instance has the job now: nothing of this run may be written
            except Exception:
                if delay is None:
                    log.error(
                        "could not store the job's final state",
                        exc_info=True,
                        extra={"job_id": self.job.job_id},
                    )
                    self.deps.committed(self.job, effects)
                    return
                log.warning("storing the job's final state failed; retrying", extra={"job_id": self.job.job_id})
                await asyncio.sleep(delay)

    async def _save_in_background(self, kind: str | None = None) -> None:
        """The progress checkpoint (`_persisting`): at most one in flight."""
        try:
            self._dirty = False
            await self._save(kind)
            while self._dirty:
                self._dirty = False
                await self._save()
        except LeaseLost:
            pass  # the run is stopping (lease_lost() said why)
        except Exception:  # progress snapshots are best effort; state changes are not
            log.warning("background checkpoint failed", exc_info=True, extra={"job_id": self.job.job_id})
        finally:
            self._persisting = None

    def _emit(self, kind: str) -> None:
        try:
            self.deps.listener(kind, self.job)
        except Exception:  # a listener's bug must not break the job
            log.exception("job listener failed", extra={"job_id": self.job.job_id})
