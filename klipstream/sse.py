"""The text/event-stream format, both ways: frames the server writes, and the parser that reads them.

One module so the server's framing, the CLI's reader and the tests' reader cannot disagree about
the format (the WHATWG rules: `field: value` lines, `:` comments, a blank line dispatches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_EVENT_BYTES = 16 * 1024 * 1024  # a whole job document with highlights fits many times over


def frame(event_id: int, type_: str, data: str, retry_ms: int | None = None) -> bytes:
    """One event; `data` must be a single line (compact JSON is). CRLF like aiohttp-sse."""
    retry = f"retry: {retry_ms}\r\n" if retry_ms is not None else ""
    return f"id: {event_id}\r\nevent: {type_}\r\n{retry}data: {data}\r\n\r\n".encode()


def http_chunk(payload: bytes) -> bytes:
    """`payload` in HTTP/1.1 chunked transfer coding (event streams are always chunked), so a
    frame encoded once can be written as it is to every subscriber's socket."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


HEARTBEAT_FRAME = b": ping\r\n\r\n"  # a comment: keeps proxies from closing an idle stream
HEARTBEAT_CHUNK = http_chunk(HEARTBEAT_FRAME)


class EventTooLarge(ValueError):
    """A line longer than MAX_EVENT_BYTES: the peer is not sending an event stream."""


@dataclass
class SseEvent:
    event: str
    data: str
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseParser:
    """Incremental parser, fed raw chunks rather than lines: aiohttp's line reader refuses lines
    over 64 KiB, and a finished job's document can be longer."""

    buffer: bytearray = field(default_factory=bytearray)
    data: list[str] = field(default_factory=list)
    event: str = ""
    last_id: str | None = None  # of the last dispatched event: what Last-Event-ID sends
    id_buffer: str | None = None  # the id field seen so far; counts only once its event is complete
    retry: int | None = None

    def __post_init__(self) -> None:
        self.id_buffer = self.last_id

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self.buffer += chunk
        out: list[SseEvent] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_EVENT_BYTES:
                    raise EventTooLarge("the event stream sent a line longer than 16 MiB")
                return out
            line = self.buffer[:end].rstrip(b"\r").decode("utf-8", "replace")
            del self.buffer[: end + 1]
            event = self._line(line)
            if event is not None:
                out.append(event)

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            self.last_id = self.id_buffer
            if not self.data:
                self.event = ""
                return None
            event = SseEvent(self.event or "message", "\n".join(self.data), self.last_id, self.retry)
            self.data, self.event = [], ""
            return event
        if line.startswith(":"):
            return None  # a comment: the server's heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "id" and "\0" not in value:
            self.id_buffer = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None
