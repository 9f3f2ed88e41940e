"""The event stream of a job (Server-Sent Events).

A subscriber gets a snapshot (or the events it missed, by Last-Event-ID: from the topic's ring in
memory, else from the `job_events` table, on any instance and after a restart), then every event
until the job's terminal one. Event ids are the job's event sequence (klipstream.jobs.events).
While a subscriber keeps up, the broadcaster's publisher writes each
event's shared chunk straight to its socket (klipstream.jobs.broadcaster.Sink); the handler's own
task wakes only to catch up after a gap or a full socket buffer, or to end the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web

from klipstream.api.auth import require_api_key
from klipstream.api.context import BROADCASTER, CORS, METRICS, SERVICE, SETTINGS, STATE, TOKENS
from klipstream.api.jobs import job_document, job_or_404
from klipstream.api.openapi import Route
from klipstream.api.problems import retry_later
from klipstream.jobs.broadcaster import Event, Sink, Topic
from klipstream.jobs.events import progress_payload, stage_payload
from klipstream.jobs.store import EventRow
from klipstream.models import Job, Problem
from klipstream.sse import HEARTBEAT_FRAME, frame, http_chunk

__all__ = ["ROUTES", "progress_payload", "stage_payload"]
log = logging.getLogger(__name__)

SSE_RETRY_MS = 3000
SSE_SEND_TIMEOUT = 30.0
SSE_MAX_BACKLOG = 1 << 20  # bytes queued for one subscriber before it is cut off
SSE_DRAIN_POLL_SECONDS = 0.05  # how often a subscriber that is behind checks its socket drained
FINISHED_EVENT_ID = 1  # id of the terminal event of a finished job that has no stored events (older rows)


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
    if job.status.terminal and (known is None or known.terminal):
        # A finished job. A client that already has its terminal event gets 204, which tells
        # EventSource to stop reconnecting; any other gets the snapshot and the end, and no topic
        # is made for a job that will publish nothing more.
        end_id = known.last_id if known is not None else job.event_seq or FINISHED_EVENT_ID
        if last_event_id is not None and last_event_id >= end_id:
            return web.Response(status=204)
        if known is None:
            return await _finished(request, job, last_event_id)
    response = EventStream()
    app[CORS](request, response)  # prepared here, so the middleware cannot add them later
    await response.prepare(request)
    topic = broadcaster.topic(job_id, job.event_seq)
    topic.subscribers += 1
    metrics.sse_subscribers.inc()
    unwatch = app[SERVICE].watch(job_id, broadcaster)  # running on another instance: read from the table
    try:
        await _follow(response, app, job, topic, last_event_id)
    except (ConnectionResetError, TimeoutError, RuntimeError):
        pass  # the client went away or stalled past the send timeout
    finally:
        unwatch()
        topic.subscribers -= 1
        topic.last_used = time.monotonic()
        metrics.sse_subscribers.dec()
    return response


class EventStream(web.StreamResponse):
    """A text/event-stream response on aiohttp's public API: chunked, never cached or buffered by
    proxies. There is no ping task per stream: the broadcaster's one heartbeat timer writes the
    keep-alive comment to every open stream."""

    def __init__(self) -> None:
        super().__init__(
            status=200, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
        )
        self.content_type = "text/event-stream"
        self.charset = "utf-8"
        self.enable_chunked_encoding()
        self.transport: asyncio.Transport | None = None

    async def prepare(self, request: web.BaseRequest) -> object:
        writer = await super().prepare(request)
        self.transport = request.transport  # type: ignore[assignment]
        return writer

    def open_transport(self) -> asyncio.Transport:
        """The socket, for writing pre-encoded chunks shared by every subscriber."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError
        return self.transport


async def _finished(request: web.Request, job: Job, last_event_id: int | None) -> web.StreamResponse:
    """A finished job nobody here follows: the events after Last-Event-ID from the table when it
    still has them all, else the snapshot and the terminal event; then the end."""
    app = request.app
    end_id = job.event_seq or FINISHED_EVENT_ID
    missed = await _stored(app, job.job_id, last_event_id) if last_event_id is not None and job.event_seq else None
    response = EventStream()
    app[CORS](request, response)
    await response.prepare(request)
    if missed and missed[-1].seq == end_id:
        body = b"".join(frame(e.seq, e.type, e.data) for e in missed)
    else:
        body = frame(end_id - 1, "snapshot", job_document(app, job), retry_ms=SSE_RETRY_MS)
        body += frame(end_id, job.status.value, job_document(app, job))
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write(body)
    return response


def _parse_last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw and raw.isdigit() and len(raw) < 19:
        return int(raw)
    return None


