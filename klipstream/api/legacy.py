"""The old synchronous endpoints, kept so existing callers keep working while they migrate.

`POST /` and `POST /run_pipeline` submit a job through the same service as the v1 API and wait for
its end (bounded by KLIPSTREAM_LEGACY_WAIT_SECONDS), answering in the old response shape. Waiting
is a sleep on the job's event topic, so a thousand legacy callers cost no polling.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klipstream.api.auth import require_admin, require_api_key
from klipstream.api.context import BROADCASTER, RUNTIME, SERVICE, SETTINGS, STATE
from klipstream.api.jobs import signed_results
from klipstream.api.openapi import Route
from klipstream.api.problems import retry_later
from klipstream.errors import ErrorType, InvalidVideoUrl
from klipstream.jobs.service import ShuttingDown
from klipstream.models import Job, Problem, SubmitRequest
from klipstream.network import validate_urls
from klipstream.queue import QueueFull

ACQUISITION_STAGES = ("download", "chat", "audio")
CLIENT_ERRORS = {
    ErrorType.INVALID_VIDEO_URL,
    ErrorType.VIDEO_NOT_FOUND,
    ErrorType.VIDEO_UNAVAILABLE,
    ErrorType.VIDEO_TOO_LONG,
}


class LegacyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # old clients sent extra keys; they were ignored then too
    url: str = Field(..., min_length=1, max_length=2048)


class LegacyResult(BaseModel):
    status: str
    message: str
    video_id: str | None = None
    job_id: str | None = None
    execution_time: dict[str, float] | None = None
    files: dict[str, str] | None = None
    error_type: str | None = None
    suggested_action: str | None = None
    status_url: str | None = None


def execution_times(job: Job) -> dict[str, float]:
    """Seconds spent getting the media and chat ("raw") and analysing them, as the old API split it."""
    start = job.started_at or job.created_at
    end = job.finished_at or start
    acquired = max((s.finished_at for s in job.stages if s.name in ACQUISITION_STAGES and s.finished_at), default=start)
    return {
        "raw_pipeline": round((acquired - start).total_seconds(), 3),
        "analysis_pipeline": round((end - acquired).total_seconds(), 3),
        "total": round((end - job.created_at).total_seconds(), 3),
    }


def legacy_json(result: LegacyResult, status: int) -> web.Response:
    return web.Response(text=result.model_dump_json(exclude_none=True), status=status, content_type="application/json")


async def run_pipeline(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    require_api_key(request, settings)
    try:
        body = LegacyRequest.model_validate_json(await request.read())
        submit = SubmitRequest(url=body.url)
        validate_urls(submit, settings)
    except ValidationError as exc:
        return legacy_json(LegacyResult(status="error", message=f"Invalid request: {exc.errors()[0]['msg']}"), 400)
    except InvalidVideoUrl as exc:
        return legacy_json(
            LegacyResult(
                status="error",
                message=exc.message,
                error_type=exc.error_type.value,
                suggested_action=exc.suggested_action,
            ),
            422,
        )
    state = request.app[STATE]
    if state.legacy_waiting >= settings.legacy_max_waiting:
        # Each waiting request holds a connection for up to an hour: beyond the bound, callers are
        # told to come back (or to move to the asynchronous API) instead of piling up.
        return retry_later(
            503,
            "Too many waiting requests",
            f"{settings.legacy_max_waiting} synchronous requests are already waiting; retry later, or submit "
            "through POST /api/v1/analysis and follow the job's status_url.",
            60,
        )
    state.legacy_waiting += 1
    try:
        service = request.app[SERVICE]
        try:
            outcome = await service.submit(submit)
        except QueueFull:
            return retry_later(429, "Queue full", "Too many jobs are waiting; retry later.", 30)
        except ShuttingDown:
            return retry_later(503, "Shutting down", "Retry shortly.", 5)
        except TimeoutError:
            return retry_later(503, "Job store busy", "The job store did not confirm the request in time.", 5)
        job = await wait_for_end(request.app, outcome.job_id, settings.legacy_wait_seconds)
        return answer(job, signed_results(request.app, job.results))
    finally:
        state.legacy_waiting -= 1


async def wait_for_end(app: web.Application, job_id: str, limit: float) -> Job:
    service = app[SERVICE]
    job = await service.get(job_id)
    if job.status.terminal:
        return job  # no topic for a job that publishes nothing more
    topic = app[BROADCASTER].topic(job_id)
    topic.subscribers += 1  # a watcher: the topic is not pruned under it
    try:
        deadline = time.monotonic() + limit
        cursor = topic.last_id
        while True:
            job = await service.get(job_id)
            remaining = deadline - time.monotonic()
            if job.status.terminal or remaining <= 0:
                return job
            try:
                events = await asyncio.wait_for(topic.wait_after(cursor), min(remaining, 15.0))
            except TimeoutError:
                events = []
            cursor = topic.last_id if events is None or not events else events[-1].id
    finally:
        topic.subscribers -= 1
        topic.last_used = time.monotonic()


def answer(job: Job, files: dict[str, str] | None = None) -> web.Response:
    if job.status.value == "completed":
        return legacy_json(
            LegacyResult(
                status="success",
                message=f"Analysis of video {job.video_id} completed.",
                video_id=job.video_id,
                job_id=job.job_id,
                execution_time=execution_times(job),
                files=files if files is not None else dict(job.results),
            ),
            200,
        )
    if not job.status.terminal:
        return legacy_json(
            LegacyResult(
                status="processing",
                message="The analysis is still running; follow status_url.",
                video_id=job.video_id,
                job_id=job.job_id,
                status_url=job.status_url,
            ),
            504,
        )
    if job.error is None:  # cancelled
        return legacy_json(
            LegacyResult(status="error", message="The job was cancelled.", video_id=job.video_id, job_id=job.job_id),
            409,
        )
    status = 422 if job.error.error_type in CLIENT_ERRORS else 504 if job.error.is_retryable else 502
    return legacy_json(
        LegacyResult(
            status="error",
            message=job.error.message,
            video_id=job.video_id,
            job_id=job.job_id,
            error_type=job.error.error_type.value,
            suggested_action=job.error.suggested_action,
            execution_time=execution_times(job),
        ),
        status,
    )


async def list_files(request: web.Request) -> web.Response:
    require_admin(request, request.app[SETTINGS])
    video_id = request.query.get("video_id")
    objects = await request.app[RUNTIME].storage.list_objects(video_id)
    return web.json_response({"files": [{"uri": o.uri, "url": o.url, "size": o.size} for o in objects]})


async def list_output_files(request: web.Request) -> web.Response:
    require_admin(request, request.app[SETTINGS])
    objects = await request.app[RUNTIME].storage.list_objects(request.query.get("video_id"))
    grouped: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        video = obj.uri.rstrip("/").rsplit("/", 2)[-2]
        grouped.setdefault(video, []).append({"file": obj.uri.rsplit("/", 1)[-1], "url": obj.url, "size": obj.size})
    return web.json_response({"videos": grouped})


LEGACY_RESPONSES: dict[int, type[BaseModel] | str | None] = {
    200: LegacyResult,
    400: LegacyResult,
    422: LegacyResult,
    429: Problem,
    502: LegacyResult,
    503: Problem,
    504: LegacyResult,
}
ROUTES = [
    Route(
        "POST",
        "/",
        run_pipeline,
        "Legacy: run the whole analysis and wait (old response shape)",
        request=LegacyRequest,
        responses=LEGACY_RESPONSES,
    ),
    Route(
        "POST",
        "/run_pipeline",
        run_pipeline,
        "Legacy alias of POST /",
        request=LegacyRequest,
        responses=LEGACY_RESPONSES,
    ),
    Route(
        "GET",
        "/list_files",
        list_files,
        "Legacy: stored artifacts (admin)",
        responses={200: "application/json", 401: Problem, 403: Problem},
        query={"video_id": "string"},
    ),
    Route(
        "GET",
        "/list_output_files",
        list_output_files,
        "Legacy: stored artifacts by video (admin)",
        responses={200: "application/json", 401: Problem, 403: Problem},
        query={"video_id": "string"},
    ),
]
