"""The job event stream as a real browser sees it: headless Chromium's own `EventSource`.

The page is served by the app itself (same origin, as the frontend would be behind one host) and
reaches the server through a small TCP proxy the test controls, so the reconnect case can cut the
browser's connection mid-job the way a flaky network or a load balancer would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from klipstream.api.context import BROADCASTER
from klipstream.api.openapi import Route
from klipstream.config import Settings
from klipstream.server import create_app
from tests.chromium import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM
from tests.scheduler_stages import Recorder, simple_pipeline

pytestmark = pytest.mark.browser

URL = "https://www.twitch.tv/videos/1122334455"
TERMINAL = ("completed", "failed", "cancelled")

# Collects every named event with its id; closes on the terminal event, as a client should.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sse</title></head><body><script>
window.received = [];
window.opens = 0;
window.errors = 0;
const es = new EventSource(new URLSearchParams(location.search).get("stream"));
es.onopen = () => { window.opens += 1; };
es.onerror = () => { window.errors += 1; };
for (const type of ["snapshot", "stage", "progress", "completed", "failed", "cancelled", "reconnect"]) {
  es.addEventListener(type, (e) => {
    const data = JSON.parse(e.data);
    window.received.push({type: type, id: e.lastEventId, status: data.status});
    if (["completed", "failed", "cancelled"].includes(type)) { es.close(); }
  });
}
</script></body></html>
"""


async def sse_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


class CuttableProxy:
    """Forwards TCP between the browser and the app, records what the browser sends, and can
    cut every connection at once."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent: list[bytes] = []  # browser -> server chunks
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        for browser_side, server_side in list(self._links):
            browser_side.transport.abort()
            server_side.transport.abort()

    def stream_requests(self) -> list[dict[str, str]]:
        """Header maps (lower-cased names) of every stream request the browser made, in order."""
        out = []
        for chunk in self.sent:
            head = chunk.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            lines = head.split("\r\n")
            target = lines[0].split(" ")[1] if lines[0].startswith("GET ") else ""
            if is_stream(target):
                headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
                out.append({k.strip().lower(): v.strip() for k, v in headers.items()})
        return out

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, record=True), self._pipe(up_reader, writer))
        finally:
            self._links.discard(link)
            writer.close()
            up_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool = False) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if record:
                    self.sent.append(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def stack(aiohttp_server: Any, settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start the app with the given test pipeline behind a cuttable proxy."""
    proxies: list[CuttableProxy] = []

    async def start(recorder: Recorder, **gates: bool) -> tuple[Any, CuttableProxy]:
        route = Route("GET", "/test/sse-page", sse_page, "Test page", responses={200: "text/html"})
        app = create_app(settings, stages=simple_pipeline(recorder, **gates), extra_routes=[route])
        server = await aiohttp_server(app)
        proxy = CuttableProxy(server.port)
        await proxy.start()
        proxies.append(proxy)
        return server, proxy

    yield start
    for proxy in proxies:
        await proxy.stop()


async def submit(server: Any) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(server.make_url("/api/v1/analysis"), json={"url": URL}) as resp:
            assert resp.status == 202
            return await resp.json()


async def received(page: Any) -> list[dict[str, Any]]:
    return await page.evaluate("window.received")


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 15) -> None:
    """Poll: the browser's state lives in another process, there is nothing to await on."""
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


async def wait_until_started(recorder: Recorder, stage: str) -> None:
    async def started() -> bool:
        return "start" in recorder.events(stage)

    await wait_for(started)


async def open_page(browser: Any, proxy: CuttableProxy, job: dict[str, Any]) -> tuple[Any, list[Any]]:
    page = await browser.new_page()
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r) if is_stream(r.url) else None)
    await page.goto(f"http://127.0.0.1:{proxy.port}/test/sse-page?stream={job['stream_url']}")
    return page, responses


def is_stream(url: str) -> bool:
    return urlsplit(url).path.endswith("/stream")


def terminal_count(events: list[dict[str, Any]]) -> int:
    return sum(1 for e in events if e["type"] in TERMINAL)


async def test_browser_eventsource_gets_snapshot_stages_and_one_terminal(browser, stack):
    recorder = Recorder()
    server, proxy = await stack(recorder, download=True)
    job = await submit(server)
    page, responses = await open_page(browser, proxy, job)

    async def has_snapshot() -> bool:
        return any(e["type"] == "snapshot" for e in await received(page))

    await wait_for(has_snapshot)
    await wait_until_started(recorder, "download")
    recorder.gate("download").set()

    async def finished() -> bool:
        return terminal_count(await received(page)) > 0

    await wait_for(finished)
    await asyncio.sleep(0.3)  # anything sent after the terminal event would show up now
    events = await received(page)

    assert events[0]["type"] == "snapshot"
    assert [e["type"] for e in events].count("snapshot") == 1
    assert any(e["type"] == "stage" for e in events)
    assert terminal_count(events) == 1
    assert events[-1]["type"] == "completed" and events[-1]["status"] == "completed"
    ids = [int(e["id"]) for e in events[1:]]
    assert ids == sorted(set(ids)), ids
    assert all(i > int(events[0]["id"]) for i in ids)
    assert responses, "the browser never got a response for the stream"
    assert responses[0].headers["content-type"].startswith("text/event-stream")
    assert await page.evaluate("window.opens") == 1


async def test_browser_reconnects_with_last_event_id_and_gets_missed_events(browser, stack):
    recorder = Recorder()
    server, proxy = await stack(recorder, download=True, audio=True)
    job = await submit(server)
    topic = server.app[BROADCASTER].topic(job["job_id"])
    page, _ = await open_page(browser, proxy, job)
    await wait_until_started(recorder, "download")

    async def caught_up() -> bool:
        events = await received(page)
        return bool(events) and int(events[-1]["id"]) == topic.last_id

    await wait_for(caught_up)
    seen_before_cut = (await received(page))[-1]["id"]

    proxy.cut()
    recorder.gate("download").set()  # the job moves on while the browser is away
    await wait_until_started(recorder, "audio")

    async def reconnected() -> bool:
        return len(proxy.stream_requests()) >= 2

    await wait_for(reconnected)
    assert topic.last_id > int(seen_before_cut), "no events were published while the browser was away"
    retry = proxy.stream_requests()[1]
    assert retry.get("last-event-id") == seen_before_cut

    recorder.gate("audio").set()

    async def finished() -> bool:
        return terminal_count(await received(page)) > 0

    await wait_for(finished)
    events = await received(page)

    assert [e["type"] for e in events].count("snapshot") == 1, "the gap was replayed, not re-snapshotted"
    assert terminal_count(events) == 1 and events[-1]["type"] == "completed"
    ids = [int(e["id"]) for e in events]
    assert ids[1:] == list(range(ids[0] + 1, ids[-1] + 1)), f"missing or repeated event ids: {ids}"
    assert await page.evaluate("window.opens") == 2
    assert await page.evaluate("window.errors") >= 1
