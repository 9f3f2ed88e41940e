"""Job checkpoints in shared storage: what lets a job continue on another instance after its last
completed stage instead of downloading or transcribing again.

With local storage the job directory in the data directory is the checkpoint, as it always was:
nothing is copied, and a job resumes where that directory is (one machine, or instances sharing
one file system). With GCS storage every instance has its own data directory, so when a stage
completes the runner copies the outputs a later stage of the job still needs (published or not)
to `_checkpoints/{job_id}/{file}` in the checkpoint bucket, records each copy in `Job.checkpoints`
(size and the MD5 the server confirmed), and an instance that claims the job restores from there
the outputs its remaining stages need. Which outputs that is follows from the stage graph:
docs/decisions.md ("Checkpoints: what is copied").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from klipstream.artifacts import spec
from klipstream.errors import InternalError, StorageError
from klipstream.models import Checkpoint, JobOptions

if TYPE_CHECKING:
    from klipstream.config import Settings
    from klipstream.integrations.storage import GcsStorage, Storage
    from klipstream.jobs.stage import Stage

log = logging.getLogger(__name__)
PREFIX = "_checkpoints"


class CheckpointStore(Protocol):
    """Where completed stages' outputs are kept for a job resumed elsewhere."""

    @property
    def remote(self) -> bool:
        """False: the job directory itself is the checkpoint and nothing is copied."""
        ...

    async def save(self, job_id: str, key: str, path: Path) -> Checkpoint: ...

    async def restore(self, checkpoint: Checkpoint, dest: Path) -> None: ...

    async def discard(self, checkpoint: Checkpoint) -> None: ...

    async def remove_job(self, job_id: str) -> int: ...

    async def jobs(self) -> dict[str, float]:
        """Job ids that have checkpoints, each with the newest checkpoint's time (epoch seconds)."""
        ...


class LocalCheckpoints:
    """The data directory is the checkpoint: a job resumes where its directory is."""

    remote = False

    async def save(self, job_id: str, key: str, path: Path) -> Checkpoint:
        raise InternalError("local storage copies no checkpoints")

    async def restore(self, checkpoint: Checkpoint, dest: Path) -> None:
        raise InternalError("local storage has no checkpoints to restore")

    async def discard(self, checkpoint: Checkpoint) -> None:
        return None

    async def remove_job(self, job_id: str) -> int:
        return 0

    async def jobs(self) -> dict[str, float]:
        return {}


class GcsCheckpoints:
    """Checkpoints as objects `_checkpoints/{job_id}/{file}` in one bucket, through GcsStorage's
    streamed, MD5-verified and retried uploads and downloads."""

    remote = True

    def __init__(self, settings: Settings, storage: GcsStorage) -> None:
        self._storage = storage
        self.bucket = settings.gcs_bucket_checkpoints or settings.gcs_bucket or settings.gcs_bucket_raw

    def _prefix(self, job_id: str) -> str:
        if not job_id or not job_id.replace("-", "").replace("_", "").isalnum():
            raise InternalError(f"Refusing checkpoints under the unsafe job id {job_id!r}.")
        return f"{PREFIX}/{job_id}/"

    def _name(self, job_id: str, filename: str) -> str:
        if not filename or "/" in filename or filename.startswith("."):
            raise InternalError(f"Refusing a checkpoint of the unsafe file name {filename!r}.")
        return self._prefix(job_id) + filename

    @staticmethod
    def _location(checkpoint: Checkpoint) -> tuple[str, str]:
        """(bucket, object) of a checkpoint: a copy under _checkpoints/, or a published artifact."""
        rest = checkpoint.uri.removeprefix("gs://")
        bucket, _, name = rest.partition("/")
        if rest == checkpoint.uri or not bucket or not name:
            raise StorageError(f"{checkpoint.uri} is not a Cloud Storage object.", code="checkpoint_invalid")
        return bucket, name

    async def save(self, job_id: str, key: str, path: Path) -> Checkpoint:
        name = self._name(job_id, path.name)
        metadata = {"job_id": job_id, "artifact": key}
        size, md5 = await self._storage.upload_file(self.bucket, name, path, spec(key).content_type, metadata)
        return Checkpoint(file=path.name, uri=f"gs://{self.bucket}/{name}", size=size, md5=md5)

    async def restore(self, checkpoint: Checkpoint, dest: Path) -> None:
        bucket, name = self._location(checkpoint)
        await self._storage.download_file(bucket, name, dest, size=checkpoint.size, md5=checkpoint.md5)

    async def discard(self, checkpoint: Checkpoint) -> None:
        """Delete a copy under _checkpoints/; a published artifact serving as checkpoint stays."""
        bucket, name = self._location(checkpoint)
        if name.startswith(f"{PREFIX}/"):
            await self._storage.delete_object(bucket, name)

    async def remove_job(self, job_id: str) -> int:
        return await self._storage.delete_prefix(self.bucket, self._prefix(job_id))

    async def jobs(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for item in await self._storage.list_prefix(self.bucket, f"{PREFIX}/"):
            parts = item["name"].split("/")
            if len(parts) != 3:
                continue
            when = _timestamp(item.get("updated") or item.get("timeCreated"))
            found[parts[1]] = max(found.get(parts[1], 0.0), when)
        return found


def _timestamp(value: str | None) -> float:
    """RFC 3339 as epoch seconds; unknown counts as now (kept until a later sweep can judge it)."""
    if not value:
        return datetime.now().timestamp()
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return datetime.now().timestamp()


def create_checkpoints(settings: Settings, storage: Storage) -> CheckpointStore:
    from klipstream.integrations.storage import GcsStorage  # imported late: the storage package imports the jobs

    if isinstance(storage, GcsStorage):
        return GcsCheckpoints(settings, storage)
    return LocalCheckpoints()


def consumers(key: str, stages: Iterable[Stage], options: JobOptions) -> list[Stage]:
    """The stages of this job that read artifact `key` (needs or uses); opt-in stages the job did
    not ask for read nothing (a video is checkpointed only when clips are wanted)."""
    return [s for s in stages if key in (*s.needs, *s.uses) and (s.wanted is None or s.wanted(options))]
