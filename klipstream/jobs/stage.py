"""What a pipeline stage is, and the context it runs with.

A stage is a coroutine plus a declaration: which artifacts it needs, which it may use, which it
provides, how much of the job's progress it represents and which resource pool it runs in. The
runner (klipstream/runner.py) uses the declarations to start every stage as soon as its inputs
exist, so independent stages overlap without any stage knowing about the others.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from klipstream.artifacts import spec
from klipstream.errors import InternalError
from klipstream.models import DisplayStage, Job, JobOptions, VideoInfo

if TYPE_CHECKING:
    import aiohttp

    from klipstream.config import Settings
    from klipstream.transcription.pool import Transcriber

T = TypeVar("T")


class Resource(StrEnum):
    NETWORK = "network"  # downloads and remote APIs
    CPU = "cpu"  # decoding and analysis in threads
    TRANSCRIPTION = "transcription"  # the faster-whisper process pool


@dataclass(frozen=True)
class Stage:
    name: str
    display: DisplayStage
    run: Callable[[StageContext], Awaitable[None]]
    needs: tuple[str, ...] = ()  # artifact keys that must exist before it starts
    uses: tuple[str, ...] = ()  # artifact keys it reads when present; it waits for their producers
    provides: tuple[str, ...] = ()
    weight: float = 1.0  # share of the job's progress bar
    resource: Resource = Resource.CPU
    timeout: Callable[[StageContext], float] | None = None  # seconds; None: the global stage timeout
    wanted: Callable[[JobOptions], bool] | None = None  # opt-in stages: skipped unless the job asks for them


class ProgressSink:
    """Where a stage's progress goes; the runner implements it."""

    def stage_progress(self, stage: str, fraction: float, detail: str | None) -> None:
        raise NotImplementedError

    def warn(self, stage: str, message: str) -> None:
        raise NotImplementedError

    def set_video(self, info: VideoInfo) -> None:
        raise NotImplementedError

    def set_highlights(self, highlights: list[dict[str, Any]]) -> None:
        raise NotImplementedError


class StageContext:
    """Everything a stage may touch. Stages get inputs and write outputs only through it."""

    def __init__(
        self,
        *,
        job: Job,
        stage: Stage,
        workdir: Path,
        settings: Settings,
        http: aiohttp.ClientSession,
        inputs: dict[str, Path],
        sink: ProgressSink,
        transcriber: Transcriber | None = None,
        user_http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.job = job
        self.stage = stage
        self.workdir = workdir
        self.settings = settings
        self.http = http  # operator-configured services (Twitch GQL, the LLM)
        # URLs a user supplied go through the one public-only client (klipstream.network)
        self.user_http = user_http or http
        self.inputs = inputs
        self.sink = sink
        self.transcriber = transcriber  # the shared transcription pool (klipstream.transcription)
        self.outputs: dict[str, Path] = {}
        self.cancelled = threading.Event()  # set when the stage is cancelled; threads poll it
        self.started = time.monotonic()

    # --- job facts ---
    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def video_id(self) -> str:
        return self.job.video_id

    @property
    def url(self) -> str:
        return self.job.url

    @property
    def chat_url(self) -> str | None:
        return self.job.chat_url

    @property
    def options(self) -> JobOptions:
        return self.job.options

    @property
    def video(self) -> VideoInfo | None:
        return self.job.video

    # --- inputs and outputs ---
    def input(self, key: str) -> Path:
        try:
            return self.inputs[key]
        except KeyError:
            raise InternalError(f"stage {self.stage.name} started without its input {key!r}") from None

    def optional_input(self, key: str) -> Path | None:
        return self.inputs.get(key)

    def output_path(self, key: str, ext: str | None = None) -> Path:
        """Where to write artifact `key`: its canonical name inside this job's own directory."""
        return self.workdir / spec(key).filename(self.video_id, ext)

    def add_artifact(self, key: str, path: Path | None = None) -> Path:
        """Record a finished artifact; the runner checkpoints and publishes it after the stage."""
        path = path or self.output_path(key)
        if not path.is_file():
            raise InternalError(f"stage {self.stage.name} recorded {key!r} but {path.name} was not written")
        self.outputs[key] = path
        return path

    # --- reporting ---
    def progress(self, fraction: float, detail: str | None = None) -> None:
        """Report this stage's progress in [0, 1]; cheap, callable from the event loop only."""
        self.sink.stage_progress(self.stage.name, min(1.0, max(0.0, fraction)), detail)

    def progress_threadsafe(self, loop: asyncio.AbstractEventLoop, fraction: float, detail: str | None = None) -> None:
        loop.call_soon_threadsafe(self.progress, fraction, detail)

    def warn(self, message: str) -> None:
        self.sink.warn(self.stage.name, message)

    def set_video(self, info: VideoInfo) -> None:
        self.sink.set_video(info)

    def set_highlights(self, highlights: list[dict[str, Any]]) -> None:
        self.sink.set_highlights(highlights)

    # --- blocking work ---
    async def to_thread(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run blocking `fn` in a thread; on cancellation the thread is told through `self.cancelled`.

        Python threads cannot be killed, so long-running functions must poll `self.cancelled`; the
        coroutine itself returns at once when cancelled.
        """
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.cancelled.set()
            # Give the thread a moment to notice, so it is not still writing while the runner
            # removes the job's partial files.
            await asyncio.wait([future], timeout=1.5)
            raise
