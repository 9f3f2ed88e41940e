"""Reading a whole event stream in tests, with the project's one parser (klipstream.sse)."""

from __future__ import annotations

import aiohttp

from klipstream.sse import SseEvent, SseParser


async def read_events(resp: aiohttp.ClientResponse, limit: int = 10_000) -> list[SseEvent]:
    """Read events until the server closes the stream (or `limit` events have arrived)."""
    parser = SseParser()
    events: list[SseEvent] = []
    async for chunk in resp.content.iter_any():
        events += parser.feed(chunk)
        if len(events) >= limit:
            return events[:limit]
    return events
