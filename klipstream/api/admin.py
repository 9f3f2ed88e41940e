"""Operator routes: queue statistics, pause/resume/drain, Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from klipstream.api.auth import require_admin
from klipstream.api.context import BROADCASTER, METRICS, RUNTIME, SERVICE, SETTINGS, STATE, service_of
from klipstream.api.openapi import Route
from klipstream.api.problems import model_response
from klipstream.models import TERMINAL_STATUSES, Problem, QueueStats


async def queue_stats(request: web.Request) -> web.Response:
    require_admin(request, request.app[SETTINGS])
    service = service_of(request)
    limits = service.deps.limits
    counts = await service.store.terminal_counts(time.time() - 3600)
    backlog = await request.app[RUNTIME].webhooks.backlog()
    stats = QueueStats(
        paused=service.queue.paused,
        draining=request.app[STATE].draining,
        queued=service.queued_counts(),
        queued_total=len(service.queue),
        oldest_queued_age_seconds=_round(service.queue.oldest_age()),
        running=service.running_summary(),
        resources={
            "jobs": {"in_use": len(service.pool.running), "limit": service.pool.size},
            **{r.value: {"in_use": limit.in_use, "limit": limit.size} for r, limit in limits.items()},
        },
        last_hour={s.value: counts.get(s.value, 0) for s in sorted(TERMINAL_STATUSES)},
        stage_durations=service.deps.timings.percentiles(),
        webhook_backlog=backlog,
        streams=stream_stats(request.app),
    )
    if service.shared is not None and service.cluster is not None:
        stats.instance_id = service.cluster.id
        stats.instances = await service.shared.instances()
    return model_response(stats)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def stream_stats(app: web.Application) -> dict[str, int]:
    """What open streams hold: event topics, subscribers, and the process's asyncio tasks (a
    leak of any shows here first)."""
    topics = app[BROADCASTER].topics
    return {
        "topics": len(topics),
        "subscribers": sum(t.subscribers for t in topics.values()),
        "tasks": len(asyncio.all_tasks()),
    }


async def pause_queue(request: web.Request) -> web.Response:
    require_admin(request, request.app[SETTINGS])
    service_of(request).queue.pause()
    return web.json_response({"paused": True})


async def resume_queue(request: web.Request) -> web.Response:
    require_admin(request, request.app[SETTINGS])
    request.app[STATE].draining = False
    service_of(request).queue.resume()
    return web.json_response({"paused": False, "draining": False})


async def drain_queue(request: web.Request) -> web.Response:
    """Stop dispatching and report not-ready, so the load balancer sends new work elsewhere;
    running jobs finish. `resume` undoes it."""
    require_admin(request, request.app[SETTINGS])
    request.app[STATE].draining = True
    service = service_of(request)
    service.queue.pause()
    return web.json_response({"paused": True, "draining": True, "running": len(service.pool.running)})


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    service = app[SERVICE]
    m = app[METRICS]
    m.queue_depth.set(len(service.queue))
    m.running_jobs.set(len(service.pool.running))
    body = generate_latest(m.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


ROUTES = [
    Route(
        "GET",
        "/api/v1/queue/stats",
        queue_stats,
        "Queue statistics (admin)",
        responses={200: QueueStats, 401: Problem, 403: Problem},
    ),
    Route(
        "POST",
        "/api/v1/queue/pause",
        pause_queue,
        "Stop dispatching queued jobs (admin)",
        responses={200: "application/json", 401: Problem, 403: Problem},
    ),
    Route(
        "POST",
        "/api/v1/queue/resume",
        resume_queue,
        "Resume dispatching (admin)",
        responses={200: "application/json", 401: Problem, 403: Problem},
    ),
    Route(
        "POST",
        "/api/v1/queue/drain",
        drain_queue,
        "Stop dispatching and report not ready (admin)",
        responses={200: "application/json", 401: Problem, 403: Problem},
    ),
    Route("GET", "/metrics", metrics, "Prometheus metrics", responses={200: "text/plain"}),
]
