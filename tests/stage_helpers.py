"""Run one stage outside the server, for stage-level tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from klipstream.config import Settings
from klipstream.jobs.stage import ProgressSink, Stage, StageContext
from klipstream.models import Job, JobOptions, VideoInfo
from klipstream.network import video_id_for


class RecordingSink(ProgressSink):
    """Keeps everything a stage reports so tests can assert on it."""

    def __init__(self) -> None:
        self.progress: list[tuple[str, float, str | None]] = []
        self.warnings: list[str] = []
        self.video: VideoInfo | None = None
        self.highlights: list[dict[str, Any]] = []

    def stage_progress(self, stage: str, fraction: float, detail: str | None) -> None:
        self.progress.append((stage, fraction, detail))

    def warn(self, stage: str, message: str) -> None:
        self.warnings.append(message)

    def set_video(self, info: VideoInfo) -> None:
        self.video = info

    def set_highlights(self, highlights: list[dict[str, Any]]) -> None:
        self.highlights = highlights


def make_context(
    stage: Stage,
    workdir: Path,
    http: aiohttp.ClientSession,
    *,
    url: str = "https://www.twitch.tv/videos/123456789",
    chat_url: str | None = None,
    inputs: dict[str, Path] | None = None,
    options: dict[str, Any] | None = None,
    transcriber: Any = None,
    video: VideoInfo | None = None,
    **settings: Any,
) -> tuple[StageContext, RecordingSink]:
    settings.setdefault("data_dir", workdir)
    settings.setdefault("allow_private_urls", True)
    job = Job(
        job_id="test-job",
        video_id=video_id_for(url),
        url=url,
        chat_url=chat_url,
        options=JobOptions(**(options or {})),
        video=video,
    )
    sink = RecordingSink()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        job=job,
        stage=stage,
        workdir=workdir,
        settings=Settings.from_env({}, **settings),
        http=http,
        inputs=dict(inputs or {}),
        sink=sink,
        transcriber=transcriber,
    )
    return ctx, sink
