"""The one middleware: trace context, CORS, and a problem-details body for every error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from klipstream.api.problems import from_http_exception, problem, retry_later
from klipstream.config import Settings
from klipstream.errors import DatabaseUnavailable
from klipstream.logs import trace_context

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AddCors = Callable[[web.Request, web.StreamResponse], None]


def http_middleware(
    settings: Settings, add_cors: AddCors
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Answers preflights, adds CORS headers and turns every error into problem details (never a
    traceback). CORS is applied here, not in a response-prepare signal, so responses that are not
    streamed pay no signal dispatch; the event stream, prepared inside its handler, adds the same
    headers itself."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        trace = request.headers.get("X-Cloud-Trace-Context")
        token = trace_context.set(trace) if trace else None
        try:
            if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
                response: web.StreamResponse = web.Response(status=204)
            else:
                response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                add_cors(request, exc)
                raise
            response = from_http_exception(exc, settings.max_body_bytes)
        except asyncio.CancelledError:
            raise
        except DatabaseUnavailable as exc:  # not the client's fault, nor a bug: come back shortly
            log.warning("%s %s: %s", request.method, request.path, exc.message)
            response = retry_later(503, "Database unavailable", exc.suggested_action, int(exc.retry_after or 5))
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = problem(500, "Internal error", "The server failed to handle the request; it has been logged.")
        finally:
            if token is not None:
                trace_context.reset(token)
        if not response.prepared:
            add_cors(request, response)
        return response

    return middleware


def cors_headers(settings: Settings) -> AddCors:
    """The function that adds CORS headers to a response that is not yet sent."""
    origins = set(settings.cors_origins)
    wildcard = "*" in origins
    static = {
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, If-None-Match",
        "Access-Control-Expose-Headers": "ETag, Retry-After, Location",
        "Access-Control-Max-Age": "600",
    }

    def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if not origin or not (wildcard or origin in origins):
            return
        # Never a wildcard together with credentials: with explicit origins the origin is echoed.
        response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
        if not wildcard:
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        response.headers.update(static)

    return add
