"""Services beside the job service that report job changes outward: the Convex mirror and the
webhook dispatcher. Each produces outbox rows that the job store writes with the job change that
causes them (the service's effects), and sends them from the store; none can block or fail a job."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from klipstream.config import Settings
from klipstream.integrations.convex import ConvexMirror
from klipstream.integrations.outbox import import_local_outbox
from klipstream.integrations.webhooks import WebhookDispatcher
from klipstream.jobs.cluster import new_instance_id
from klipstream.jobs.service import JobService
from klipstream.jobs.store import Effects

log = logging.getLogger(__name__)


@dataclass
class Integrations:
    webhooks: WebhookDispatcher
    convex: ConvexMirror | None = None
    closers: list[Any] = field(default_factory=list)  # in start order; closed in reverse

    async def start(self, service: JobService, settings: Settings) -> None:
        """Start the senders, once the store is open. A shared store first takes over the pending
        deliveries of the data directory's SQLite file (written there by an earlier release)."""
        if service.shared is not None:
            try:
                await import_local_outbox(settings.database_path, service.shared)  # type: ignore[arg-type]
            except Exception:  # they stay in the file; the next start tries again
                log.exception("could not import the pending webhook deliveries of %s", settings.database_path)
        for sender in self.closers:
            await sender.start()
        # Closed by the service's shutdown after its jobs are checkpointed and before its store
        # closes (they record their outcomes there); what they leave unsent stays in the outbox.
        service.before_store_closes(lambda budget: close_all(self.closers, budget))


def start_integrations(
    service: JobService, settings: Settings, http: aiohttp.ClientSession, user_http: aiohttp.ClientSession
) -> Integrations:
    """Attach the producers to the service before it starts (so no job change of a recovered job
    goes without its outbox rows); `Integrations.start` starts the senders once the store is open.
    `http` for the operator's services (Convex); `user_http`, the public-only client, for the
    callback URLs users supply."""
    owner = service.cluster.id if service.cluster is not None else new_instance_id()
    closers: list[Any] = []
    mirror = ConvexMirror(settings, http, service.store, owner)
    if mirror.enabled:
        service.add_effects(lambda kind, job: Effects(deliveries=mirror.updates(kind, job)), new_jobs=True)
        service.listen(lambda kind, job: mirror.job_changed(job, kind), new_jobs=False)
        closers.append(mirror)
    dispatcher = WebhookDispatcher(settings, user_http, service.store, owner)
    service.add_effects(lambda kind, job: Effects(deliveries=dispatcher.deliveries(kind, job)))
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
