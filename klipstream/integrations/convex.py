"""Write-behind mirror of job status into the Convex `videos` table the web frontend subscribes to.

Convex is a convenience for the frontend, not part of the job: the newest state of each job is a
row of the job store's outbox, written with the job change, and a background sender pushes it out.
Progress is coalesced (at most about one update per second per job; the newest state wins, so an
intermediate state may be skipped, never the final one). Transient failures are retried with
capped backoff, so after an outage (or a restart) the final state and URLs still arrive. Nothing
here can fail or slow a job.

Protocol: Convex's HTTP API, POST {CONVEX_URL}/api/mutation with {path, args, format: "json"},
answered by {status: "success", value} or {status: "error", errorMessage}. Arguments are encoded
with the `convex` package's value encoding. Writes carry the shared secret KLIPSTREAM_CONVEX_SECRET,
which every writing function in convex/video.ts checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from convex.values import convex_to_json

from klipstream.integrations.outbox import dumps
from klipstream.jobs.store import CONVEX, ConvexUpdate, DeliveryRow
from klipstream.models import TERMINAL_STATUSES, Job
from klipstream.retry import RetryPolicy

if TYPE_CHECKING:
    from klipstream.config import Settings
    from klipstream.jobs.store import JobStore

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0  # seconds between progress-only updates of one job
_REQUEST_TIMEOUT = 10.0
CONVEX_RETRY = RetryPolicy(None, 0.5, 30.0)  # until sent

# Artifact key -> the Convex URL fields it fills (current snake_case name, older camelCase name).
URL_FIELDS: dict[str, tuple[str, ...]] = {
    "video": ("video_url",),
    "audio": ("audio_url",),
    "waveform": ("waveform_url", "audiowaveUrl"),
    "segments_csv": ("transcript_url", "transcriptUrl"),
    "words_csv": ("transcriptWords_url", "transcriptWordUrl"),
    "chat_csv": ("chat_url", "chatUrl"),
    "chat_json": ("chat_url", "chatUrl"),
    "sentiment_csv": ("analysis_url", "transcriptAnalysisUrl"),
}


class ConvexCallError(Exception):
    """Convex answered but refused the call (validation, auth): retrying the same call cannot help."""


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def convex_urls(results: dict[str, str]) -> dict[str, str]:
    urls: dict[str, str] = {}
    for key, names in URL_FIELDS.items():
        if key == "chat_json" and "chat_csv" in results:
            continue  # the CSV is what chat_url has always pointed at
        if key in results:
            for name in names:
                urls[name] = results[key]
    return urls


def twitch_id(job: Job) -> str | None:
    """The videos table is keyed by Twitch VOD id; jobs for other URLs are not mirrored."""
    return job.video_id if job.video_id.isdigit() else None


def convex_call(job: Job, kind: str) -> tuple[str, dict[str, Any]] | None:
    """The mutation path and arguments (without the secret) that mirror `job` after `kind`."""
    tid = twitch_id(job)
    if tid is None:
        return None
    args: dict[str, Any] = {
        "twitchId": tid,
        "jobId": job.job_id,
        "createdAt": _ms(job.created_at),
        "updatedAt": _ms(job.updated_at),
        "retryCount": job.retry_count,
    }
    if job.started_at is not None:
        args["processingStartedAt"] = _ms(job.started_at)
    if job.video is not None and job.video.title:
        args["title"] = job.video.title
    urls = convex_urls(job.results)
    if urls:
        args["urls"] = urls
    finished = _ms(job.finished_at) or _ms(job.updated_at)
    percentage = float(job.progress.percentage)
    if kind == "completed":
        return "video:markCompleted", {**args, "processingCompletedAt": finished}
    if kind == "cancelled":
        return "video:markCancelled", {**args, "processingCompletedAt": finished, "progressPercentage": percentage}
    if kind == "failed":
        error = job.error
        return "video:markFailed", {
            **args,
            "processingCompletedAt": finished,
            "progressPercentage": percentage,
            "errorType": error.error_type.value if error else "internal_error",
            "errorMessage": error.message if error else "The job failed.",
            "isRetryable": bool(error and error.is_retryable),
        }
    stage = job.progress.current_stage.value
    progress = {**args, "status": stage, "currentStage": stage, "progressPercentage": percentage}
    if job.progress.estimated_completion_seconds is not None:
        progress["estimatedCompletionSeconds"] = float(job.progress.estimated_completion_seconds)
    return "video:upsertJobProgress", progress


class ConvexMirror:
    """Produces the Convex state of each job change and sends the newest state of each job.

    The state is a row of the job store's outbox (one per job, the newest replacing the older),
    written in the same transaction as the job change (`updates`, composed into the runner's
    effects): a `kill -9` right after a job completes cannot lose its final state. Progress, which
    has no save of its own, is written by `job_changed` at most once per MIN_INTERVAL per job. The
    send loop claims due rows with a lease (PostgreSQL: SKIP LOCKED), so instances sharing a store
    never send a job's state at the same time; transient failures are retried with capped backoff
    for as long as it takes, so after an outage the final state and URLs still arrive."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, store: JobStore, owner: str) -> None:
        self._settings = settings
        self._url = settings.convex_url.rstrip("/")
        self._secret = settings.convex_secret
        self._session = session
        self._store = store
        self._owner = owner
        self._last_progress: dict[str, float] = {}  # job id -> monotonic time of its last progress row
        self._limit = asyncio.Semaphore(4)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._closing = False
        self.sent = 0  # successful calls, for tests and stats

    @property
    def enabled(self) -> bool:
        return bool(self._url and self._secret)

    def updates(self, kind: str | None, job: Job) -> list[DeliveryRow]:
        """The Convex row a job change of this kind writes with it (none for progress-only saves)."""
        if not self.enabled or kind is None or kind == "progress":
            return []
        call = convex_call(job, kind)
        if call is None:
            return []
        if kind in TERMINAL_STATUSES:
            self._last_progress.pop(job.job_id, None)
        path, args = call
        return [DeliveryRow("", job.job_id, CONVEX, path, dumps(args), time.time())]

    def job_changed(self, job: Job, kind: str) -> None:
        """A job event was emitted (after its save committed): wake the sender. Progress has no
        save of its own: its row is written here, at most once per MIN_INTERVAL per job. Never
        blocks, never raises."""
        if not self.enabled or self._closing:
            return
        try:
            if kind != "progress":
                self._wake.set()
                return
            now = time.monotonic()
            if now - self._last_progress.get(job.job_id, float("-inf")) < MIN_INTERVAL:
                return
            call = convex_call(job, kind)
            if call is None:
                return
            self._last_progress[job.job_id] = now
            row = DeliveryRow("", job.job_id, CONVEX, call[0], dumps(call[1]), time.time())
            write = asyncio.ensure_future(self._store.record_deliveries([row]))  # ordered with the job's writes
            task = asyncio.create_task(self._written(write, job.job_id))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        except Exception:
            log.exception("convex: could not record %s for job %s", kind, getattr(job, "job_id", "?"))

    async def _written(self, write: asyncio.Future[None], job_id: str) -> None:
        try:
            await write
        except Exception as exc:  # progress: the next state carries it
            log.warning("convex: a progress update of job %s was not recorded: %s", job_id, exc)
            return
        self._wake.set()

    async def start(self) -> None:
        """Start the send loop; the store must be open."""
        if self.enabled:
            self._loop_task = asyncio.create_task(self._run(), name="convex-mirror")

    async def close(self, timeout: float) -> None:
        """Stop; sends in flight get `timeout` seconds. What is unsent stays in the outbox for the
        next process (or another instance)."""
        self._closing = True
        deadline = time.monotonic() + timeout
        if self._writes:
            await asyncio.wait(self._writes, timeout=max(0.1, timeout / 2))
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._store.release_claims(self._owner), max(0.1, deadline - time.monotonic()))

    async def pending(self) -> int:
        return await self._store.convex_backlog()

    async def _run(self) -> None:
        lease = self._settings.outbox_claim_seconds
        while True:
            self._wake.clear()
            try:
                updates = await self._store.claim_convex(self._owner, time.time(), 16, lease)
                if updates:
                    await asyncio.gather(*(self._send(update) for update in updates))
                    continue  # more may be due
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("convex: outbox error; retrying shortly")
            # asyncio.timeout, not wait_for: a cancel that meets wait_for's own timeout can hang it (3.11)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.outbox_poll_seconds):
                    await self._wake.wait()

    async def _send(self, update: ConvexUpdate) -> None:
        """Send one job's newest state; record it as sent, refused for good, or to be retried."""
        error: str | None = None
        try:
            async with self._limit:
                await self.mutation(update.path, json.loads(update.args))
            self.sent += 1
            sent = True
        except ConvexCallError as exc:
            log.error("convex: %s refused: %s", update.path, exc)
            sent, error = True, f"refused: {exc}"  # the same call cannot succeed later
        except Exception as exc:
            delay = CONVEX_RETRY.delay(update.attempts + 1)
            log.warning("convex: %s failed (%s); retry %d in %.1f s", update.path, exc, update.attempts + 1, delay)
            sent, error = False, f"{type(exc).__name__}: {exc}"
        next_at = time.time() + (0.0 if sent else CONVEX_RETRY.delay(update.attempts + 1))
        try:
            await self._store.convex_done(self._owner, update, sent, next_at, error)
        except Exception as exc:  # the claim expires and the state is sent again
            log.warning("convex: the outcome for job %s was not recorded: %s", update.job_id, exc)

    async def mutation(self, path: str, args: dict[str, Any]) -> Any:
        return await self._call("mutation", path, {**args, "secret": self._secret})

    async def query(self, path: str, args: dict[str, Any]) -> Any:
        return await self._call("query", path, args)

    async def _call(self, kind: str, path: str, args: dict[str, Any]) -> Any:
        body = {"path": path, "args": convex_to_json(args), "format": "json"}
        async with self._session.post(
            f"{self._url}/api/{kind}", json=body, timeout=aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT)
        ) as resp:
            if resp.status == 429 or resp.status >= 500:
                raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status)
            try:
                answer = await resp.json(content_type=None)
            except ValueError:
                raise ConvexCallError(f"HTTP {resp.status} with a body that is not JSON") from None
        if not isinstance(answer, dict):
            raise ConvexCallError(f"unexpected answer {answer!r}")
        if answer.get("status") == "success":
            return answer.get("value")
        message = answer.get("errorMessage") or answer.get("message") or f"HTTP {resp.status}"
        raise ConvexCallError(str(message))
