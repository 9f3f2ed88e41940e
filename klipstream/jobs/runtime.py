"""The job machinery one process runs: HTTP session, store, storage, integrations, job service.

The server and `klipstream analyze` both enter `job_runtime`, so a local run goes through exactly
the queue, runner, checkpoints and cancellation that the service uses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from klipstream.config import Settings, remove_secrets_from_environment
from klipstream.integrations import close_all, start_integrations
from klipstream.integrations.storage import Storage, create_storage
from klipstream.integrations.webhooks import WebhookDispatcher
from klipstream.jobs.checkpoints import create_checkpoints
from klipstream.jobs.janitor import Janitor
from klipstream.jobs.runner import RunnerDeps, resource_limits
from klipstream.jobs.service import EffectsProducer, JobService, Subscription
from klipstream.jobs.stage import Stage
from klipstream.jobs.store import create_store
from klipstream.jobs.timings import StageTimings
from klipstream.network import user_url_session
from klipstream.transcription.pool import Transcriber


@dataclass
class Runtime:
    service: JobService
    http: aiohttp.ClientSession
    storage: Storage
    transcriber: Transcriber
    webhooks: WebhookDispatcher
    janitor: Janitor


@contextlib.asynccontextmanager
async def job_runtime(
    settings: Settings,
    stages: list[Stage],
    *,
    stream_url: Callable[[str], str] | None = None,
    subscriptions: list[Subscription] | None = None,
    producers: list[EffectsProducer] | None = None,
) -> AsyncIterator[Runtime]:
    """Start everything, yield, then stop within the shutdown budget (jobs go back to the queue).

    `subscriptions` are attached before the workers start, so no event of a recovered job is
    missed; `producers` make the rows written with each job change (the store's Effects).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    remove_secrets_from_environment()  # before any child process starts (transcription workers)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)
    http = aiohttp.ClientSession(timeout=timeout)
    user_http = user_url_session(allow_private=settings.allow_private_urls, timeout=timeout)
    storage = create_storage(settings, http)
    transcriber = Transcriber(settings)  # starts its worker processes on first use
    deps = RunnerDeps(
        settings=settings,
        store=create_store(settings),
        http=http,
        storage=storage,
        timings=StageTimings(),
        listener=lambda kind, job: None,
        limits=resource_limits(settings),
        transcriber=transcriber,
        user_http=user_http,
        checkpoints=create_checkpoints(settings, storage),
    )
    service = JobService(deps, stages, stream_url=stream_url)
    service.subscriptions.extend(subscriptions or [])
    for producer in producers or []:
        service.add_effects(producer.effects, committed=producer.committed)
    closers: list[Any] = [transcriber]
    janitor: Janitor | None = None
    try:
        integrations = start_integrations(service, settings, http, user_http)
        await service.start()
        await integrations.start(service, settings)  # service.shutdown closes them, before the store
        janitor = Janitor(settings, service, storage, integrations.webhooks)
        janitor.start()
        yield Runtime(service, http, storage, transcriber, integrations.webhooks, janitor)
    finally:
        if janitor is not None:
            await janitor.stop()
        deadline = service.shutdown_deadline or time.monotonic() + settings.shutdown_seconds
        if service.started and not service.shutting_down:
            await service.shutdown(deadline)
        await close_all(closers, max(0.5, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            await storage.close()
        await http.close()
        await user_http.close()
