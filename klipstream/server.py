"""The aiohttp application: the app factory and its lifecycle (start, drain, stop).

Routes live in klipstream.api; the job machinery (store, queue, workers, integrations) in
klipstream.jobs.runtime, entered for the app's lifetime. Nothing slow happens in a request:
submissions validate, write the job durably and return; polls are answered from memory; streams
read from the broadcaster's ring buffers.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from klipstream import __version__
from klipstream.api.auth import StreamTokens
from klipstream.api.context import (
    BROADCASTER,
    CORS,
    LAG,
    METRICS,
    OPENAPI,
    RUNTIME,
    SERVICE,
    SETTINGS,
    STAGES,
    STATE,
    STATUS_CACHE,
    TOKENS,
    AppState,
)
from klipstream.api.jobs import job_document
from klipstream.api.middleware import cors_headers, http_middleware
from klipstream.api.openapi import Route, openapi_document
from klipstream.api.routes import all_routes
from klipstream.api.streams import SSE_RETRY_MS
from klipstream.config import Settings
from klipstream.jobs.broadcaster import Broadcaster
from klipstream.jobs.events import StreamEvents
from klipstream.jobs.runtime import job_runtime
from klipstream.jobs.service import Subscription
from klipstream.jobs.stage import Stage
from klipstream.metrics import LoopLagMonitor, Metrics

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 10_000  # net allocations between young collections (CPython default: 700)


class StartupError(Exception):
    """The service cannot start: the message is the one line the operator sees."""


SSE_HEARTBEAT_SECONDS = 15.0
SSE_REAP_SECONDS = 1.0  # how soon the stream of a client that went away is ended


def create_app(
    settings: Settings,
    *,
    stages: list[Stage] | None = None,
    extra_routes: list[Route] | None = None,
) -> web.Application:
    if stages is None:
        from klipstream.stages import default_pipeline

        stages = default_pipeline()
    cors = cors_headers(settings)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[http_middleware(settings, cors)],
        handler_args={"max_field_size": 16384},
    )
    app[SETTINGS] = settings
    app[STATE] = AppState()
    app[STATUS_CACHE] = {}
    app[METRICS] = Metrics()
    app[BROADCASTER] = Broadcaster(buffer_size=settings.stream_events_kept, idle_seconds=settings.stream_idle_seconds)
    app[TOKENS] = StreamTokens(settings)
    app[LAG] = LoopLagMonitor(app[METRICS])
    app[STAGES] = stages
    app[CORS] = cors
    routes = all_routes(settings, extra_routes)
    resources: dict[str, web.Resource] = {}
    for route in routes:  # one resource per path, so GET / (the page) and POST / (legacy) coexist
        if route.path not in resources:
            resources[route.path] = app.router.add_resource(route.path)
        resources[route.path].add_route(route.method, route.handler)
    app[OPENAPI] = openapi_document(routes, title="KlipStream Analysis", version=__version__)
    app.cleanup_ctx.append(_runtime)
    app.on_shutdown.append(_drain)
    return app


async def _runtime(app: web.Application) -> AsyncIterator[None]:
    """The job machinery for the app's lifetime (aiohttp cleanup context)."""
    settings = app[SETTINGS]
    tokens = app[TOKENS]
    base = settings.public_url.rstrip("/")

    def stream_url(job_id: str) -> str:
        url = f"{base}/api/v1/analysis/{job_id}/stream"
        return f"{url}?token={tokens.issue(job_id)}" if settings.api_keys else url

    # Metrics need no new jobs: submissions are counted by the handler. The event streams are fed
    # by the job_events rows written with each job change (klipstream.jobs.events), not by a
    # listener: a submission writes none (nobody can be watching a job before it is answered).
    subscriptions = [Subscription(app[METRICS].job_event, new_jobs=False)]
    producers = [StreamEvents(app[BROADCASTER], lambda job: job_document(app, job))]
    async with job_runtime(
        settings, app[STAGES], stream_url=stream_url, subscriptions=subscriptions, producers=producers
    ) as runtime:
        app[RUNTIME] = runtime
        app[SERVICE] = runtime.service
        app[LAG].start()
        heartbeat = asyncio.create_task(_heartbeat_and_prune(app[BROADCASTER]))
        try:
            yield
        finally:
            heartbeat.cancel()
            await app[LAG].stop()


async def _heartbeat_and_prune(broadcaster: Broadcaster) -> None:
    """One timer for all open streams: every second, end the streams of clients that went away
    (their handlers otherwise wait for the next event); every 15 s, the keep-alive comment and
    forgetting topics nobody watches."""
    ticks = 0
    per_beat = max(1, round(SSE_HEARTBEAT_SECONDS / SSE_REAP_SECONDS))
    while True:
        await asyncio.sleep(SSE_REAP_SECONDS)
        ticks += 1
        if ticks % per_beat == 0:
            broadcaster.heartbeat()
            broadcaster.prune()
        else:
            broadcaster.reap()


async def _drain(app: web.Application) -> None:
    """Tell streams to reconnect and put running jobs back in the queue, within the shutdown
    budget. Idempotent: the signal path calls it before aiohttp's own shutdown does."""
    state = app[STATE]
    if state.drained:
        return
    state.drained = True
    state.stopping = True
    deadline = time.monotonic() + app[SETTINGS].shutdown_seconds
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
    # The port is taken first: a port in use is reported before anything else starts.
    try:
        sock = socket.create_server((settings.host, settings.port), reuse_port=False)
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {_reason(exc)}") from None
    app = create_app(settings, stages=stages)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    try:
        await runner.setup()
    except (OSError, sqlite3.Error) as exc:
        log.debug("opening the data directory failed", exc_info=True)
        sock.close()
        raise StartupError(f"cannot open the data directory {settings.data_dir}: {_reason(exc)}") from None
    site = web.SockSite(runner, sock)
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


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def preflight(settings: Settings, stages: list[Stage] | None = None) -> None:
    """What would otherwise fail later with a traceback: a data directory the process cannot write,
    and a Whisper model that is not on disk (nothing downloads weights at run time)."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.data_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"the data directory {settings.data_dir} is not writable: {_reason(exc)}") from None
    from klipstream.jobs.stage import Resource

    if stages is None or any(s.resource is Resource.TRANSCRIPTION for s in stages):
        from klipstream.transcription.worker import ModelUnavailable, resolve_model

        try:
            resolve_model(settings.whisper_model)
        except ModelUnavailable as exc:
            raise StartupError(str(exc)) from None


def tune_gc() -> None:
    """Keep cyclic collections rare and short under load (docs/decisions.md: "Garbage collector").

    Young collections run every GC_YOUNG_THRESHOLD net allocations: with many requests in flight
    the default threshold walked thousands of live request objects every few dozen requests.
    What exists once the server has started (modules, the app, the route table) is frozen once, so
    full collections do not walk it again. Only once: freezing again later would also freeze
    whatever was in a reference cycle at that moment (requests, job tasks, exceptions with their
    tracebacks) and it would never be collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
