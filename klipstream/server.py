"""The aiohttp application: routes, middlewares, start-up and shutdown.

It owns the job service (queue, worker pool, store), the broadcaster and the integrations, and
does nothing slow in a request: submissions validate, write the job durably and return; polls are
answered from memory; streams read from the broadcaster's ring buffers.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from klipstream import __version__
from klipstream.auth import StreamTokens, admin_ok, api_key_ok
from klipstream.broadcaster import HEARTBEAT_FRAME, Broadcaster, Sink, Topic, http_chunk, sse_frame
from klipstream.config import Settings
from klipstream.errors import InvalidVideoUrl
from klipstream.logs import trace_context
from klipstream.metrics import LoopLagMonitor, Metrics
from klipstream.models import (
    HealthView,
    Job,
    JobList,
    JobStatus,
    JobStatusView,
    Problem,
    QueueStats,
    SubmitRequest,
    SubmitResponse,
)
from klipstream.openapi import Route, openapi_document
from klipstream.queue import QueueFull
from klipstream.runtime import job_runtime
from klipstream.service import (
    IdempotencyConflict,
    InvalidTransition,
    JobNotFound,
    JobService,
    ShuttingDown,
    Subscription,
)
from klipstream.stage import Stage
from klipstream.urls import check_url_syntax

log = logging.getLogger(__name__)

SSE_RETRY_MS = 3000
GC_YOUNG_THRESHOLD = 10_000  # net allocations between young collections (CPython default: 700)
SSE_HEARTBEAT_SECONDS = 15.0
SSE_SEND_TIMEOUT = 30.0
SSE_MAX_BACKLOG = 1 << 20  # bytes queued for one subscriber before it is cut off
MAX_PAGE = 200

SERVICE = web.AppKey("service", JobService)
BROADCASTER = web.AppKey("broadcaster", Broadcaster)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LAG = web.AppKey("lag", LoopLagMonitor)
TOKENS = web.AppKey("tokens", StreamTokens)
STATE = web.AppKey("state", dict)
EXTRAS = web.AppKey("extras", dict)
STAGES = web.AppKey("stages", list)
STATUS_CACHE = web.AppKey("status_cache", dict)  # job id -> (version, encoded status, ETag)
CORS = web.AppKey("cors", Callable)  # adds CORS headers to an unsent response


# --- problem details ---
def problem(status: int, title: str, detail: str | None = None, **extra: Any) -> web.Response:
    body = Problem(title=title, status=status, detail=detail, **extra).model_dump(exclude_none=True)
    return web.json_response(body, status=status, content_type="application/problem+json")


def _problem_with_headers(status: int, title: str, detail: str, headers: dict[str, str]) -> web.Response:
    body = Problem(title=title, status=status, detail=detail).model_dump(exclude_none=True)
    return web.json_response(body, status=status, content_type="application/problem+json", headers=headers)


def validation_problem(exc: ValidationError) -> web.Response:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return problem(400, "Malformed JSON", "The request body is not valid JSON.")
    fields = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in errors]
    return problem(422, "Invalid request", "Some fields are missing or invalid.", errors=fields)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_middleware(settings: Settings) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """CORS (preflights and headers), and one problem-details body for every error (never a
    traceback). CORS is applied here rather than in an `on_response_prepare` signal, which cost
    every response a signal dispatch; the event stream, prepared inside its handler, adds the
    same headers itself."""
    add_cors = cors_headers(settings)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        trace = request.headers.get("X-Cloud-Trace-Context")
        token = trace_context.set(trace) if trace else None
        try:
            if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
                response: web.StreamResponse = web.Response(status=204)
            else:
                response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                add_cors(request, exc)
                raise
            response = _problem_from_http_exception(exc, settings)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = problem(500, "Internal error", "The server failed to handle the request; it has been logged.")
        finally:
            if token is not None:
                trace_context.reset(token)
        if not response.prepared:
            add_cors(request, response)
        return response

    return middleware


def _problem_from_http_exception(exc: web.HTTPException, settings: Settings) -> web.Response:
    if exc.status == 413:
        return problem(413, "Request body too large", f"The limit is {settings.max_body_bytes} bytes.")
    keep = {k: v for k, v in exc.headers.items() if k.lower() in ("retry-after", "www-authenticate", "allow")}
    return _problem_with_headers(exc.status, exc.reason, exc.text or exc.reason, keep)


def cors_headers(settings: Settings) -> Callable[[web.Request, web.StreamResponse], None]:
    """The function that adds CORS headers to a response that is not yet sent."""
    origins = set(settings.cors_origins)
    wildcard = "*" in origins
    static = {
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, If-None-Match",
        "Access-Control-Expose-Headers": "ETag, Retry-After, Location",
        "Access-Control-Max-Age": "600",
    }

    def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if not origin or not (wildcard or origin in origins):
            return
        # Never a wildcard together with credentials: with explicit origins we echo the origin.
        response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
        if not wildcard:
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        response.headers.update(static)

    return add


# --- helpers ---
def service_of(request: web.Request) -> JobService:
    return request.app[SERVICE]


def require_api_key(request: web.Request) -> None:
    if not api_key_ok(request, request.app[SETTINGS]):
        raise web.HTTPUnauthorized(
            reason="Unauthorized", text="Send Authorization: Bearer <api key>.", headers={"WWW-Authenticate": "Bearer"}
        )


def require_admin(request: web.Request) -> None:
    if not admin_ok(request, request.app[SETTINGS]):
        raise web.HTTPUnauthorized(
            reason="Unauthorized",
            text="Admin routes need Authorization: Bearer <admin token>.",
            headers={"WWW-Authenticate": "Bearer"},
        )


def json_text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)


def model_response(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return json_text(model.model_dump_json(), status, headers)


async def job_or_404(request: web.Request) -> Job:
    try:
        return await service_of(request).get(request.match_info["job_id"])
    except JobNotFound:
        raise web.HTTPNotFound(reason="Job not found", text="No job has this id.") from None


def status_view(job: Job) -> JobStatusView:
    return JobStatusView(
        job_id=job.job_id,
        video_id=job.video_id,
        status=job.status,
        progress=job.progress,
        queue_position=job.queue_position,
        error=job.error,
        updated_at=job.updated_at,
    )


def validate_urls(body: SubmitRequest, settings: Settings) -> None:
    allow_private = settings.allow_private_urls
    url = body.url.strip()
    is_local = settings.allow_local_files and (url.startswith("/") or url.startswith("file://"))
    if not is_local:
        check_url_syntax(url, allow_private=allow_private, what="url")
    if body.chat_url:
        chat_local = settings.allow_local_files and body.chat_url.startswith("/")
        if not chat_local:
            check_url_syntax(body.chat_url, allow_private=allow_private, what="chat_url")
    if body.callback_url:
        check_url_syntax(body.callback_url, allow_private=allow_private, what="callback_url")


# --- job routes ---
async def submit_job(request: web.Request) -> web.Response:
    require_api_key(request)
    app = request.app  # a property that walks the match info: read once on the hot path
    service = app[SERVICE]
    if service.shutting_down or app[STATE].get("draining"):
        return _problem_with_headers(
            503, "Shutting down", "This instance is not accepting jobs; retry shortly.", {"Retry-After": "5"}
        )
    raw = await request.read()
    try:
        body = SubmitRequest.model_validate_json(raw)
    except ValidationError as exc:
        return validation_problem(exc)
    try:
        validate_urls(body, app[SETTINGS])
    except InvalidVideoUrl as exc:
        field = "url"
        for name in ("chat_url", "callback_url"):
            if exc.message.startswith(name):
                field = name
        return problem(422, "Invalid URL", exc.message, errors=[{"field": field, "message": exc.message}])
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 255):
        return problem(400, "Invalid Idempotency-Key", "The key must be 1 to 255 characters.")
    try:
        outcome = await service.submit(body, idempotency_key=key)
    except IdempotencyConflict:
        return problem(422, "Idempotency-Key reused", "This key was already used with a different request body.")
    except QueueFull:
        return _problem_with_headers(
            429, "Queue full", "Too many jobs are waiting; retry later.", {"Retry-After": "30"}
        )
    except ShuttingDown:
        return _problem_with_headers(503, "Shutting down", "Retry shortly.", {"Retry-After": "5"})
    if outcome.status == 202:
        app[METRICS].submitted_by_priority[body.priority].inc()
    headers = {"Location": f"/api/v1/analysis/{outcome.job_id}"}
    return json_text(outcome.body, outcome.status, headers)


async def get_job(request: web.Request) -> web.Response:
    require_api_key(request)
    job = await job_or_404(request)
    webhooks = request.app[EXTRAS].get("webhooks")
    if webhooks is None or not job.callback_url:
        return json_text(job_document(request.app, job))
    data = fresh_links(request.app, job).model_dump(mode="json")
    data["webhook_deliveries"] = await webhooks.deliveries_for(job.job_id)
    return web.json_response(data)


def job_document(app: web.Application, job: Job) -> str:
    return fresh_links(app, job).model_dump_json()


def fresh_links(app: web.Application, job: Job) -> Job:
    """Stream tokens expire, so every read gets a newly signed stream_url (when keys are on)."""
    if not app[SETTINGS].api_keys:
        return job
    return job.model_copy(update={"stream_url": app[SERVICE].stream_url(job.job_id)})


async def get_job_status(request: web.Request) -> web.Response:
    require_api_key(request)
    app = request.app  # a property that walks the match info: read once on the hot path
    job = app[SERVICE].live(request.match_info["job_id"])  # polls of live jobs never leave memory
    if job is None:
        job = await job_or_404(request)
    body, etag = _status_body(app[STATUS_CACHE], job)
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=body, content_type="application/json", headers={"ETag": etag, "Cache-Control": "no-cache"})


def _status_body(cache: dict[str, tuple[Any, bytes, str]], job: Job) -> tuple[bytes, str]:
    """The polled body and its ETag, encoded once per job change rather than once per poll."""
    version = (job.updated_at, job.status, job.queue_position)
    cached = cache.get(job.job_id)
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    body = status_view(job).model_dump_json().encode()
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    if len(cache) >= 10_000:
        cache.clear()
    cache[job.job_id] = (version, body, etag)
    return body, etag


async def cancel_job(request: web.Request) -> web.Response:
    require_api_key(request)
    job = await job_or_404(request)
    job = await service_of(request).cancel(job.job_id)
    return model_response(status_view(job), 202 if not job.status.terminal else 200)


async def retry_job(request: web.Request) -> web.Response:
    require_api_key(request)
    job = await job_or_404(request)
    try:
        job = await service_of(request).retry(job.job_id)
    except InvalidTransition as exc:
        return problem(409, "Cannot retry", str(exc))
    except QueueFull:
        return _problem_with_headers(
            429, "Queue full", "Too many jobs are waiting; retry later.", {"Retry-After": "30"}
        )
    return model_response(status_view(job), 202)


async def list_jobs(request: web.Request) -> web.Response:
    require_api_key(request)
    status = request.query.get("status")
    if status is not None and status not in {s.value for s in JobStatus}:
        return problem(
            422,
            "Invalid status",
            f"status must be one of {', '.join(s.value for s in JobStatus)}.",
            errors=[{"field": "status", "message": "unknown status"}],
        )
    try:
        limit = int(request.query.get("limit", "50"))
        cursor = int(request.query["cursor"]) if "cursor" in request.query else None
    except ValueError:
        return problem(
            422,
            "Invalid paging",
            "limit and cursor must be integers.",
            errors=[{"field": "limit", "message": "not an integer"}],
        )
    if not 1 <= limit <= MAX_PAGE or (cursor is not None and cursor < 0):
        return problem(
            422,
            "Invalid paging",
            f"limit must be between 1 and {MAX_PAGE}; cursor must be positive.",
            errors=[{"field": "limit", "message": "out of range"}],
        )
    jobs, next_cursor = await service_of(request).list(status, limit, cursor)
    page = JobList(jobs=[status_view(j) for j in jobs], next_cursor=str(next_cursor) if next_cursor else None)
    return model_response(page)


# --- streaming ---
async def stream_job(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    job_id = request.match_info["job_id"]
    token = request.query.get("token")
    if settings.api_keys and not (token and request.app[TOKENS].verify(job_id, token)):
        require_api_key(request)
    job = await job_or_404(request)
    if request.app[STATE].get("stopping"):
        return _problem_with_headers(503, "Shutting down", "Reconnect shortly.", {"Retry-After": "2"})
    broadcaster = request.app[BROADCASTER]
    metrics = request.app[METRICS]
    last_event_id = _parse_last_event_id(request)
    known = broadcaster.topics.get(job_id)
    if known is not None and known.terminal and last_event_id is not None and last_event_id >= known.last_id:
        # This client already has the terminal event; 204 tells EventSource to stop reconnecting.
        return web.Response(status=204)
    # aiohttp-sse's response sets the event-stream headers and chunked coding; it is prepared
    # directly rather than through sse_response() to keep each open stream's footprint small.
    response = BroadcastStream(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    request.app[CORS](request, response)  # prepared here, so the middleware cannot add them later
    await response.prepare(request)
    topic = broadcaster.topic(job_id)
    topic.subscribers += 1
    metrics.sse_subscribers.inc()
    try:
        await _follow(response, request.app, job, topic, last_event_id)
    except (ConnectionResetError, TimeoutError, RuntimeError):
        pass  # the client went away or stalled past the send timeout
    finally:
        topic.subscribers -= 1
        metrics.sse_subscribers.dec()
    return response


class BroadcastStream(EventSourceResponse):
    """aiohttp-sse's event stream without its ping task per stream: the broadcaster's single
    heartbeat wakes every subscriber instead, which saves a task and a timer per connection."""

    async def _ping(self) -> None:
        return


def _parse_last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw and raw.isdigit() and len(raw) < 19:
        return int(raw)
    return None


async def _follow(response: Any, app: web.Application, job: Job, topic: Topic, last_event_id: int | None) -> None:
    """Replay or snapshot, then forward events until the job's terminal event.

    The first write goes through aiohttp (it sends the buffered headers with it); every later
    event is written to the socket as the pre-encoded chunk shared by all subscribers.
    """
    missed = topic.since(last_event_id) if last_event_id is not None else None
    if missed is None:
        await response.write(_snapshot(app, job, topic))
        cursor = topic.last_id
    else:
        await response.write(b"".join(e.frame for e in missed) or HEARTBEAT_FRAME)
        cursor = missed[-1].id if missed else last_event_id or 0
        if missed and (missed[-1].terminal or missed[-1].type == "reconnect"):
            return
    if job.status.terminal and not (missed and any(e.terminal for e in missed)):
        # Finished: the terminal event, and close.
        frame = sse_frame(topic.last_id, job.status.value, job_document(app, job))
        await _send(response, http_chunk(frame))
        return
    transport = response._req.transport if response._req is not None else None
    if transport is None or transport.is_closing():
        raise ConnectionResetError
    sink = Sink(transport, cursor)
    topic.sinks.add(sink)
    try:
        await _serve_sink(response, app, job, topic, sink)
    finally:
        topic.sinks.discard(sink)


async def _serve_sink(response: Any, app: web.Application, job: Job, topic: Topic, sink: Sink) -> None:
    """The subscriber's own task: catch up when the publisher could not write, end after the
    terminal event. While it keeps up, the publisher writes for it and this task sleeps."""
    while True:
        if sink.cursor != topic.last_id:
            sink.busy = True
            try:
                events = topic.since(sink.cursor)
                if events is None:  # fell off the ring: start again from a fresh snapshot
                    await _send(response, http_chunk(_snapshot(app, job, topic)))
                    sink.cursor = topic.last_id
                    continue
                await _send(response, b"".join(e.chunk for e in events))
                sink.cursor = events[-1].id
            finally:
                sink.busy = False
        last = topic.events[-1] if topic.events else None
        if last is not None and last.id == sink.cursor and (last.terminal or last.type == "reconnect"):
            return
        if sink.transport.is_closing():
            raise ConnectionResetError
        await sink.attention()


def _snapshot(app: web.Application, job: Job, topic: Topic) -> bytes:
    return sse_frame(topic.last_id, "snapshot", job_document(app, job), retry_ms=SSE_RETRY_MS)


async def _send(response: Any, chunk: bytes) -> None:
    """Write a chunk to the socket with no timer on the fast path. A client that is already behind
    gets a deadline to drain; one hopelessly behind is cut off (it reconnects with Last-Event-ID)."""
    transport = response._req.transport if response._req is not None else None
    if transport is None or transport.is_closing():
        raise ConnectionResetError
    backlog = transport.get_write_buffer_size()
    if backlog > SSE_MAX_BACKLOG:
        transport.abort()
        raise ConnectionResetError
    transport.write(chunk)
    if backlog:
        async with asyncio.timeout(SSE_SEND_TIMEOUT):
            await response._payload_writer.drain()


# --- health, admin, metrics ---
async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return model_response(
        HealthView(
            state=_state_name(request.app),
            version=__version__,
            detail={"uptime_seconds": round(time.monotonic() - state["started"], 1)},
        )
    )


def _state_name(app: web.Application) -> str:
    state = app[STATE]
    service = app[SERVICE]
    if state.get("stopping") or service.shutting_down:
        return "draining"
    if state.get("draining"):
        return "draining"
    if not service.started:
        return "starting"
    if len(service.pool.running) >= service.pool.size:
        return "busy"
    return "ready"


async def ready(request: web.Request) -> web.Response:
    service = service_of(request)
    name = _state_name(request.app)
    store_ok = service.started and await service.store.ping()
    workers_ok = service.pool.alive()
    healthy = name in ("ready", "busy") and store_ok and workers_ok
    view = HealthView(
        state=name if healthy or name != "ready" else "degraded",
        version=__version__,
        detail={"store": store_ok, "workers": workers_ok},
    )
    return model_response(view, 200 if healthy else 503)


async def queue_stats(request: web.Request) -> web.Response:
    require_admin(request)
    service = service_of(request)
    limits = service.deps.limits
    counts = await service.store.terminal_counts(time.time() - 3600)
    backlog = 0
    webhooks = request.app[EXTRAS].get("webhooks")
    if webhooks is not None:
        backlog = await webhooks.backlog()
    stats = QueueStats(
        paused=service.queue.paused,
        draining=bool(request.app[STATE].get("draining")),
        queued=service.queued_counts(),
        queued_total=len(service.queue),
        oldest_queued_age_seconds=_round(service.queue.oldest_age()),
        running=service.running_summary(),
        resources={
            "jobs": {"in_use": len(service.pool.running), "limit": service.pool.size},
            **{
                r.value: {
                    "in_use": _in_use(sem, _limit(service.settings, r.value)),
                    "limit": _limit(service.settings, r.value),
                }
                for r, sem in limits.items()
            },
        },
        last_hour={s: counts.get(s, 0) for s in ("completed", "failed", "cancelled")},
        stage_durations=service.deps.timings.percentiles(),
        webhook_backlog=backlog,
    )
    return model_response(stats)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _limit(settings: Settings, resource: str) -> int:
    return {
        "network": settings.network_concurrency,
        "cpu": settings.cpu_concurrency,
        "transcription": settings.transcribe_workers,
    }[resource]


def _in_use(semaphore: asyncio.Semaphore, limit: int) -> int:
    return limit - semaphore._value


async def pause_queue(request: web.Request) -> web.Response:
    require_admin(request)
    service_of(request).queue.pause()
    return web.json_response({"paused": True})


async def resume_queue(request: web.Request) -> web.Response:
    require_admin(request)
    request.app[STATE]["draining"] = False
    service_of(request).queue.resume()
    return web.json_response({"paused": False, "draining": False})


async def drain_queue(request: web.Request) -> web.Response:
    """Stop dispatching and report not-ready, so the load balancer sends new work elsewhere;
    running jobs finish. `resume` undoes it."""
    require_admin(request)
    request.app[STATE]["draining"] = True
    service = service_of(request)
    service.queue.pause()
    return web.json_response({"paused": True, "draining": True, "running": len(service.pool.running)})


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    service = app[SERVICE]
    m = app[METRICS]
    m.queue_depth.set(len(service.queue))
    m.running_jobs.set(len(service.pool.running))
    body = generate_latest(m.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[EXTRAS]["openapi"])


async def serve_file(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    video_id = request.match_info["video_id"]
    name = request.match_info["name"]
    if "/" in video_id or video_id.startswith(".") or "/" in name or name.startswith("."):
        raise web.HTTPNotFound(reason="Not found", text="No such artifact.")
    root = settings.artifacts_dir.resolve()
    path = (root / video_id / name).resolve()
    if root not in path.parents or not path.is_file():
        raise web.HTTPNotFound(reason="Not found", text="No such artifact.")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=300"})


# --- the web page ---
STATIC_FILES = frozenset({"index.html", "app.js", "style.css"})
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Same-origin only, except https: media and fetches so Cloud Storage artifact URLs still load.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' https:; connect-src 'self' https:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
}


async def index_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(static_dir() / "index.html", headers=PAGE_HEADERS)


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound(reason="Not found", text="No such file.")
    return web.FileResponse(static_dir() / name, headers=PAGE_HEADERS)


# --- the route table: handlers and their OpenAPI description in one place ---
ROUTES: list[Route] = [
    Route(
        "POST",
        "/api/v1/analysis",
        submit_job,
        "Submit a VOD for analysis",
        request=SubmitRequest,
        responses={
            202: SubmitResponse,
            200: SubmitResponse,
            400: Problem,
            413: Problem,
            422: Problem,
            429: Problem,
            503: Problem,
        },
    ),
    Route("GET", "/api/v1/analysis/{job_id}", get_job, "The whole job", responses={200: Job, 404: Problem}),
    Route(
        "GET",
        "/api/v1/analysis/{job_id}/status",
        get_job_status,
        "Compact status for polling (ETag)",
        responses={200: JobStatusView, 304: None, 404: Problem},
    ),
    Route(
        "GET",
        "/api/v1/analysis/{job_id}/stream",
        stream_job,
        "Server-Sent Events: snapshot, progress, stage, then one of completed|failed|cancelled",
        responses={200: "text/event-stream", 204: None, 404: Problem},
    ),
    Route(
        "DELETE",
        "/api/v1/analysis/{job_id}",
        cancel_job,
        "Cancel a job",
        responses={200: JobStatusView, 202: JobStatusView, 404: Problem},
    ),
    Route(
        "POST",
        "/api/v1/analysis/{job_id}/retry",
        retry_job,
        "Re-run a failed or cancelled job from its last completed stage",
        responses={202: JobStatusView, 404: Problem, 409: Problem, 429: Problem},
    ),
    Route(
        "GET",
        "/api/v1/jobs",
        list_jobs,
        "Jobs, newest first",
        responses={200: JobList, 422: Problem},
        query={"status": "string", "limit": "integer", "cursor": "string"},
    ),
    Route("GET", "/health", health, "Liveness", responses={200: HealthView}),
    Route("GET", "/health/ready", ready, "Readiness", responses={200: HealthView, 503: HealthView}),
    Route(
        "GET", "/api/v1/queue/stats", queue_stats, "Queue statistics (admin)", responses={200: QueueStats, 401: Problem}
    ),
    Route(
        "POST",
        "/api/v1/queue/pause",
        pause_queue,
        "Stop dispatching queued jobs (admin)",
        responses={200: "application/json", 401: Problem},
    ),
    Route(
        "POST",
        "/api/v1/queue/resume",
        resume_queue,
        "Resume dispatching (admin)",
        responses={200: "application/json", 401: Problem},
    ),
    Route(
        "POST",
        "/api/v1/queue/drain",
        drain_queue,
        "Stop dispatching and report not ready (admin)",
        responses={200: "application/json", 401: Problem},
    ),
    Route("GET", "/metrics", metrics, "Prometheus metrics", responses={200: "text/plain"}),
    Route("GET", "/openapi.json", openapi, "This document", responses={200: "application/json"}),
    Route("GET", "/", index_page, "The web page", responses={200: "text/html"}),
    Route(
        "GET",
        "/static/{name}",
        static_file,
        "The page's script and style sheet",
        responses={200: "application/octet-stream", 404: Problem},
    ),
    Route(
        "GET",
        "/files/{video_id}/{name}",
        serve_file,
        "A stored artifact (local storage)",
        responses={200: "application/octet-stream", 404: Problem},
    ),
]


# --- application ---
def create_app(
    settings: Settings,
    *,
    stages: list[Stage] | None = None,
    extra_routes: list[Route] | None = None,
) -> web.Application:
    if stages is None:
        from klipstream.stages import default_pipeline

        stages = default_pipeline()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[http_middleware(settings)],
        handler_args={"max_field_size": 16384},
    )
    app[SETTINGS] = settings
    app[STATE] = {"started": time.monotonic(), "stopping": False, "draining": False}
    app[EXTRAS] = {}
    app[STATUS_CACHE] = {}
    app[METRICS] = Metrics()
    app[BROADCASTER] = Broadcaster()
    app[TOKENS] = StreamTokens(settings)
    app[LAG] = LoopLagMonitor(app[METRICS])
    app[STAGES] = stages
    routes = [*ROUTES, *(extra_routes or [])]
    if settings.legacy_routes:
        from klipstream.legacy import LEGACY_ROUTES

        routes += LEGACY_ROUTES
    resources: dict[str, web.Resource] = {}
    for route in routes:  # one resource per path, so GET / (the page) and POST / (legacy) coexist
        if route.path not in resources:
            resources[route.path] = app.router.add_resource(route.path)
        resources[route.path].add_route(route.method, route.handler)
    app[EXTRAS]["openapi"] = openapi_document(routes, title="KlipStream Analysis", version=__version__)
    app[CORS] = cors_headers(settings)
    app.cleanup_ctx.append(_runtime)
    app.on_shutdown.append(_on_shutdown)
    return app


async def _runtime(app: web.Application) -> AsyncIterator[None]:
    """The job machinery for the app's lifetime (aiohttp cleanup context)."""
    settings = app[SETTINGS]
    tokens = app[TOKENS]
    base = settings.public_url.rstrip("/")

    def stream_url(job_id: str) -> str:
        url = f"{base}/api/v1/analysis/{job_id}/stream"
        return f"{url}?token={tokens.issue(job_id)}" if settings.api_keys else url

    # Neither needs new jobs: submissions are counted by the handler, and nobody can be watching
    # a job's stream before its submission has been answered.
    subscriptions = [
        Subscription(app[METRICS].job_event, new_jobs=False),
        Subscription(_broadcast_listener(app[BROADCASTER]), new_jobs=False),
    ]
    async with job_runtime(settings, app[STAGES], stream_url=stream_url, subscriptions=subscriptions) as runtime:
        app[SERVICE] = runtime.service
        app[STATE]["storage"] = runtime.storage
        if "webhooks" in runtime.services:
            app[EXTRAS]["webhooks"] = runtime.services["webhooks"]
        app[LAG].start()
        pruner = asyncio.create_task(_heartbeat_and_prune(app[BROADCASTER]))
        try:
            yield
        finally:
            pruner.cancel()
            await app[LAG].stop()


