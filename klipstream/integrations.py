"""Long-lived services beside the job service: the transcription pool, the Convex mirror and the
webhook dispatcher. Each listens to job events; none can block or fail a job."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any

import aiohttp
from aiohttp import web

from klipstream.config import Settings
from klipstream.service import JobService

log = logging.getLogger(__name__)
CLOSERS = web.AppKey("integration_closers", list)


async def start_integrations(
    app: web.Application | None,
    service: JobService,
    settings: Settings,
    http: aiohttp.ClientSession,
    services: dict[str, Any],
) -> list[Any]:
    """Create and start the integrations; returns the objects to close, in order."""
    closers: list[Any] = []
    if importlib.util.find_spec("klipstream.transcriber") is not None:
        from klipstream.transcriber import Transcriber

        transcriber = Transcriber(settings)  # starts its worker processes on first use
        services["transcriber"] = transcriber
        closers.append(transcriber)
    if importlib.util.find_spec("klipstream.convex_mirror") is not None:
        from klipstream.convex_mirror import ConvexMirror

        mirror = ConvexMirror(settings, http)
        if mirror.enabled:
            await mirror.start()
            service.listeners.append(lambda kind, job: mirror.job_changed(job, kind))
            closers.append(mirror)
    if importlib.util.find_spec("klipstream.webhooks") is not None:
        from klipstream.outbox import Outbox
        from klipstream.webhooks import WebhookDispatcher

        outbox = Outbox(settings.database_path)
        dispatcher = WebhookDispatcher(settings, http, outbox)
        await dispatcher.start()
        service.listeners.append(lambda kind, job: dispatcher.job_changed(job, kind))
        closers.append(dispatcher)
        services["webhooks"] = dispatcher
    if app is not None:
        app[CLOSERS] = closers
    return closers


async def close_all(closers: list[Any], timeout: float = 3.0) -> None:
    for item in reversed(closers):
        with contextlib.suppress(Exception):
            try:
                await item.close(timeout)
            except TypeError:
                await item.close()


async def stop_integrations(app: web.Application) -> None:
    await close_all(app.get(CLOSERS, []))
