"""RFC 9457 problem details: the one error body of the API, and the JSON responses around it."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from klipstream.models import Problem


def problem(
    status: int, title: str, detail: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = Problem(title=title, status=status, detail=detail, **extra).model_dump(exclude_none=True)
    return web.json_response(body, status=status, content_type="application/problem+json", headers=headers)


def retry_later(status: int, title: str, detail: str, seconds: int) -> web.Response:
    """429 or 503 with Retry-After: the client did nothing wrong and should come back."""
    return problem(status, title, detail, headers={"Retry-After": str(seconds)})


def validation_problem(exc: ValidationError) -> web.Response:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return problem(400, "Malformed JSON", "The request body is not valid JSON.")
    fields = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in errors]
    return problem(422, "Invalid request", "Some fields are missing or invalid.", errors=fields)


def from_http_exception(exc: web.HTTPException, max_body_bytes: int) -> web.Response:
    if exc.status == 413:
        return problem(413, "Request body too large", f"The limit is {max_body_bytes} bytes.")
    keep = {k: v for k, v in exc.headers.items() if k.lower() in ("retry-after", "www-authenticate", "allow")}
    return problem(exc.status, exc.reason, exc.text or exc.reason, headers=keep)


def json_text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)


def model_response(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return json_text(model.model_dump_json(), status, headers)
