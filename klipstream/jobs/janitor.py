"""The janitor: what the service keeps, and for how long (KLIPSTREAM_RETAIN_*).

A failed or cancelled job keeps its working directory (downloaded media, 16 kHz PCM: gigabytes,
and on Cloud Run that disk is memory) so a retry resumes from its checkpoints; after
KLIPSTREAM_RETAIN_WORKDIRS_SECONDS without a retry it is removed, and so are its checkpoints in
shared storage (klipstream.jobs.checkpoints), which any instance may sweep. Finished job rows, idempotency
records, stage timings, finished webhook deliveries and local artifacts each have their own
retention. A retention of 0 keeps that kind of data forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from klipstream.models import JobStatus

if TYPE_CHECKING:
    from klipstream.config import Settings
    from klipstream.integrations.storage import Storage
    from klipstream.integrations.webhooks import WebhookDispatcher
    from klipstream.jobs.service import JobService

log = logging.getLogger(__name__)
DELETE_BATCH = 500  # job rows per store call, so one sweep never holds the writer for long
_ENDED = {JobStatus.FAILED.value, JobStatus.CANCELLED.value, JobStatus.COMPLETED.value}
_TRASH = ".trash-"  # a working directory renamed for removal


@dataclass
class Sweep:
    """What one pass removed."""

    workdirs: int = 0
    checkpoints: int = 0  # jobs whose checkpoints were removed
    jobs: int = 0
    idempotency: int = 0
    stage_runs: int = 0
    webhooks: int = 0
    artifacts: int = 0

    def total(self) -> int:
        kept = (self.workdirs, self.checkpoints, self.jobs, self.idempotency, self.stage_runs, self.webhooks)
        return sum(kept) + self.artifacts


class Janitor:
    def __init__(
        self, settings: Settings, service: JobService, storage: Storage, webhooks: WebhookDispatcher | None
    ) -> None:
        self.settings = settings
        self.service = service
        self.storage = storage
        self.webhooks = webhooks
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="janitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.janitor_interval_seconds)
            try:
                swept = await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next pass tries again; nothing here may stop the service
                log.exception("janitor pass failed")
                continue
            if swept.total():
                log.info("janitor removed %s", swept)

    async def sweep(self, now: float | None = None) -> Sweep:
        now = time.time() if now is None else now
        s = self.settings
        swept = Sweep()
        if s.retain_workdirs_seconds and not s.keep_workdirs:
            swept.workdirs = await self._workdirs(now - s.retain_workdirs_seconds)
            swept.checkpoints = await self._checkpoints(now - s.retain_workdirs_seconds)
        if s.retain_jobs_seconds:
            swept.jobs = await self._jobs(now - s.retain_jobs_seconds)
        store = self.service.store
        if s.retain_idempotency_seconds:
            swept.idempotency = await store.delete_idempotency(now - s.retain_idempotency_seconds)
        if s.retain_stage_runs_seconds:
            swept.stage_runs = await store.delete_stage_runs(now - s.retain_stage_runs_seconds)
        if s.retain_webhooks_seconds and self.webhooks is not None:
            swept.webhooks = await self.webhooks.purge(now - s.retain_webhooks_seconds)
        if s.retain_artifacts_seconds:
            swept.artifacts = await self.storage.purge(now - s.retain_artifacts_seconds)
        return swept

    async def _workdirs(self, ended_before: float) -> int:
        """Remove the directories of jobs that ended before the cutoff and are not running again.

        A directory is first renamed (instant, on the event loop, after checking the job is not
        active), then deleted in a thread: a retry that starts meanwhile makes a fresh directory
        instead of racing the deletion."""
        root = self.settings.jobs_dir
        names = await asyncio.to_thread(_children, root)
        trash = [name for name in names if name.startswith(_TRASH)]
        candidates = [name for name in names if not name.startswith(_TRASH) and not self._active(name)]
        states = await self.service.store.job_states(candidates)
        removed = 0
        for name in candidates:
            state = states.get(name)
            if state is not None:
                if not _ended_before(state, ended_before):
                    continue
            elif await asyncio.to_thread(_modified, root / name) >= ended_before:
                continue  # no row (purged, or never written): judged by age
            if self._active(name):  # retried while the store was being read
                continue
            target = f"{_TRASH}{name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(root / name, root / target)
            except OSError:
                continue
            trash.append(target)
            removed += 1
        for name in trash:
            await asyncio.to_thread(shutil.rmtree, root / name, True)
        return removed

    async def _checkpoints(self, ended_before: float) -> int:
        """Remove the checkpoints of jobs that ended before the cutoff (a completed job removes its
        own; these are failed or cancelled jobs not retried, or a removal that failed). A job with
        no row is judged by its newest checkpoint's age."""
        store = self.service.deps.checkpoints
        if not store.remote:
            return 0
        found = await store.jobs()
        candidates = [job_id for job_id in found if not self._active(job_id)]
        states = await self.service.store.job_states(candidates)
        removed = 0
        for job_id in candidates:
            state = states.get(job_id)
            if state is not None:
                if not _ended_before(state, ended_before):
                    continue
            elif found[job_id] >= ended_before:
                continue
            await store.remove_job(job_id)
            removed += 1
        return removed

    def _active(self, job_id: str) -> bool:
        service = self.service
        return job_id in service.active or job_id in service.unparsed or job_id in service.pool.running

    async def _jobs(self, finished_before: float) -> int:
        removed = 0
        while True:
            ids = await self.service.store.delete_finished_jobs(finished_before, DELETE_BATCH)
            for job_id in ids:
                self.service.recent.pop(job_id, None)
            removed += len(ids)
            if len(ids) < DELETE_BATCH:
                return removed


def _ended_before(state: tuple[str, float | None], cutoff: float) -> bool:
    """A job row's (status, finished_at): it ended before `cutoff`, so what it left may go."""
    status, finished_at = state
    return status in _ENDED and finished_at is not None and finished_at < cutoff


def _children(root: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