def _broadcast_listener(broadcaster: Broadcaster) -> Callable[[str, Job], None]:
    def on_event(kind: str, job: Job) -> None:
        if kind == "progress":
            broadcaster.publish_progress(job.job_id, lambda: progress_payload(job))
        elif kind in ("completed", "failed", "cancelled"):
            broadcaster.publish(job.job_id, kind, job.model_dump_json)
        elif kind in ("started", "stage_changed", "queued", "requeued"):
            if kind == "queued":
                broadcaster.reopen(job.job_id)  # a retried job streams again
            broadcaster.publish(job.job_id, "stage", lambda: stage_payload(kind, job))

    return on_event


def progress_payload(job: Job) -> str:
    running = [
        {"name": s.name, "display": s.display, "progress": s.progress, "message": s.message}
        for s in job.stages
        if s.status.value == "running"
    ]
    return json.dumps(
        {
            "job_id": job.job_id,
            "status": job.status.value,
            "progress": job.progress.model_dump(mode="json"),
            "stages": running,
        }
    )


def stage_payload(kind: str, job: Job) -> str:
    return json.dumps(
        {
            "job_id": job.job_id,
            "kind": kind,
            "status": job.status.value,
            "progress": job.progress.model_dump(mode="json"),
            "stages": [s.model_dump(mode="json", exclude_none=True) for s in job.stages],
            "video": job.video.model_dump(mode="json") if job.video else None,
        }
    )


