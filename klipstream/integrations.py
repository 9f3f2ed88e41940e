"""Long-lived services beside the job service: the transcription pool, the Convex mirror and the
webhook dispatcher. Each listens to job events; none can block or fail a job."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from klipstream.config import Settings
from klipstream.convex_mirror import ConvexMirror
from klipstream.outbox import Outbox
from klipstream.service import JobService
from klipstream.transcriber import Transcriber
from klipstream.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)


async def start_integrations(
    service: JobService,
    settings: Settings,
    http: aiohttp.ClientSession,
    services: dict[str, Any],
) -> list[Any]:
    """Create and start the integrations; returns the objects to close, in order."""
    closers: list[Any] = []
    transcriber = Transcriber(settings)  # starts its worker processes on first use
    services["transcriber"] = transcriber
    closers.append(transcriber)
    mirror = ConvexMirror(settings, http)
    if mirror.enabled:
        await mirror.start()
        service.listen(lambda kind, job: mirror.job_changed(job, kind))  # new jobs become Convex rows
        closers.append(mirror)
    dispatcher = WebhookDispatcher(settings, http, Outbox(settings.database_path))
    await dispatcher.start()
    service.listen(lambda kind, job: dispatcher.job_changed(job, kind), new_jobs=False)  # no job.queued event
    closers.append(dispatcher)
    services["webhooks"] = dispatcher
    return closers


async def close_all(closers: list[Any], budget: float) -> None:
    """Close in reverse order of start, sharing one time budget (Cloud Run allows 10 s in all)."""
    deadline = time.monotonic() + budget
    for item in reversed(closers):
        remaining = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.wait_for(item.close(remaining), remaining + 0.5)
        except Exception:  # shutting down: log it and go on closing the rest
            log.warning("closing %s failed", type(item).__name__, exc_info=True)
