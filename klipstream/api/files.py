"""Static responses: stored artifacts (local storage) and the web page."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from klipstream.api.auth import api_key_ok
from klipstream.api.context import SETTINGS, TOKENS
from klipstream.api.openapi import Route
from klipstream.models import Problem

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_FILES = frozenset({"index.html", "app.js", "style.css"})
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Same-origin only, except https: media, images and fetches so Cloud Storage artifact URLs still load.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: https:; "
    "media-src 'self' https:; connect-src 'self' https:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
}


async def serve_file(request: web.Request) -> web.StreamResponse:
    """An artifact. With API keys on it needs a key, or the signature of the link a job's results
    gave (which expires): video ids are guessable Twitch ids, so the path alone is no secret."""
    settings = request.app[SETTINGS]
    cache = "public, max-age=300"
    if settings.api_keys:
        query = request.query
        signed = request.app[TOKENS].verify_path(
            request.rel_url.raw_path, query.get("expires", ""), query.get("signature", "")
        )
        if not signed and not api_key_ok(request, settings):
            raise web.HTTPUnauthorized(
                reason="Unauthorized",
                text="Artifacts need Authorization: Bearer <api key>, or the signed link from the job's results "
                "(links expire; read the job again for fresh ones).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        cache = "private, max-age=300"
    video_id = request.match_info["video_id"]
    name = request.match_info["name"]
    if "/" in video_id or video_id.startswith(".") or "/" in name or name.startswith("."):
        raise web.HTTPNotFound(reason="Not found", text="No such artifact.")
    root = settings.artifacts_dir.resolve()
    path = (root / video_id / name).resolve()
    if root not in path.parents or not path.is_file():
        raise web.HTTPNotFound(reason="Not found", text="No such artifact.")
    return web.FileResponse(path, headers={"Cache-Control": cache})


async def index_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound(reason="Not found", text="No such file.")
    return web.FileResponse(WEB_DIR / name, headers=PAGE_HEADERS)


ROUTES = [
    Route("GET", "/", index_page, "The web page", responses={200: "text/html"}),
    Route(
        "GET",
        "/static/{name}",
        static_file,
        "The page's script and style sheet",
        responses={200: "application/octet-stream", 404: Problem},
    ),
    Route(
        "GET",
        "/files/{video_id}/{name}",
        serve_file,
        "A stored artifact (local storage)",
        responses={200: "application/octet-stream", 401: Problem, 404: Problem},
        query={"expires": "string", "signature": "string"},
    ),
]
