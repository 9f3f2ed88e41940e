"""Long-lived services beside the job service: the transcription pool, the Convex mirror and the
webhook dispatcher. Each listens to job events; none can block or fail a job."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from klipstream.config import Settings
from klipstream.convex_mirror import ConvexMirror
from klipstream.outbox import Outbox
from klipstream.webhooks import WebhookDispatcher
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
    mirror = ConvexMirror(settings, http)
    if mirror.enabled:
        await mirror.start()
        service.listeners.append(lambda kind, job: mirror.job_changed(job, kind))
        closers.append(mirror)
    dispatcher = WebhookDispatcher(settings, http, Outbox(settings.database_path))
    await dispatcher.start()
    service.listeners.append(lambda kind, job: dispatcher.job_changed(job, kind))
    closers.append(dispatcher)
    services["webhooks"] = dispatcher
    if app is not None:
        app[CLOSERS] = closers
    return closers


async def close_all(closers: list[Any], budget: float) -> None:
    """Close in reverse order of start, sharing one time budget (Cloud Run allows 10 s in all)."""
    deadline = time.monotonic() + budget
    for item in reversed(closers):
        remaining = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.wait_for(item.close(remaining), remaining + 0.5)
        except Exception:  # noqa: BLE001 - shutting down: log and go on closing the rest
            log.warning("closing %s failed", type(item).__name__, exc_info=True)


async def stop_integrations(app: web.Application, budget: float) -> None:
    await close_all(app.get(CLOSERS, []), budget)