async def _follow(
    response: EventStream, app: web.Application, job: Job, topic: Topic, last_event_id: int | None
) -> None:
    """Replay or snapshot, then forward events until the job's terminal event.

    The first write goes through aiohttp (it sends the buffered headers with it); every later
    event is written to the socket as the pre-encoded chunk shared by all subscribers.
    """
    missed = None
    if last_event_id is not None:
        missed = topic.since(last_event_id)
        if missed is None:  # not in memory (another process or instance published it): the table
            missed = _into_topic(topic, await _stored(app, job.job_id, last_event_id))
    if missed is None:
        # The cursor is taken before the snapshot is written: an event published while the write
        # waits is sent after it (at worst twice in effect), never lost.
        cursor = topic.last_id
        await response.write(_snapshot(app, job, topic))
    else:
        await response.write(b"".join(e.frame for e in missed) or HEARTBEAT_FRAME)
        cursor = missed[-1].id if missed else last_event_id or 0
        if missed and missed[-1].final:
            return
    if job.status.terminal and not (missed and any(e.terminal for e in missed)):
        # Finished: the terminal event, and close.
        end_id = max(job.event_seq, topic.last_id)
        await _send(response, http_chunk(frame(end_id, job.status.value, job_document(app, job))))
        return
    sink = Sink(response.open_transport(), cursor)
    topic.sinks.add(sink)
    try:
        await _serve_sink(response, app, job, topic, sink)
    finally:
        topic.sinks.discard(sink)


async def _stored(app: web.Application, job_id: str, last_event_id: int) -> list[EventRow] | None:
    """The job's events after `last_event_id` from the table, or None when the table cannot say
    which they all are: the id is older than the events it keeps, or not one of the job's, or
    the database did not answer (then the stream starts from a fresh snapshot)."""
    try:
        rows = await app[SERVICE].store.job_events(job_id, last_event_id)
    except Exception as exc:  # a snapshot instead of a replay; the stream itself still works
        log.warning("reading the job's stored events failed: %s", exc, extra={"job_id": job_id})
        return None
    if not rows or rows[0].seq != last_event_id + 1:
        return None
    return rows


def _into_topic(topic: Topic, rows: list[EventRow] | None) -> list[Event] | None:
    """Stored events as the replay of one subscriber; those the topic does not have yet are
    published to it too (an instance that follows the job would read them next anyway)."""
    if rows is None:
        return None
    out = []
    for row in rows:
        topic.put(row.seq, row.type, row.data)
        encoded = frame(row.seq, row.type, row.data)
        out.append(Event(row.seq, row.type, row.data, encoded, http_chunk(encoded)))
    return out


async def _serve_sink(response: EventStream, app: web.Application, job: Job, topic: Topic, sink: Sink) -> None:
    """The subscriber's own task: catch up when the publisher could not write, end after the
    terminal event. While it keeps up, the publisher writes for it and this task sleeps."""
    while True:
        if sink.cursor != topic.last_id:
            sink.busy = True
            try:
                events = topic.since(sink.cursor)
                if events is None:  # fell off the ring: start again from a fresh snapshot
                    cursor = topic.last_id  # taken before the write, as in _follow
                    await _send(response, http_chunk(_snapshot(app, job, topic)))
                    sink.cursor = cursor
                    continue
                await _send(response, b"".join(e.chunk for e in events))
                sink.cursor = events[-1].id
            finally:
                sink.busy = False
        last = topic.events[-1] if topic.events else None
        if last is not None and last.id == sink.cursor and last.final:
            return
        if topic.closing is not None and sink.cursor >= topic.last_id:
            # Shutdown: reconnect (elsewhere), with the id of the last event this subscriber got.
            await _send(response, http_chunk(frame(sink.cursor, *topic.closing)))
            return
        if sink.transport.is_closing():
            raise ConnectionResetError
        await sink.attention()


def _snapshot(app: web.Application, job: Job, topic: Topic) -> bytes:
    return frame(topic.last_id, "snapshot", job_document(app, job), retry_ms=SSE_RETRY_MS)


async def _send(response: EventStream, chunk: bytes) -> None:
    """Write a chunk to the socket with no timer on the fast path. A client that is already behind
    gets a deadline to drain; one hopelessly behind is cut off (it reconnects with Last-Event-ID)."""
    transport = response.open_transport()
    backlog = transport.get_write_buffer_size()
    if backlog > SSE_MAX_BACKLOG:
        transport.abort()
        raise ConnectionResetError
    transport.write(chunk)
    if backlog:
        # Only subscribers already behind get here; they wait (bounded) until the socket drains.
        async with asyncio.timeout(SSE_SEND_TIMEOUT):
            while transport.get_write_buffer_size() > 0:
                if transport.is_closing():
                    raise ConnectionResetError
                await asyncio.sleep(SSE_DRAIN_POLL_SECONDS)


ROUTES = [
    Route(
        "GET",
        "/api/v1/analysis/{job_id}/stream",
        stream_job,
        "Server-Sent Events: snapshot, progress, stage, then one of completed|failed|cancelled",
        responses={200: "text/event-stream", 204: None, 404: Problem},
    ),
]
