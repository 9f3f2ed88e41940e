"""The event stream of a job (Server-Sent Events), and the job events that feed it.

A subscriber gets a snapshot (or the events it missed, by Last-Event-ID), then every event until
the job's terminal one. While a subscriber keeps up, the broadcaster's publisher writes each
event's shared chunk straight to its socket (klipstream.jobs.broadcaster.Sink); the handler's own
task wakes only to catch up after a gap or a full socket buffer, or to end the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from klipstream.api.auth import require_api_key
from klipstream.api.context import BROADCASTER, CORS, METRICS, SETTINGS, STATE, TOKENS
from klipstream.api.jobs import job_document, job_or_404
from klipstream.api.openapi import Route
from klipstream.api.problems import retry_later
from klipstream.jobs.broadcaster import Broadcaster, Sink, Topic
from klipstream.models import TERMINAL_STATUSES, Job, Problem
from klipstream.sse import HEARTBEAT_FRAME, frame, http_chunk

SSE_RETRY_MS = 3000
SSE_SEND_TIMEOUT = 30.0
SSE_MAX_BACKLOG = 1 << 20  # bytes queued for one subscriber before it is cut off


async def stream_job(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    job_id = request.match_info["job_id"]
    token = request.query.get("token")
    if settings.api_keys and not (token and app[TOKENS].verify(job_id, token)):
        require_api_key(request, settings)
    job = await job_or_404(request)
    if app[STATE].stopping:
        return retry_later(503, "Shutting down", "Reconnect shortly.", 2)
    broadcaster = app[BROADCASTER]
    metrics = app[METRICS]
    last_event_id = _parse_last_event_id(request)
    known = broadcaster.topics.get(job_id)
    if known is not None and known.terminal and last_event_id is not None and last_event_id >= known.last_id:
        # This client already has the terminal event; 204 tells EventSource to stop reconnecting.
        return web.Response(status=204)
    # aiohttp-sse's response sets the event-stream headers and chunked coding; it is prepared
    # directly rather than through sse_response() to keep each open stream's footprint small.
    response = BroadcastStream(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    app[CORS](request, response)  # prepared here, so the middleware cannot add them later
    await response.prepare(request)
    topic = broadcaster.topic(job_id)
    topic.subscribers += 1
    metrics.sse_subscribers.inc()
    try:
        await _follow(response, app, job, topic, last_event_id)
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


async def _follow(
    response: BroadcastStream, app: web.Application, job: Job, topic: Topic, last_event_id: int | None
) -> None:
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
        if missed and missed[-1].final:
            return
    if job.status.terminal and not (missed and any(e.terminal for e in missed)):
        # Finished: the terminal event, and close.
        await _send(response, http_chunk(frame(topic.last_id, job.status.value, job_document(app, job))))
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


async def _serve_sink(response: BroadcastStream, app: web.Application, job: Job, topic: Topic, sink: Sink) -> None:
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
        if last is not None and last.id == sink.cursor and last.final:
            return
        if sink.transport.is_closing():
            raise ConnectionResetError
        await sink.attention()


def _snapshot(app: web.Application, job: Job, topic: Topic) -> bytes:
    return frame(topic.last_id, "snapshot", job_document(app, job), retry_ms=SSE_RETRY_MS)


async def _send(response: BroadcastStream, chunk: bytes) -> None:
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


# --- job events to stream events ---
def broadcast_listener(broadcaster: Broadcaster) -> Callable[[str, Job], None]:
    """Turns job events into stream events: progress (coalesced), stage changes, the end."""

    def on_event(kind: str, job: Job) -> None:
        if kind == "progress":
            broadcaster.publish_progress(job.job_id, lambda: progress_payload(job))
        elif kind in TERMINAL_STATUSES:
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


ROUTES = [
    Route(
        "GET",
        "/api/v1/analysis/{job_id}/stream",
        stream_job,
        "Server-Sent Events: snapshot, progress, stage, then one of completed|failed|cancelled",
        responses={200: "text/event-stream", 204: None, 404: Problem},
    ),
]
