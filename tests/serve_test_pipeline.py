"""Run the real server process with a slow test pipeline, for kill -9 and SIGTERM tests.

Usage: python -m tests.serve_test_pipeline <data_dir> <port> <marker_dir>
Each stage takes about `STEP_SECONDS * STEPS` and appends to <marker_dir>/<stage>.log, so the test
can see which stages ran in which process. With TEST_KILL_ON_EVENT=<kind> (e.g. `completed`) the
process kills itself with SIGKILL right after the first job event of that kind was stored and
announced, before anything else runs: the worst moment for whatever the event must still cause.
TEST_PIPELINE=checkpoints selects `checkpoint_pipeline` (outputs derived from inputs, real artifact
keys) for the checkpoint tests (tests/test_checkpoints.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

from klipstream.artifacts import spec
from klipstream.config import Settings
from klipstream.jobs.service import JobService
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.logs import configure_logging
from klipstream.models import DisplayStage
from klipstream.server import serve

STEPS = 10
STEP_SECONDS = float(os.environ.get("TEST_STEP_SECONDS", "0.1"))


def slow_stage(
    name: str, marker_dir: Path, *, needs: tuple[str, ...], provides: tuple[str, ...], display: DisplayStage
) -> Stage:
    async def run(ctx: StageContext) -> None:
        with (marker_dir / f"{name}.log").open("a") as log:
            log.write(f"start {os.getpid()}\n")
        record_run(marker_dir, ctx.job.job_id, name, "start")
        outcome = "stop"  # cancelled (a cancel, a lost lease, a shutdown) or failed
        try:
            for step in range(STEPS):
                ctx.progress((step + 1) / STEPS)
                await asyncio.sleep(STEP_SECONDS)
            for key in provides:
                ctx.output_path(key).write_text(f"{name} {os.getpid()}\n")
                ctx.add_artifact(key)
            outcome = "end"
        finally:
            record_run(marker_dir, ctx.job.job_id, name, outcome)
        with (marker_dir / f"{name}.log").open("a") as log:
            log.write(f"end {os.getpid()}\n")

    return Stage(name, display, run, needs=needs, provides=provides, resource=Resource.CPU)


def record_run(marker_dir: Path, job_id: str, stage: str, event: str) -> None:
    """One line of <marker_dir>/runs.log: job, stage, start/end/stop, pid, wall-clock time. Every
    process appends to the one file (small O_APPEND writes do not interleave), so a test can lay
    each stage run of a job on a time line across instances: a run with a start and no end or stop
    was killed (kill -9), and ended when its process did."""
    with (marker_dir / "runs.log").open("a") as log:
        log.write(f"{job_id} {stage} {event} {os.getpid()} {time.time():.6f}\n")


def pipeline(marker_dir: Path) -> list[Stage]:
    return [
        slow_stage("download", marker_dir, needs=(), provides=("media",), display=DisplayStage.DOWNLOADING),
        slow_stage(
            "audio", marker_dir, needs=("media",), provides=("waveform",), display=DisplayStage.PROCESSING_AUDIO
        ),
        slow_stage(
            "highlights",
            marker_dir,
            needs=("waveform",),
            provides=("highlights_json",),
            display=DisplayStage.FINDING_HIGHLIGHTS,
        ),
    ]


def derived_stage(
    name: str,
    marker_dir: Path,
    *,
    needs: tuple[str, ...],
    provides: tuple[str, ...],
    display: DisplayStage,
    uses: tuple[str, ...] = (),
    size: int = 64,
    steps: int = STEPS,
) -> Stage:
    """A slow stage whose outputs are a pure function of its inputs' bytes (no pid, no time), so a
    job that resumes on another instance from restored checkpoints must end with the same results."""

    async def run(ctx: StageContext) -> None:
        with (marker_dir / f"{name}.log").open("a") as log:
            log.write(f"start {os.getpid()}\n")
        digest = hashlib.sha256(name.encode())
        for key in (*needs, *uses):
            path = ctx.optional_input(key) if key in uses else ctx.input(key)
            if path is not None:
                digest.update(await asyncio.to_thread(_file_digest, path))
        for step in range(steps):
            ctx.progress((step + 1) / steps)
            await asyncio.sleep(STEP_SECONDS)
        for key in provides:
            seed = hashlib.sha256(digest.digest() + key.encode()).digest()
            await asyncio.to_thread(_write_derived, ctx.output_path(key), seed, output_size(key, size))
            ctx.add_artifact(key)
        with (marker_dir / f"{name}.log").open("a") as log:
            log.write(f"end {os.getpid()}\n")

    return Stage(name, display, run, needs=needs, uses=uses, provides=provides, resource=Resource.CPU)


def output_size(key: str, size: int) -> int:
    """Intermediates (media, PCM) are big, published outputs small (their upload is not the point)."""
    return 64 if spec(key).published else size


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.digest()


def _write_derived(path: Path, seed: bytes, size: int) -> None:
    """`size` bytes expanded from `seed` (a hex line for small files, so JSON-ish artifacts stay text)."""
    if size <= 64:
        path.write_text(seed.hex() + "\n")
        return
    with path.open("wb") as f:
        block = seed * (65536 // len(seed))
        for i in range(0, size, len(block)):
            f.write((i.to_bytes(8, "big") + block)[: min(len(block), size - i)])


def checkpoint_pipeline(marker_dir: Path) -> list[Stage]:
    """download -> audio -> transcribe -> highlights with the real artifact keys: internal
    intermediates (media, pcm) a later stage reads, and published outputs (waveform, transcript)."""
    big = int(os.environ.get("TEST_INTERMEDIATE_BYTES", str(6 * 1024 * 1024)))  # above the resumable threshold
    return [
        derived_stage(
            "download", marker_dir, needs=(), provides=("media",), display=DisplayStage.DOWNLOADING, size=big
        ),
        derived_stage(
            "audio",
            marker_dir,
            needs=("media",),
            provides=("pcm", "waveform"),
            display=DisplayStage.PROCESSING_AUDIO,
            size=big,
        ),
        derived_stage(
            "transcribe",
            marker_dir,
            needs=("pcm",),
            provides=("transcript_json",),
            display=DisplayStage.TRANSCRIBING,
            steps=2 * STEPS,  # the longest stage, as in life: the tests kill an instance during it
        ),
        derived_stage(
            "highlights",
            marker_dir,
            needs=("transcript_json",),
            uses=("waveform",),
            provides=("highlights_json",),
            display=DisplayStage.FINDING_HIGHLIGHTS,
        ),
    ]


def kill_on_event(kind: str) -> None:
    """SIGKILL this process as soon as the service has announced a job event of `kind` (its save
    committed, every listener called), in the same call: no other coroutine runs in between."""
    announce = JobService._on_job_event

    def on_job_event(self: JobService, event: str, job: object) -> None:
        announce(self, event, job)  # type: ignore[arg-type]
        if event == kind:
            os.kill(os.getpid(), signal.SIGKILL)

    JobService._on_job_event = on_job_event  # type: ignore[method-assign]


def main() -> None:
    data_dir, port, marker_dir = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    marker_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env(
        data_dir=data_dir,
        port=port,
        host="127.0.0.1",
        allow_private_urls=True,
        log_format="text",
        max_running_jobs=int(os.environ.get("TEST_MAX_RUNNING_JOBS", "1")),  # 0: an API-only instance
    )
    configure_logging("info", "text")
    if os.environ.get("TEST_KILL_ON_EVENT"):
        kill_on_event(os.environ["TEST_KILL_ON_EVENT"])
    import uvloop

    stages = (
        checkpoint_pipeline(marker_dir) if os.environ.get("TEST_PIPELINE") == "checkpoints" else pipeline(marker_dir)
    )
    uvloop.run(serve(settings, stages=stages))


if __name__ == "__main__":
    main()
