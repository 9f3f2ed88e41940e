"""Stages used only by tests to exercise the scheduler (blocking, failing, slow, gated).

They do real, checkable work (write files, record order) so tests can assert on what happened; the
shipped pipeline never contains them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from klipstream.errors import NetworkError, StageUnavailable, VideoNotFound
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage


@dataclass
class Recorder:
    """Shared between a test and its stages."""

    log: list[tuple[str, str, float]] = field(default_factory=list)  # (stage, event, time)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    failures: dict[str, list[Exception]] = field(default_factory=dict)

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def mark(self, stage: str, event: str) -> None:
        self.log.append((stage, event, time.monotonic()))

    def events(self, stage: str) -> list[str]:
        return [e for s, e, _ in self.log if s == stage]


def writing_stage(
    name: str,
    recorder: Recorder,
    *,
    needs: tuple[str, ...] = (),
    uses: tuple[str, ...] = (),
    provides: tuple[str, ...] = (),
    display: DisplayStage = DisplayStage.ANALYZING,
    resource: Resource = Resource.CPU,
    gated: bool = False,
    steps: int = 4,
    step_seconds: float = 0.01,
    unavailable: bool = False,
    timeout: Callable[[StageContext], float] | None = None,
) -> Stage:
    """A stage that reports progress in `steps`, optionally waits on a gate, and writes its outputs."""

    async def run(ctx: StageContext) -> None:
        recorder.mark(name, "start")
        try:
            planned = recorder.failures.get(name)
            if planned:
                raise planned.pop(0)
            if unavailable:
                raise StageUnavailable(f"{name} has no source")
            for step in range(steps):
                ctx.progress((step + 1) / steps, f"step {step + 1}/{steps}")
                await asyncio.sleep(step_seconds)
            if gated:
                await recorder.gate(name).wait()
            for key in provides:
                path = ctx.output_path(key)
                inputs = ",".join(sorted(ctx.inputs))
                path.write_text(f"{name} made {key} from [{inputs}]\n")
                ctx.add_artifact(key, path)
            recorder.mark(name, "end")
        except asyncio.CancelledError:
            recorder.mark(name, "cancelled")
            raise

    return Stage(
        name=name,
        display=display,
        run=run,
        needs=needs,
        uses=uses,
        provides=provides,
        resource=resource,
        timeout=timeout,
    )


def blocking_stage(name: str, recorder: Recorder, seconds: float, *, provides: tuple[str, ...] = ()) -> Stage:
    """Blocking work done the right way: in a thread, polling the cancel flag."""

    def work(ctx: StageContext) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not ctx.cancelled.is_set():
            time.sleep(0.01)

    async def run(ctx: StageContext) -> None:
        recorder.mark(name, "start")
        await ctx.to_thread(work, ctx)
        for key in provides:
            ctx.output_path(key).write_text("x")
            ctx.add_artifact(key)
        recorder.mark(name, "end")

    return Stage(name=name, display=DisplayStage.PROCESSING_AUDIO, run=run, provides=provides)


def simple_pipeline(recorder: Recorder, **gates: bool) -> list[Stage]:
    """download -> audio -> transcribe, chat in parallel, analysis using chat when present."""
    return [
        writing_stage(
            "download",
            recorder,
            provides=("media",),
            display=DisplayStage.DOWNLOADING,
            resource=Resource.NETWORK,
            gated=gates.get("download", False),
        ),
        writing_stage(
            "chat",
            recorder,
            provides=("chat_json",),
            display=DisplayStage.FETCHING_CHAT,
            resource=Resource.NETWORK,
            gated=gates.get("chat", False),
        ),
        writing_stage(
            "audio",
            recorder,
            needs=("media",),
            provides=("pcm", "waveform"),
            display=DisplayStage.PROCESSING_AUDIO,
            gated=gates.get("audio", False),
        ),
        writing_stage(
            "transcribe",
            recorder,
            needs=("pcm",),
            provides=("transcript_json",),
            display=DisplayStage.TRANSCRIBING,
            resource=Resource.TRANSCRIPTION,
            gated=gates.get("transcribe", False),
        ),
        writing_stage(
            "highlights",
            recorder,
            needs=("waveform",),
            uses=("transcript_json", "chat_json"),
            provides=("highlights_json",),
            display=DisplayStage.FINDING_HIGHLIGHTS,
        ),
    ]


RETRYABLE = NetworkError
PERMANENT = VideoNotFound
