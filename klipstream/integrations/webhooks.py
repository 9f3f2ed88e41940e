"""Signed, durable webhook deliveries to a job's callback_url.

Job changes become deliveries in the job store's outbox, written in the same transaction as the
change, and a background loop sends what is due. Nothing here ever waits on a receiver in the
pipeline's path. Signatures follow Standard Webhooks (webhook-id / webhook-timestamp /
webhook-signature) so receivers can verify with any of its libraries; `X-KlipStream-Signature`
keeps receivers written for the old service working.

The callback URL is checked at send time, not only at submission: the host is re-resolved before
every attempt and the connection goes only to addresses that passed the check (the public-only
client of klipstream.network; redirects not followed), so DNS rebinding cannot reach internal hosts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from klipstream.config import ConfigError
from klipstream.errors import InvalidVideoUrl, KlipstreamError
from klipstream.integrations.outbox import dumps
from klipstream.jobs.store import DELIVERED, FAILED, PENDING, STOPPED, Attempt, Delivery, DeliveryRow
from klipstream.models import TERMINAL_STATUSES, Job
from klipstream.network import ensure_public_url, refused_private
from klipstream.retry import RetryPolicy, parse_retry_after

if TYPE_CHECKING:
    from klipstream.config import Settings
    from klipstream.jobs.store import JobStore

log = logging.getLogger(__name__)

EVENTS = {
    "started": "job.started",
    "stage_changed": "job.stage_changed",
    "progress": "job.progress",
    "completed": "job.completed",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
_POLL_SECONDS = 5.0  # upper bound on any idle wait of the delivery loop


def secret_key(secret: str) -> bytes:
    """HMAC key bytes: base64-decoded for `whsec_` secrets, the UTF-8 bytes of a plain secret otherwise."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            raise ConfigError("KLIPSTREAM_WEBHOOK_SECRET: a whsec_ secret must be base64 after the prefix") from None
    return secret.encode()


