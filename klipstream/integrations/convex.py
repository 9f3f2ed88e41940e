"""Write-behind mirror of job status into the Convex `videos` table the web frontend subscribes to.

Convex is a convenience for the frontend, not part of the job: `job_changed` only stores the
latest state in memory and returns, and a background sender per job pushes it out. Progress is
coalesced (latest wins, at most about one update per second per job); stage changes and terminal
states are queued so none is skipped. Transient failures are retried with capped backoff for as
long as the process lives, so after an outage the final state and URLs still arrive. Nothing here
can fail or slow a job.

Protocol: Convex's HTTP API, POST {CONVEX_URL}/api/mutation with {path, args, format: "json"},
answered by {status: "success", value} or {status: "error", errorMessage}. Arguments are encoded
with the `convex` package's value encoding. Writes carry the shared secret KLIPSTREAM_CONVEX_SECRET,
which every writing function in convex/video.ts checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from convex.values import convex_to_json

from klipstream.models import TERMINAL_STATUSES, Job
from klipstream.retry import RetryPolicy

if TYPE_CHECKING:
    from klipstream.config import Settings

log = logging.getLogger(__name__)

_ALWAYS_SENT = {"queued", "started", "stage_changed", *TERMINAL_STATUSES}
MIN_INTERVAL = 1.0  # seconds between progress-only updates of one job
_MAX_QUEUED_PER_JOB = 32  # stage changes waiting while Convex is down; a job has only a handful
_REQUEST_TIMEOUT = 10.0
CONVEX_RETRY = RetryPolicy(None, 0.5, 30.0)  # until sent, or the process closes

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


@dataclass
class _JobState:
    queued: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)  # always sent, in order
    latest: tuple[str, dict[str, Any]] | None = None  # progress-only: latest wins
    last_sent: float = float("-inf")
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sender: asyncio.Task[None] | None = None
    finished: bool = False  # a terminal call was handled

    @property
    def has_work(self) -> bool:
        return bool(self.queued) or self.latest is not None


class ConvexMirror:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._url = settings.convex_url.rstrip("/")
        self._secret = settings.convex_secret
        self._session = session
        self._jobs: dict[str, _JobState] = {}
        self._limit = asyncio.Semaphore(4)
        self._started = False
        self._closing = False
        self._deadline = float("inf")
        self.sent = 0  # successful calls, for tests and stats

    @property
    def enabled(self) -> bool:
        return bool(self._url and self._secret)

    def job_changed(self, job: Job, kind: str) -> None:
        """Remember the new state and wake the job's sender. Never blocks, never raises."""
        if not self.enabled or self._closing:
            return
        try:
            call = convex_call(job, kind)
            if call is None:
                return
            state = self._jobs.setdefault(job.job_id, _JobState())
            if kind in _ALWAYS_SENT:
                state.queued.append(call)
                state.latest = None  # the queued call carries everything a pending progress had
                while len(state.queued) > _MAX_QUEUED_PER_JOB:
                    del state.queued[0]
            else:
                state.latest = call
            state.wake.set()
            if self._started and (state.sender is None or state.sender.done()):
                state.sender = asyncio.create_task(self._send_job(job.job_id, state), name=f"convex-{job.job_id}")
        except Exception:
            log.exception("convex: could not record %s for job %s", kind, getattr(job, "job_id", "?"))

    async def start(self) -> None:
        if not self.enabled:
            return
        self._started = True
        for job_id, state in self._jobs.items():
            if state.has_work and state.sender is None:
                state.sender = asyncio.create_task(self._send_job(job_id, state), name=f"convex-{job_id}")

    async def close(self, timeout: float) -> None:
        """Send what is pending, skipping progress spacing, for at most `timeout` seconds."""
        self._closing = True
        self._deadline = time.monotonic() + timeout
        senders = [s.sender for s in self._jobs.values() if s.sender is not None and not s.sender.done()]
        for state in self._jobs.values():
            state.wake.set()
        if senders:
            _, late = await asyncio.wait(senders, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if late:
                log.warning("convex: %d jobs' final updates not sent within %.1f s", len(late), timeout)

    def pending(self) -> int:
        return sum(len(s.queued) + (s.latest is not None) for s in self._jobs.values())

    async def _send_job(self, job_id: str, state: _JobState) -> None:
        try:
            while state.has_work:
                if not state.queued:
                    wait = state.last_sent + MIN_INTERVAL - time.monotonic()
                    if wait > 0 and not self._closing:
                        state.wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(state.wake.wait(), wait)
                        continue  # re-check: a stage change may have arrived
                if state.queued:
                    call = state.queued[0]
                else:
                    assert state.latest is not None
                    call = state.latest
                delivered = await self._deliver(state, call)
                if state.queued and state.queued[0] is call:
                    state.queued.popleft()
                elif state.latest is call:
                    state.latest = None
                if delivered:
                    state.last_sent = time.monotonic()
                if call[0] != "video:upsertJobProgress":
                    state.finished = True
        finally:
            # A finished job is forgotten once its last call is out, so memory stays bounded;
            # a running job keeps its state so the one-per-second spacing holds across bursts.
            if state.finished and not state.has_work and self._jobs.get(job_id) is state:
                del self._jobs[job_id]

    async def _deliver(self, state: _JobState, call: tuple[str, dict[str, Any]]) -> bool:
        """Send one call, retrying transient failures until it succeeds or the process is closing."""
        failures = 0
        while True:
            if call is not state.latest and not (state.queued and state.queued[0] is call):
                return False  # a newer state replaced this progress update while we were retrying
            try:
                async with self._limit:
                    await self.mutation(*call)
                self.sent += 1
                return True
            except ConvexCallError as exc:
                log.error("convex: %s refused: %s", call[0], exc)
                return False
            except Exception as exc:
                failures += 1
                delay = CONVEX_RETRY.delay(failures)
                if time.monotonic() + delay > self._deadline:
                    log.warning("convex: giving up on %s at shutdown (%s)", call[0], exc)
                    return False
                log.warning("convex: %s failed (%s); retry %d in %.1f s", call[0], exc, failures, delay)
                await asyncio.sleep(delay)

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