async def _heartbeat_and_prune(broadcaster: Broadcaster) -> None:
    ticks = 0
    while True:
        await asyncio.sleep(SSE_HEARTBEAT_SECONDS)
        broadcaster.heartbeat()
        ticks += 1
        if ticks % 4 == 0:
            broadcaster.prune()


async def _on_shutdown(app: web.Application) -> None:
    await _drain(app)


async def _drain(app: web.Application) -> None:
    """Tell streams to reconnect and put running jobs back in the queue, within the shutdown
    budget. Idempotent: the signal path calls it before aiohttp's own shutdown does."""
    if app[STATE].get("drained"):
        return
    app[STATE]["drained"] = True
    settings = app[SETTINGS]
    deadline = time.monotonic() + settings.shutdown_seconds
    app[STATE]["deadline"] = deadline
    app[STATE]["stopping"] = True
    app[BROADCASTER].announce_shutdown(json.dumps({"reason": "server shutting down", "retry_ms": SSE_RETRY_MS}))
    if SERVICE in app:
        await app[SERVICE].shutdown(deadline)


def run_server(settings: Settings) -> None:
    """Run on uvloop until SIGTERM/SIGINT, then drain within the shutdown budget and exit 0."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not available on Windows
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


async def serve(
    settings: Settings, ready: Callable[[int], None] | None = None, stages: list[Stage] | None = None
) -> None:
    """Serve until a signal. Drain before closing the listener, so that requests arriving during the
    drain get a clear 503 instead of a refused connection."""
    app = create_app(settings, stages=stages)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    log.info("listening on %s:%s", settings.host, port)
    tune_gc()
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await _drain(app)
    await runner.cleanup()


def tune_gc() -> None:
    """Keep cyclic collections rare and short under load.

    * Young collections: with 64 requests in flight, a few thousand short-lived objects are alive
      at any moment, and the default threshold (700 net allocations) ran a young collection every
      ~50 requests that walked all of them: ~0.5 ms each, 6 % of the CPU at full load (perf and
      gc callbacks, bench/). At 10,000 they run ~25× less often for about twice the pause, and the
      submission path does 10-20 % less work per request.
    * Full collections: queued jobs are thousands of small long-lived objects, and every full
      collection walked all of them again (pauses of 100+ ms). After each full collection the
      survivors are frozen: they are still freed by reference counting when dropped (job objects
      hold no cycles), but later collections no longer scan them.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    gc.callbacks.append(_freeze_after_full_collection)


def _freeze_after_full_collection(phase: str, info: dict[str, int]) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def static_dir() -> Path:
    return Path(__file__).with_name("web")