def sign_headers(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers (one v1 signature per key, for rotation) plus the legacy header."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if keys:
        signed = f"{msg_id}.{timestamp}.".encode() + body
        signatures = ["v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys]
        headers["webhook-signature"] = " ".join(signatures)
        headers["X-KlipStream-Signature"] = "sha256=" + hmac.new(keys[0], body, hashlib.sha256).hexdigest()
    return headers


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_summary(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job_id": job.job_id,
        "video_id": job.video_id,
        "url": job.url,
        "status": job.status.value,
        "progress": job.progress.model_dump(mode="json"),
        "stages": [{"name": s.name, "status": s.status.value, "progress": round(s.progress, 4)} for s in job.stages],
        "results": dict(job.results),
        "retry_count": job.retry_count,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }
    if job.error is not None:
        data["error"] = job.error.model_dump(mode="json")
    if job.warnings:
        data["warnings"] = list(job.warnings)
    if job.video is not None:
        data["video"] = job.video.model_dump(mode="json", exclude_none=True)
    if job.highlights and job.status.terminal:
        data["highlights"] = job.highlights
    return data


class WebhookDispatcher:
    """Produces webhook deliveries for job changes and sends what is due, with retries for up to
    24 h.

    A delivery is a row of the job store's outbox, written in the same transaction as the job
    change that causes it (`deliveries`, composed into the runner's effects): a `kill -9` right
    after a job completes cannot lose its `job.completed`. Only throttled progress events, which
    have no save of their own, are written by `job_changed` in a write of their own (losing one
    loses nothing a later event does not carry). The send loop claims due deliveries from the
    store with a lease (PostgreSQL: FOR UPDATE SKIP LOCKED), so instances sharing a store never
    send one delivery at the same time, and a killed sender's claim expires; a retry, here or on
    another instance, keeps the delivery's id, the webhook-id header.

    It sends through `session`, the runtime's client for user-supplied URLs
    (klipstream.network.user_url_session), whose resolver refuses private addresses unless
    KLIPSTREAM_ALLOW_PRIVATE_URLS is on.
    """

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, store: JobStore, owner: str) -> None:
        self._settings = settings
        self._session = session
        self._store = store
        self._owner = owner  # this sender's name in claims
        self._keys = [secret_key(s) for s in settings.webhook_secrets]
        self._in_flight: set[str] = set()  # ids of the deliveries being sent here
        self._last_progress: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._limit = asyncio.Semaphore(settings.webhook_concurrency)
        # Attempts are bounded by age (webhook_max_age_seconds), not by count.
        self._retry = RetryPolicy(None, settings.webhook_retry_base_seconds, 3600.0, max_retry_after=3600.0)

    # --- recording ---------------------------------------------------------------------------

    def deliveries(self, kind: str | None, job: Job) -> list[DeliveryRow]:
        """The deliveries a job change of this kind causes, to be written with it. Progress
        events only when the job asked for them, at most one per KLIPSTREAM_WEBHOOK_PROGRESS_SECONDS."""
        event = EVENTS.get(kind or "")
        urls = [job.callback_url] if job.callback_url else []
        urls += [url for url in job.callbacks if url not in urls]
        if event is None or not urls:
            return []
        now = time.time()
        if event == "job.progress":
            if not job.options.webhook_progress:
                return []
            if now - self._last_progress.get(job.job_id, 0.0) < self._settings.webhook_progress_seconds:
                return []
            self._last_progress[job.job_id] = now
        if kind in TERMINAL_STATUSES:
            self._last_progress.pop(job.job_id, None)
        body = dumps({"type": event, "timestamp": _iso(datetime.now(UTC)), "data": job_summary(job)})
        return [DeliveryRow(f"msg_{uuid.uuid4().hex}", job.job_id, url, event, body, now) for url in urls]

    def job_changed(self, job: Job, kind: str) -> None:
        """A job event was emitted (after its save committed): wake the send loop. A progress
        event has no save of its own: its delivery (throttled) is written here. Never blocks,
        never raises."""
        try:
            if self._closing or not (job.callback_url or job.callbacks):
                return
            if kind == "progress":
                rows = self.deliveries(kind, job)
                if not rows:
                    return
                # Called now, so the write is ordered with the job's other writes.
                write = asyncio.ensure_future(self._store.record_deliveries(rows))
                task = asyncio.create_task(self._written(write, job.job_id))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
                return
            self._wake.set()
        except Exception:  # a webhook problem must never break the pipeline
            log.exception("webhooks: could not record %s for job %s", kind, getattr(job, "job_id", "?"))

    async def _written(self, write: asyncio.Future[None], job_id: str) -> None:
        try:
            await write
        except Exception as exc:  # a progress event: the next one, or the terminal one, follows
            log.warning("webhooks: a progress event of job %s was not recorded: %s", job_id, exc)
            return
        self._wake.set()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the send loop; the store must be open."""
        if not self._keys:
            log.warning("webhooks: KLIPSTREAM_WEBHOOK_SECRET is not set; deliveries are sent unsigned")
        self._loop_task = asyncio.create_task(self._run(), name="webhook-delivery")

    async def close(self, timeout: float) -> None:
        """Stop claiming; let sends in flight finish within `timeout`; release what is unsent."""
        deadline = time.monotonic() + timeout
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._writes:
            await asyncio.wait(self._writes, timeout=max(0.1, deadline - time.monotonic()))
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in self._tasks:
                task.cancel()  # its delivery stays pending and is sent again, with the same id
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._store.release_claims(self._owner), max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # the claims expire on their own
            log.warning("webhooks: claims not released at shutdown (%s); they expire", exc)

    async def backlog(self) -> int:
        return await self._store.delivery_backlog()

    async def purge(self, finished_before: float) -> int:
        return await self._store.purge_deliveries(finished_before)

    async def deliveries_for(self, job_id: str) -> list[dict[str, Any]]:
        return await self._store.delivery_history(job_id)

    # --- delivery loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        lease = self._settings.outbox_claim_seconds
        while True:
            self._wake.clear()
            next_at: float | None = None
            try:
                free = self._settings.webhook_concurrency - len(self._in_flight)
                if free > 0:
                    for delivery in await self._store.claim_deliveries(self._owner, time.time(), free, lease):
                        self._in_flight.add(delivery.id)
                        task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery.id}")
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                next_at = await self._store.next_delivery_at(time.time())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhooks: outbox error; retrying shortly")
            # Sleep until the next delivery is due, a new event arrives or a send finishes; other
            # instances' deliveries (and expired claims) are found by polling.
            saturated = len(self._in_flight) >= self._settings.webhook_concurrency  # a finishing send wakes us
            poll = self._settings.outbox_poll_seconds
            wait = poll if next_at is None or saturated else min(poll, next_at - time.time())
            # asyncio.timeout, not wait_for: a cancel that meets wait_for's own timeout can hang it (3.11)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.01)):
                    await self._wake.wait()

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            async with self._limit:
                attempt, state, retry_after = await self._attempt(delivery)
            next_at = None
            if state == PENDING:
                next_at = self._next_attempt(delivery, attempt.at, retry_after)
                if next_at is None:
                    state = FAILED
                    attempt = Attempt(
                        attempt.at,
                        attempt.status,
                        f"{attempt.error}; gave up after {self._settings.webhook_max_age_seconds:.0f} s",
                        attempt.duration_ms,
                    )
            if not await self._store.record_attempt(self._owner, delivery, attempt, state, next_at):
                log.warning("webhooks: the claim of %s expired while it was sent; another sender has it", delivery.id)
            log.info(
                "webhook %s %s for job %s: %s (%s)",
                delivery.event,
                delivery.id,
                delivery.job_id,
                state,
                attempt.status or attempt.error,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhooks: delivery %s could not be recorded; its claim expires", delivery.id)
        finally:
            self._in_flight.discard(delivery.id)
            self._wake.set()

    def _next_attempt(self, delivery: Delivery, now: float, retry_after: float | None) -> float | None:
        at = now + self._retry.delay(delivery.attempts + 1, retry_after)
        if at > delivery.created_at + self._settings.webhook_max_age_seconds:
            return None
        return at

    async def _attempt(self, delivery: Delivery) -> tuple[Attempt, str, float | None]:
        """One POST. Returns the attempt, the delivery's next state and a Retry-After delay."""
        started = time.time()
        clock = time.monotonic()

        def done(status: int | None, error: str | None, state: str, retry_after: float | None = None):
            return Attempt(started, status, error, (time.monotonic() - clock) * 1000), state, retry_after

        try:
            await ensure_public_url(delivery.url, allow_private=self._settings.allow_private_urls)
        except InvalidVideoUrl as exc:
            return done(None, f"callback_url refused: {exc.message}", FAILED)
        except KlipstreamError as exc:  # DNS failure: may be temporary
            return done(None, exc.message, PENDING)
        body = delivery.body.encode()
        headers = sign_headers(self._keys, delivery.id, int(time.time()), body)
        headers.update({"Content-Type": "application/json", "User-Agent": "KlipStream-Webhooks/1"})
        try:
            async with self._session.post(
                delivery.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._settings.webhook_timeout_seconds),
            ) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await resp.content.read(4096)  # enough to reuse the connection; the body is not used
        except aiohttp.ClientConnectorError as exc:
            if refused_private(exc):
                return done(None, "callback_url refused: its host resolves to a private address", FAILED)
            return done(None, f"connection failed: {exc.os_error.strerror or type(exc).__name__}", PENDING)
        except TimeoutError:
            return done(None, f"no answer within {self._settings.webhook_timeout_seconds:g} s", PENDING)
        except (aiohttp.ClientError, OSError) as exc:
            return done(None, f"network error: {type(exc).__name__}", PENDING)
        if 200 <= status < 300:
            return done(status, None, DELIVERED)
        if status == 410:
            return done(status, "receiver answered 410 Gone: no more deliveries for this job", STOPPED)
        if status in (408, 429) or status >= 500:
            return done(status, f"HTTP {status}", PENDING, retry_after)
        if 300 <= status < 400:
            return done(status, f"HTTP {status}: redirects are not followed", FAILED)
        return done(status, f"HTTP {status}: refused by the receiver", FAILED)
