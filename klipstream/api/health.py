"""Liveness and readiness, as Cloud Run's probes and load balancers ask for them."""

from __future__ import annotations

import time

from aiohttp import web

from klipstream import __version__
from klipstream.api.context import SERVICE, STATE, service_of
from klipstream.api.openapi import Route
from klipstream.api.problems import model_response
from klipstream.models import HealthView


async def health(request: web.Request) -> web.Response:
    """Liveness: no I/O, so a busy store never gets the instance restarted."""
    return model_response(
        HealthView(
            state=state_name(request.app),
            version=__version__,
            detail={"uptime_seconds": round(time.monotonic() - request.app[STATE].started, 1)},
        )
    )


def state_name(app: web.Application) -> str:
    state = app[STATE]
    service = app[SERVICE]
    if state.stopping or state.draining or service.shutting_down:
        return "draining"
    if not service.started:
        return "starting"
    if len(service.pool.running) >= service.pool.size:
        return "busy"
    return "ready"


async def ready(request: web.Request) -> web.Response:
    service = service_of(request)
    name = state_name(request.app)
    store_ok = service.started and await service.store.ping()
    workers_ok = service.pool.alive()
    healthy = name in ("ready", "busy") and store_ok and workers_ok
    view = HealthView(
        state=name if healthy or name != "ready" else "degraded",
        version=__version__,
        detail={"store": store_ok, "workers": workers_ok},
    )
    return model_response(view, 200 if healthy else 503)


ROUTES = [
    Route("GET", "/health", health, "Liveness", responses={200: HealthView}),
    Route("GET", "/health/ready", ready, "Readiness", responses={200: HealthView, 503: HealthView}),
]
