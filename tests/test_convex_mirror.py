"""ConvexMirror against a fake deployment that speaks Convex's HTTP API (tests/fake_convex.py)."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from klipstream.config import Settings
from klipstream.errors import ErrorType
from klipstream.integrations.convex import ConvexMirror
from klipstream.jobs.store.sqlite import SQLiteStore
from klipstream.models import DisplayStage, Job, JobError, JobStatus, VideoInfo
from tests.fake_convex import FUNCTIONS, FakeConvex

CONVEX_DIR = Path(__file__).resolve().parent.parent / "convex"


@pytest.fixture
async def fake():
    f = FakeConvex(secret="s3cret")
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


class Mirror:
    """The mirror and the job store it sends from. `job_changed` does what the job service does
    with a change: write its Convex row (the service does it in the change's own transaction),
    then emit it."""

    def __init__(self, settings: Settings, http: aiohttp.ClientSession, store: SQLiteStore) -> None:
        self.m = ConvexMirror(settings, http, store, "test-sender")
        self.store = store
        self._writes: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        await self.store.open()
        await self.m.start()

    def job_changed(self, job: Job, kind: str) -> None:
        if kind == "progress":  # no save of its own: the mirror writes it
            self.m.job_changed(job, kind)
            return
        rows = self.m.updates(kind, job)
        self._writes.append(asyncio.ensure_future(self._save_then_emit(rows, job, kind)))

    async def _save_then_emit(self, rows: list[Any], job: Job, kind: str) -> None:
        await self.store.record_deliveries(rows)
        self.m.job_changed(job, kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.m, name)

    async def close(self, timeout: float) -> None:
        await asyncio.gather(*self._writes)
        await self.m.close(timeout)
        await self.store.close()


def _mirror(fake: FakeConvex, http: aiohttp.ClientSession, tmp: Path, secret: str = "s3cret") -> Mirror:
    settings = Settings.from_env({}, convex_url=fake.url + "/", convex_secret=secret, outbox_poll_seconds=0.2)
    return Mirror(settings, http, SQLiteStore(tmp / "store.sqlite3"))


ORDER = ["Queued", "Downloading", "Transcribing", "Completed", "Failed"]


def in_order(statuses: list[str]) -> bool:
    """The newest state of a job is sent, in order; an intermediate one may be skipped."""
    return statuses == sorted(statuses, key=ORDER.index) and len(set(statuses)) == len(statuses)


async def until(predicate: Callable[[], Any], within: float = 15.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), within)


T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _job(job_id: str = "j1", video_id: str = "2400000001", created: datetime = T0) -> Job:
    return Job(
        job_id=job_id,
        video_id=video_id,
        url=f"https://www.twitch.tv/videos/{video_id}",
        created_at=created,
        updated_at=created,
    )


def _step(job: Job, stage: DisplayStage | None = None, pct: float | None = None) -> Job:
    job.updated_at = job.updated_at + timedelta(milliseconds=10)
    if stage is not None:
        job.progress.current_stage = stage
    if pct is not None:
        job.progress.percentage = pct
    return job


def _statuses(fake: FakeConvex, twitch_id: str) -> list[str]:
    seen: list[str] = []
    for path, args in fake.calls:
        if args.get("twitchId") != twitch_id:
            continue
        status = {"video:markCompleted": "Completed", "video:markFailed": "Failed"}.get(path, args.get("status"))
        if status and (not seen or seen[-1] != status):
            seen.append(status)
    return seen


async def test_status_progress_and_completion_are_mirrored(fake: FakeConvex, http, tmp_path: Path):
    mirror = _mirror(fake, http, tmp_path)
    assert mirror.enabled
    await mirror.start()
    job = _job()
    mirror.job_changed(job, "queued")
    job.status = JobStatus.RUNNING
    job.started_at = T0 + timedelta(seconds=1)
    mirror.job_changed(_step(job, DisplayStage.DOWNLOADING), "started")
    for i in range(20):  # a second of progress at 20 updates/s
        job.progress.estimated_completion_seconds = 100.0 - i
        mirror.job_changed(_step(job, pct=float(i)), "progress")
        await asyncio.sleep(0.05)
    mirror.job_changed(_step(job, DisplayStage.TRANSCRIBING, 50.0), "stage_changed")
    await until(lambda: (fake.row("2400000001") or {}).get("status") == "Transcribing")
    job.video = VideoInfo(title="Big stream")
    job.results = {
        "audio": "https://cdn/a.mp3",
        "waveform": "https://cdn/w.json",
        "segments_csv": "https://cdn/s.csv",
        "words_csv": "https://cdn/words.csv",
        "chat_csv": "https://cdn/chat.csv",
        "chat_json": "https://cdn/chat.json",
        "sentiment_csv": "https://cdn/sent.csv",
    }
    job.status = JobStatus.COMPLETED
    job.finished_at = T0 + timedelta(minutes=5)
    mirror.job_changed(_step(job, DisplayStage.COMPLETED, 100.0), "completed")
    await until(lambda: (fake.row("2400000001") or {}).get("status") == "Completed")
    assert await _settled(mirror)
    await mirror.close(5)

    row = fake.row("2400000001")
    assert row is not None
    assert row["jobId"] == "j1" and row["title"] == "Big stream"
    assert row["progressPercentage"] == 100 and row["currentStage"] == "Completed"
    assert row["createdAt"] == T0.timestamp() * 1000
    assert row["processingStartedAt"] == (T0 + timedelta(seconds=1)).timestamp() * 1000
    assert row["processingCompletedAt"] == job.finished_at.timestamp() * 1000
    assert row["audio_url"] == "https://cdn/a.mp3"
    assert row["waveform_url"] == row["audiowaveUrl"] == "https://cdn/w.json"
    assert row["transcript_url"] == row["transcriptUrl"] == "https://cdn/s.csv"
    assert row["transcriptWords_url"] == row["transcriptWordUrl"] == "https://cdn/words.csv"
    assert row["chat_url"] == row["chatUrl"] == "https://cdn/chat.csv"
    assert row["analysis_url"] == row["transcriptAnalysisUrl"] == "https://cdn/sent.csv"
    statuses = _statuses(fake, "2400000001")
    assert in_order(statuses) and statuses[-1] == "Completed" and "Transcribing" in statuses
    progress_only = [a for p, a in fake.calls if p == "video:upsertJobProgress" and a["status"] == "Downloading"]
    assert len(progress_only) <= 4  # the start plus about one progress update per second
    assert fake.errors == []


async def _settled(mirror: Mirror) -> bool:
    """Nothing left to send (the last send's outcome is recorded just after it lands)."""
    for _ in range(100):
        if await mirror.pending() == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_failure_is_mirrored_with_error_fields(fake: FakeConvex, http, tmp_path: Path):
    mirror = _mirror(fake, http, tmp_path)
    await mirror.start()
    job = _job()
    mirror.job_changed(_step(job, DisplayStage.DOWNLOADING, 5.0), "started")
    job.status = JobStatus.FAILED
    job.error = JobError(
        error_type=ErrorType.VIDEO_NOT_FOUND,
        error_code="video_not_found",
        message="The VOD was deleted.",
        suggested_action="Check the id.",
    )
    mirror.job_changed(_step(job, DisplayStage.FAILED), "failed")
    await until(lambda: (fake.row("2400000001") or {}).get("status") == "Failed")
    row = fake.row("2400000001")
    assert row is not None
    assert (row["errorType"], row["errorMessage"], row["isRetryable"]) == (
        "video_not_found",
        "The VOD was deleted.",
        False,
    )
    await mirror.close(5)
    assert fake.errors == []


async def test_outage_then_recovery_delivers_final_state(fake: FakeConvex, http, tmp_path: Path):
    mirror = _mirror(fake, http, tmp_path)
    await mirror.start()
    job = _job()
    mirror.job_changed(_step(job, DisplayStage.DOWNLOADING, 1.0), "started")
    await until(lambda: fake.row("2400000001") is not None)
    await fake.stop()  # connection refused from here on
    mirror.job_changed(_step(job, DisplayStage.TRANSCRIBING, 40.0), "stage_changed")
    fake.fail_503 = True
    job.results = {"audio": "https://cdn/a.mp3", "segments_csv": "https://cdn/s.csv"}
    job.status = JobStatus.COMPLETED
    mirror.job_changed(_step(job, DisplayStage.COMPLETED, 100.0), "completed")  # the job is done meanwhile
    await asyncio.sleep(1.0)
    await fake.start()  # back on the same port, but answering 503 for a while
    await asyncio.sleep(0.5)
    fake.fail_503 = False
    await until(lambda: (fake.row("2400000001") or {}).get("status") == "Completed")
    row = fake.row("2400000001")
    assert row is not None and row["transcript_url"] == "https://cdn/s.csv" and row["audio_url"] == "https://cdn/a.mp3"
    statuses = _statuses(fake, "2400000001")
    assert in_order(statuses) and statuses[0] == "Downloading" and statuses[-1] == "Completed"
    await mirror.close(5)


async def test_slow_convex_never_blocks_callers(fake: FakeConvex, http, tmp_path: Path):
    fake.delay = 1.5
    mirror = _mirror(fake, http, tmp_path)
    await mirror.start()
    job = _job()
    mirror.job_changed(_step(job, DisplayStage.DOWNLOADING, 1.0), "started")
    await until(lambda: fake.in_flight == 1)
    # While Convex sits on the request, callers keep going and the loop stays free.
    assert not inspect.iscoroutinefunction(mirror.job_changed)
    for i in range(200):
        mirror.job_changed(_step(job, pct=float(i) / 4), "progress")
    ticks = 0
    for _ in range(10):
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 10 and fake.in_flight == 1 and fake.calls == []
    job.status = JobStatus.COMPLETED
    mirror.job_changed(_step(job, DisplayStage.COMPLETED, 100.0), "completed")
    fake.delay = 0
    await until(lambda: (fake.row("2400000001") or {}).get("status") == "Completed")
    assert len(fake.calls) <= 4  # started, maybe one coalesced progress, completed
    await mirror.close(5)


async def test_no_duplicate_rows_per_twitch_id(fake: FakeConvex, http, tmp_path: Path):
    mirror = _mirror(fake, http, tmp_path)
    await mirror.start()
    jobs = [_job(f"j{i}", created=T0 + timedelta(seconds=i)) for i in range(3)]
    for job in jobs:
        mirror.job_changed(_step(job, DisplayStage.DOWNLOADING, 1.0), "started")
    await until(lambda: len(fake.calls) == 3)
    assert len(fake.videos) == 1
    assert fake.row("2400000001")["jobId"] == "j2"  # the newest job owns the row
    # A late update of an older job does not overwrite the newer one.
    mirror.job_changed(_step(jobs[0], DisplayStage.TRANSCRIBING, 50.0), "stage_changed")
    await until(lambda: len(fake.calls) == 4)
    assert fake.row("2400000001")["status"] == "Downloading"
    assert len(fake.videos) == 1
    await mirror.close(5)


async def test_refused_calls_are_dropped_not_retried(fake: FakeConvex, http, tmp_path: Path):
    mirror = _mirror(fake, http, tmp_path, secret="wrong")
    await mirror.start()
    mirror.job_changed(_step(_job(), DisplayStage.DOWNLOADING, 1.0), "started")
    await until(lambda: len(fake.errors) == 1)
    await asyncio.sleep(0.3)
    assert len(fake.errors) == 1 and "Unauthorized" in fake.errors[0]
    assert await mirror.pending() == 0
    await mirror.close(1)


async def test_unsent_state_is_sent_after_a_restart(fake: FakeConvex, http, tmp_path: Path):
    """The newest state is in the job store, not in memory: a process that stops before sending it
    (Convex down) leaves it to the next one."""
    await fake.stop()
    mirror = _mirror(fake, http, tmp_path)
    await mirror.start()
    job = _job()
    mirror.job_changed(_step(job, DisplayStage.DOWNLOADING, 1.0), "started")
    job.status = JobStatus.COMPLETED
    mirror.job_changed(_step(job, DisplayStage.COMPLETED, 100.0), "completed")
    await asyncio.gather(*mirror._writes)
    assert await mirror.pending() == 1
    await mirror.close(1)
    await fake.start()
    again = _mirror(fake, http, tmp_path)
    await again.start()
    await until(lambda: (fake.row("2400000001") or {}).get("status") == "Completed")
    assert [p for p, _ in fake.calls] == ["video:markCompleted"]  # only the newest state
    assert await again.pending() == 0
    await again.close(1)


async def test_disabled_without_convex_url(http, tmp_path: Path):
    mirror = Mirror(Settings.from_env({}), http, SQLiteStore(tmp_path / "store.sqlite3"))
    assert not mirror.enabled
    await mirror.start()
    mirror.job_changed(_job(), "started")
    assert await mirror.pending() == 0
    await mirror.close(1)


async def test_non_twitch_jobs_are_not_mirrored(fake: FakeConvex, http, tmp_path: Path):
    mirror = _mirror(fake, http, tmp_path)
    await mirror.start()
    mirror.job_changed(_job(video_id="u0123456789abcde"), "started")
    assert await mirror.pending() == 0
    await mirror.close(1)


async def test_legacy_functions(fake: FakeConvex, http):
    mirror = ConvexMirror(Settings.from_env({}, convex_url=fake.url, convex_secret="s3cret"), http, None, "t")  # type: ignore[arg-type]
    await mirror.mutation("video:updateStatusByTwitchId", {"twitchId": "55555", "status": "Transcribing"})
    await mirror.mutation("video:updateUrls", {"twitchId": "55555", "urls": {"chat_url": "https://c"}})
    row = await mirror.query("video:getByTwitchIdPublic", {"twitchId": "55555"})
    assert row["status"] == "Transcribing" and row["chat_url"] == "https://c"
    assert len(fake.videos) == 1


@pytest.mark.skipif(
    shutil.which("node") is None or not (CONVEX_DIR / "node_modules" / "convex").is_dir(),
    reason="needs node and `npm ci` in convex/ (CI runs both)",
)
def test_fake_matches_the_real_convex_functions(tmp_path: Path):
    """The fake's argument validators are exactly what convex/video.ts exports."""
    bundle = tmp_path / "video.mjs"
    subprocess.run(
        [str(CONVEX_DIR / "node_modules" / ".bin" / "esbuild"), str(CONVEX_DIR / "video.ts"), "--bundle",
         "--format=esm", "--platform=node", f"--outfile={bundle}", "--log-level=warning"],
        check=True, timeout=60,
    )  # fmt: skip
    script = (
        f"const m = await import({json.dumps(bundle.as_uri())});"
        "const out = {};"
        "for (const [k, f] of Object.entries(m)) if (f && f.exportArgs)"
        " out['video:' + k] = [f.isQuery ? 'query' : 'mutation', JSON.parse(f.exportArgs())];"
        "console.log(JSON.stringify(out));"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script], check=True, capture_output=True, text=True, timeout=60
    )
    exported = {k: tuple(v) for k, v in json.loads(done.stdout).items()}
    assert exported == FUNCTIONS
