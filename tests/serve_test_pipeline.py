"""Run the real server process with a slow test pipeline, for kill -9 and SIGTERM tests.

Usage: python -m tests.serve_test_pipeline <data_dir> <port> <marker_dir>
Each stage takes about `STEP_SECONDS * STEPS` and appends to <marker_dir>/<stage>.log, so the test
can see which stages ran in which process. With TEST_KILL_ON_EVENT=<kind> (e.g. `completed`) the
process kills itself with SIGKILL right after the first job event of that kind was stored and
announced, before anything else runs: the worst moment for whatever the event must still cause.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

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
        for step in range(STEPS):
            ctx.progress((step + 1) / STEPS)
            await asyncio.sleep(STEP_SECONDS)
        for key in provides:
            ctx.output_path(key).write_text(f"{name} {os.getpid()}\n")
            ctx.add_artifact(key)
        with (marker_dir / f"{name}.log").open("a") as log:
            log.write(f"end {os.getpid()}\n")

    return Stage(name, display, run, needs=needs, provides=provides, resource=Resource.CPU)


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

    uvloop.run(serve(settings, stages=pipeline(marker_dir)))


if __name__ == "__main__":
    main()
