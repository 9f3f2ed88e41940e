"""Plain data types of the API and the job store, as pydantic models.

The OpenAPI document is generated from these, so they are the single description of the wire
format.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from klipstream.errors import ErrorType


def utcnow() -> datetime:
    return datetime.now(UTC)


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"

    @property
    def level(self) -> int:
        return _PRIORITY_LEVEL[self]


_PRIORITY_LEVEL = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.URGENT: 3}


class JobStatus(StrEnum):
    QUEUED = "queued"  # accepted and waiting for a worker
    RUNNING = "running"  # a worker is running its stages
    COMPLETED = "completed"  # every stage finished or was legitimately unavailable
    FAILED = "failed"  # a stage failed for good; `error` says why
    CANCELLED = "cancelled"  # stopped on request

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


# The statuses a job does not leave on its own; also the names of the terminal stream events.
TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class StageStatus(StrEnum):
    PENDING = "pending"  # waiting for its inputs or a resource slot
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"  # its source does not exist for this video (e.g. chat refused)
    SKIPPED = "skipped"  # an input it needs is unavailable
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (StageStatus.COMPLETED, StageStatus.UNAVAILABLE, StageStatus.SKIPPED)


class DisplayStage(StrEnum):
    """Status strings the frontend and the Convex `videos.status` field already know."""

    QUEUED = "Queued"
    DOWNLOADING = "Downloading"
    FETCHING_CHAT = "Fetching chat"
    PROCESSING_AUDIO = "Processing audio"
    TRANSCRIBING = "Transcribing"
    ANALYZING = "Analyzing"
    FINDING_HIGHLIGHTS = "Finding highlights"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VerticalFill(StrEnum):
    BLUR = "blur"  # gameplay fit to the width over a blurred copy of itself
    CROP = "crop"  # gameplay scaled to cover the 9:16 frame, centre kept


class FacecamBox(Strict):
    """Where the facecam is in the source frame, in fractions of its width and height."""

    x: float = Field(..., ge=0, lt=1)
    y: float = Field(..., ge=0, lt=1)
    width: float = Field(..., gt=0, le=1)
    height: float = Field(..., gt=0, le=1)

    @model_validator(mode="after")
    def _inside(self) -> FacecamBox:
        if self.x + self.width > 1.0001 or self.y + self.height > 1.0001:
            raise ValueError("the facecam box must lie inside the frame (x + width <= 1, y + height <= 1)")
        return self


class ClipOptions(Strict):
    vertical: bool = Field(False, description="Also make a 9:16 version with burned-in word-by-word captions.")
    fill: VerticalFill = Field(VerticalFill.BLUR, description="How the vertical version fills the frame.")
    facecam: FacecamBox | None = Field(None, description="Facecam region, stacked above the gameplay.")
    captions: bool = Field(True, description="Burn captions into the vertical version.")
    height: int | None = Field(None, ge=144, le=2160, description="Clip height (default KLIPSTREAM_CLIP_HEIGHT).")
    vertical_height: int | None = Field(
        None, ge=320, le=3840, description="Vertical height; width is 9/16 of it (default KLIPSTREAM_VERTICAL_HEIGHT)."
    )


class JobOptions(Strict):
    force: bool = Field(False, description="Run even if the same video is already queued or running.")
    include_video: bool = Field(False, description="Also download a video rendition.")
    video_height: int | None = Field(None, ge=144, le=2160, description="Height of the video rendition.")
    language: str | None = Field(None, min_length=2, max_length=8, pattern=r"^[a-zA-Z-]+$")
    initial_prompt: str | None = Field(None, max_length=1000)
    top_n: int | None = Field(None, ge=1, le=100, description="How many highlights to return.")
    webhook_progress: bool = Field(False, description="Also send throttled job.progress webhooks.")
    clips: ClipOptions | bool | None = Field(
        None,
        description="Cut a clip, thumbnail, captions and edit lists per highlight: true, or the clip options. "
        "Implies include_video.",
    )

    @model_validator(mode="after")
    def _clips_need_video(self) -> JobOptions:
        """`clips: true` is the default clip options; asking for clips means fetching the video."""
        if self.clips is True:
            self.clips = ClipOptions()
        elif self.clips is False:
            self.clips = None
        if self.clips is not None:
            self.include_video = True
        return self

    @property
    def clip_options(self) -> ClipOptions | None:
        return self.clips if isinstance(self.clips, ClipOptions) else None


# Options that change how a job is run or reported, not what it produces: two submissions that
# differ only in these share one job. Every other option (and any option added later) is part of
# the deduplication key.
RESULT_NEUTRAL_OPTIONS = frozenset({"force", "webhook_progress"})


class SubmitRequest(Strict):
    url: str = Field(..., min_length=1, max_length=2048)
    callback_url: str | None = Field(None, max_length=2048)
    chat_url: str | None = Field(None, max_length=2048)
    priority: Priority = Priority.NORMAL
    options: JobOptions = Field(default_factory=JobOptions)


class Progress(BaseModel):
    percentage: float = 0.0
    current_stage: DisplayStage = DisplayStage.QUEUED
    stages_completed: int = 0
    total_stages: int = 0
    estimated_completion_seconds: float | None = None


class JobError(BaseModel):
    error_type: ErrorType
    error_code: str
    message: str
    stage: str | None = None
    is_retryable: bool = False
    retry_after_seconds: float | None = None
    suggested_action: str


class StageState(BaseModel):
    name: str
    display: DisplayStage
    status: StageStatus = StageStatus.PENDING
    progress: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    error: JobError | None = None
    message: str | None = None


class VideoInfo(BaseModel):
    id: str | None = None
    title: str | None = None
    channel: str | None = None
    channel_login: str | None = None  # the channel's Twitch login, when the source has one
    duration_seconds: float | None = None
    published_at: str | None = None
    thumbnail_url: str | None = None
    extractor: str | None = None


class Checkpoint(BaseModel):
    """A completed stage's output copied to shared storage, so a job resumed on another instance
    restores it instead of downloading or transcribing again (klipstream.jobs.checkpoints)."""

    file: str = Field(description="File name in the job directory.")
    uri: str = Field(description="Where the copy is, e.g. gs://bucket/_checkpoints/{job_id}/{file}.")
    size: int
    md5: str = Field(description="Base64 MD5 the storage confirmed; a restore that reads other bytes is refused.")


class Job(BaseModel):
    job_id: str
    video_id: str
    url: str
    chat_url: str | None = None
    callback_url: str | None = None
    callbacks: list[str] = Field(
        default_factory=list,
        description="Callback URLs of later submissions that were deduplicated onto this job; "
        "each receives the job's events from the time it was attached.",
    )
    dedup_key: str = Field(
        "",
        description="Video id plus a digest of the result-affecting options: submissions with the same key "
        "share one active job.",
    )
    priority: Priority = Priority.NORMAL
    options: JobOptions = Field(default_factory=JobOptions)
    status: JobStatus = JobStatus.QUEUED
    progress: Progress = Field(default_factory=Progress)
    stages: list[StageState] = Field(default_factory=list)
    results: dict[str, str] = Field(default_factory=dict, description="Artifact key to a URL a client can fetch.")
    result_uris: dict[str, str] = Field(default_factory=dict, description="Artifact key to its storage URI.")
    artifacts: dict[str, str] = Field(
        default_factory=dict, description="Artifact key to file name in the job directory."
    )
    checkpoints: dict[str, Checkpoint] = Field(
        default_factory=dict,
        description="Artifact key to its copy in shared storage: what an instance resuming this job can "
        "restore instead of running the stage that made it again (empty with local storage).",
    )
    error: JobError | None = None
    warnings: list[str] = Field(default_factory=list)
    video: VideoInfo | None = None
    highlights: list[dict[str, Any]] = Field(default_factory=list)
    attempts: int = 0
    retry_count: int = 0
    event_seq: int = Field(
        0,
        description="Id of the job's last event-stream event (its sequence in the job_events table): the same on "
        "every instance, so a stream reopened anywhere with this Last-Event-ID has missed nothing.",
    )
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = None
    status_url: str = ""
    stream_url: str = ""

    def stage(self, name: str) -> StageState:
        for state in self.stages:
            if state.name == name:
                return state
        raise KeyError(name)


class JobStatusView(BaseModel):
    """The compact answer for polling clients."""

    job_id: str
    video_id: str
    status: JobStatus
    progress: Progress
    queue_position: int | None = None
    error: JobError | None = None
    updated_at: datetime


class SubmitResponse(BaseModel):
    job_id: str
    video_id: str
    status: JobStatus
    progress: Progress
    queue_position: int | None
    status_url: str
    stream_url: str
    created_at: datetime
    deduplicated: bool = False


class JobList(BaseModel):
    jobs: list[JobStatusView]
    next_cursor: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details, the one error body of the API."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[dict[str, Any]] | None = None


class HealthView(BaseModel):
    state: str
    version: str
    detail: dict[str, Any] = Field(default_factory=dict)


class QueueStats(BaseModel):
    paused: bool
    draining: bool
    queued: dict[str, int]
    queued_total: int
    oldest_queued_age_seconds: float | None
    running: list[dict[str, Any]]
    resources: dict[str, dict[str, int]]
    last_hour: dict[str, int]
    stage_durations: dict[str, dict[str, float]]
    webhook_backlog: int = 0
    streams: dict[str, int] = Field(
        default_factory=dict, description="Event topics, stream subscribers and asyncio tasks in this process."
    )
    instance_id: str | None = Field(None, description="This instance's id when several share one database.")
    instances: list[dict[str, Any]] = Field(
        default_factory=list,
        description="With a shared database: every instance with its last heartbeat (database clock, epoch "
        "seconds), running jobs and job limit (0: API only).",
    )
