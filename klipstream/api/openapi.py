"""The OpenAPI 3.1 document, generated from the route table and the pydantic models.

Routes are declared once (method, path, handler, request and response models) and both the router
and this document are built from that declaration, so the description cannot drift from the code.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ResponseSpec = type[BaseModel] | str | None  # a model, a bare media type, or no body


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    responses: dict[int, ResponseSpec] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)  # name -> JSON schema type


def _models(routes: list[Route]) -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {}
    for route in routes:
        candidates = [route.request, *route.responses.values()]
        for model in candidates:
            if isinstance(model, type) and issubclass(model, BaseModel):
                seen[model.__name__] = model
    return list(seen.values())


def openapi_document(routes: list[Route], *, title: str, version: str) -> dict[str, Any]:
    models = _models(routes)
    keyed = [(m, mode) for m in models for mode in ("validation", "serialization")]
    refs, defs = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for route in routes:
        operation_id = route.handler.__name__
        if operation_id in used:  # one handler behind two paths (legacy aliases)
            operation_id += "_" + re.sub(r"\W+", "_", route.path).strip("_")
        used.add(operation_id)
        operation: dict[str, Any] = {
            "operationId": operation_id,
            "summary": route.summary,
            "responses": {str(code): _response(spec, refs) for code, spec in route.responses.items()},
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 128}}
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        parameters += [
            {"name": name, "in": "query", "required": False, "schema": {"type": type_}}
            for name, type_ in route.query.items()
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.request, "validation")]}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _response(spec: ResponseSpec, refs: dict[Any, Any]) -> dict[str, Any]:
    if spec is None:
        return {"description": "No body"}
    if isinstance(spec, str):
        return {"description": spec, "content": {spec: {}}}
    media = "application/problem+json" if spec.__name__ == "Problem" else "application/json"
    return {
        "description": spec.__doc__.strip().splitlines()[0] if spec.__doc__ else spec.__name__,
        "content": {media: {"schema": refs[(spec, "serialization")]}},
    }
