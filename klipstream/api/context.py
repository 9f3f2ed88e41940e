"""What the route handlers share: typed application keys and the instance's own state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from klipstream.api.auth import StreamTokens
from klipstream.config import Settings
from klipstream.jobs.broadcaster import Broadcaster
from klipstream.jobs.runtime import Runtime
from klipstream.jobs.service import JobService
from klipstream.jobs.stage import Stage
from klipstream.metrics import LoopLagMonitor, Metrics


@dataclass
class AppState:
    """This instance's lifecycle, as readiness and the handlers see it."""

    started: float = field(default_factory=time.monotonic)
    stopping: bool = False  # SIGTERM received: streams get `reconnect`, submissions 503
    draining: bool = False  # an operator asked to drain: not ready, nothing dispatched
    drained: bool = False  # the shutdown drain has run (it runs once)
    legacy_waiting: int = 0  # legacy synchronous requests holding a connection open right now


SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", AppState)
STAGES = web.AppKey("stages", list[Stage])
METRICS = web.AppKey("metrics", Metrics)
LAG = web.AppKey("lag", LoopLagMonitor)
TOKENS = web.AppKey("tokens", StreamTokens)
BROADCASTER = web.AppKey("broadcaster", Broadcaster)
RUNTIME = web.AppKey("runtime", Runtime)  # set while the job machinery runs (cleanup context)
SERVICE = web.AppKey("service", JobService)
OPENAPI = web.AppKey("openapi", dict[str, Any])
STATUS_CACHE = web.AppKey("status_cache", dict[str, tuple[Any, bytes, str]])  # job id -> (version, body, ETag)
CORS = web.AppKey("cors", Callable[[web.Request, web.StreamResponse], None])  # adds CORS headers to a response


def service_of(request: web.Request) -> JobService:
    return request.app[SERVICE]
