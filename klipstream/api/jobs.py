"""The job routes: submit, read, poll, cancel, retry and list."""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from klipstream.api.auth import key_owner, require_api_key
from klipstream.api.context import METRICS, RUNTIME, SERVICE, SETTINGS, STATE, STATUS_CACHE, TOKENS, service_of
from klipstream.api.openapi import Route
from klipstream.api.problems import json_text, model_response, problem, retry_later, validation_problem
from klipstream.errors import InvalidVideoUrl
from klipstream.jobs.service import IdempotencyConflict, InvalidTransition, JobNotFound, ShuttingDown
from klipstream.models import Job, JobList, JobStatus, JobStatusView, Problem, SubmitRequest, SubmitResponse
from klipstream.network import validate_urls
from klipstream.queue import QueueFull

MAX_PAGE = 200
STATUS_CACHE_SIZE = 10_000


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


async def job_or_404(request: web.Request) -> Job:
    try:
        return await service_of(request).get(request.match_info["job_id"])
    except JobNotFound:
        raise web.HTTPNotFound(reason="Job not found", text="No job has this id.") from None


def job_document(app: web.Application, job: Job) -> str:
    return fresh_links(app, job).model_dump_json()


def fresh_links(app: web.Application, job: Job) -> Job:
    """Stream tokens and artifact links expire, so every read gets newly signed ones (when keys
    are on): stream_url, and the local-storage URLs in results."""
    if not app[SETTINGS].api_keys:
        return job
    update: dict[str, Any] = {"stream_url": app[SERVICE].stream_url(job.job_id)}
    if job.results:
        update["results"] = signed_results(app, job.results)
    return job.model_copy(update=update)


def signed_results(app: web.Application, results: dict[str, str]) -> dict[str, str]:
    """Local artifact URLs (this server's /files route) signed with an expiry; other URLs (Cloud
    Storage signed URLs) as they are. Without API keys, the URLs as they are."""
    if not app[SETTINGS].api_keys:
        return dict(results)
    base = app[SETTINGS].public_url.rstrip("/")
    tokens = app[TOKENS]
    out = {}
    for key, url in results.items():
        path = url[len(base) :] if base and url.startswith(base) else url
        out[key] = base + tokens.sign_path(path) if path.startswith("/files/") and "?" not in path else url
    return out


async def submit_job(request: web.Request) -> web.Response:
    app = request.app  # a property that walks the match info: read once on the hot path
    settings = app[SETTINGS]
    require_api_key(request, settings)
    service = app[SERVICE]
    if service.shutting_down or app[STATE].draining:
        return retry_later(503, "Shutting down", "This instance is not accepting jobs; retry shortly.", 5)
    raw = await request.read()
    try:
        body = SubmitRequest.model_validate_json(raw)
    except ValidationError as exc:
        return validation_problem(exc)
    try:
        validate_urls(body, settings)
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
        outcome = await service.submit(body, idempotency_key=key, owner=key_owner(request, settings))
    except TimeoutError:
        return store_busy()
    except IdempotencyConflict:
        return problem(422, "Idempotency-Key reused", "This key was already used with a different request body.")
    except QueueFull:
        return retry_later(429, "Queue full", "Too many jobs are waiting; retry later.", 30)
    except ShuttingDown:
        return retry_later(503, "Shutting down", "Retry shortly.", 5)
    if outcome.status == 202:
        app[METRICS].submitted_by_priority[body.priority].inc()
    headers = {"Location": f"/api/v1/analysis/{outcome.job_id}"}
    return json_text(outcome.body, outcome.status, headers)


def store_busy() -> web.Response:
    """The job store did not confirm the write in time. Not a server fault the client should see as
    a 500: either nothing was written, or the job is accepted once the store catches up, and a
    retry with the same Idempotency-Key then gets that job."""
    return retry_later(
        503,
        "Job store busy",
        "The job store did not confirm the request in time. Retry shortly with the same Idempotency-Key; "
        "a job that was accepted meanwhile is returned, never created twice.",
        5,
    )


async def get_job(request: web.Request) -> web.Response:
    require_api_key(request, request.app[SETTINGS])
    job = await job_or_404(request)
    if not job.callback_url:
        return json_text(job_document(request.app, job))
    data = fresh_links(request.app, job).model_dump(mode="json")
    data["webhook_deliveries"] = await request.app[RUNTIME].webhooks.deliveries_for(job.job_id)
    return web.json_response(data)


async def get_job_status(request: web.Request) -> web.Response:
    app = request.app  # a property that walks the match info: read once on the hot path
    require_api_key(request, app[SETTINGS])
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
    if len(cache) >= STATUS_CACHE_SIZE:
        cache.clear()
    cache[job.job_id] = (version, body, etag)
    return body, etag


async def cancel_job(request: web.Request) -> web.Response:
    require_api_key(request, request.app[SETTINGS])
    job = await job_or_404(request)
    try:
        job = await service_of(request).cancel(job.job_id)
    except TimeoutError:
        return store_busy()
    return model_response(status_view(job), 202 if not job.status.terminal else 200)


async def retry_job(request: web.Request) -> web.Response:
    require_api_key(request, request.app[SETTINGS])
    job = await job_or_404(request)
    try:
        job = await service_of(request).retry(job.job_id)
    except InvalidTransition as exc:
        return problem(409, "Cannot retry", str(exc))
    except QueueFull:
        return retry_later(429, "Queue full", "Too many jobs are waiting; retry later.", 30)
    except TimeoutError:
        return store_busy()
    return model_response(status_view(job), 202)


async def list_jobs(request: web.Request) -> web.Response:
    require_api_key(request, request.app[SETTINGS])
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


ROUTES = [
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
        "DELETE",
        "/api/v1/analysis/{job_id}",
        cancel_job,
        "Cancel a job",
        responses={200: JobStatusView, 202: JobStatusView, 404: Problem, 503: Problem},
    ),
    Route(
        "POST",
        "/api/v1/analysis/{job_id}/retry",
        retry_job,
        "Re-run a failed or cancelled job from its last completed stage",
        responses={202: JobStatusView, 404: Problem, 409: Problem, 429: Problem, 503: Problem},
    ),
    Route(
        "GET",
        "/api/v1/jobs",
        list_jobs,
        "Jobs, newest first",
        responses={200: JobList, 422: Problem},
        query={"status": "string", "limit": "integer", "cursor": "string"},
    ),
]
