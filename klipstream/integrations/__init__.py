"""Services beside the job service that report job changes outward: the Convex mirror and the
webhook dispatcher. Each listens to job events; none can block or fail a job."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from klipstream.config import Settings
from klipstream.integrations.convex import ConvexMirror
from klipstream.integrations.outbox import Outbox
from klipstream.integrations.webhooks import WebhookDispatcher
from klipstream.jobs.service import JobService

log = logging.getLogger(__name__)


@dataclass
class Integrations:
    webhooks: WebhookDispatcher
    convex: ConvexMirror | None = None
    closers: list[Any] = field(default_factory=list)  # in start order; closed in reverse


async def start_integrations(
    service: JobService, settings: Settings, http: aiohttp.ClientSession, user_http: aiohttp.ClientSession
) -> Integrations:
    """`http` for the operator's services (Convex); `user_http`, the public-only client, for the
    callback URLs users supply."""
    closers: list[Any] = []
    mirror = ConvexMirror(settings, http)
    if mirror.enabled:
        await mirror.start()
        service.listen(lambda kind, job: mirror.job_changed(job, kind))  # new jobs become Convex rows
        closers.append(mirror)
    dispatcher = WebhookDispatcher(settings, user_http, Outbox(settings.database_path))
    await dispatcher.start()
    service.listen(lambda kind, job: dispatcher.job_changed(job, kind), new_jobs=False)  # no job.queued event
    closers.append(dispatcher)
    return Integrations(dispatcher, mirror if mirror.enabled else None, closers)


async def close_all(closers: list[Any], budget: float) -> None:
    """Close in reverse order of start, sharing one time budget (Cloud Run allows 10 s in all)."""
    deadline = time.monotonic() + budget
    for item in reversed(closers):
        remaining = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.wait_for(item.close(remaining), remaining + 0.5)
        except Exception:  # shutting down: log it and go on closing the rest
            log.warning("closing %s failed", type(item).__name__, exc_info=True)
