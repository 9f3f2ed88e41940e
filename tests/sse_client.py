"""A minimal text/event-stream reader for tests (what a script following the stream does)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def read_events(resp: aiohttp.ClientResponse, limit: int = 10_000) -> list[SseEvent]:
    """Read events until the server closes the stream."""
    events: list[SseEvent] = []
    fields: dict[str, list[str]] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in fields or "event" in fields:
                events.append(
                    SseEvent(
                        id=fields.get("id", [None])[-1],
                        event=fields.get("event", ["message"])[-1],
                        data="\n".join(fields.get("data", [])),
                    )
                )
                if len(events) >= limit:
                    break
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
    return events
