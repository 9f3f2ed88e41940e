"""The route table: every handler and its OpenAPI description, gathered from the api modules."""

from __future__ import annotations

from aiohttp import web

from klipstream.api import admin, files, health, jobs, legacy, streams
from klipstream.api.context import OPENAPI
from klipstream.api.openapi import Route
from klipstream.config import Settings


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def all_routes(settings: Settings, extra: list[Route] | None = None) -> list[Route]:
    routes = [
        *jobs.ROUTES,
        *streams.ROUTES,
        *health.ROUTES,
        *admin.ROUTES,
        Route("GET", "/openapi.json", openapi, "This document", responses={200: "application/json"}),
        *files.ROUTES,
        *(extra or []),
    ]
    if settings.legacy_routes:
        routes += legacy.ROUTES
    return routes
