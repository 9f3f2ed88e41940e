"""The web page in a real headless Chromium (Debian's, driven by Playwright; no browser download).

The page submits a generated WAV served over loopback, follows the job's event stream to the end
and renders the waveform, highlights, transcript and artifacts. The server runs the test-only
pipeline from tests/test_cli.py (real work on the WAV) until the shipped pipeline is complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from klipstream.server import create_app
from tests.chromium import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM
from tests.test_cli import demo_pipeline, make_wav

pytestmark = pytest.mark.browser

WEB_DIR = Path(__file__).resolve().parent.parent / "klipstream" / "web"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SPEECH = Path(__file__).resolve().parent / "fixtures" / "speech" / "speech.ogg"


# --- fixtures ---------------------------------------------------------------------------------------
async def media_server(aiohttp_server: Any, directory: Path) -> str:
    app = web.Application()
    app.router.add_static("/media", directory)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/media"


@pytest.fixture
async def browser() -> Any:
    if not HAVE_CHROMIUM:
        pytest.skip("Debian's chromium is not installed")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


def watch_page(page: Any, allowed_hosts: set[str]) -> list[str]:
    """Collect script errors and any request leaving this machine."""
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)

    def on_request(request: Any) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in allowed_hosts:
            problems.append(f"external request: {request.url}")

    page.on("request", on_request)
    return problems


CANVAS_INK = """() => {
  const c = document.getElementById('waveform');
  if (!c.width) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) ink++;
  return ink / (c.width * c.height);
}"""


# --- tests ------------------------------------------------------------------------------------------
async def test_page_submits_follows_and_renders_results(aiohttp_server, make_settings, browser, tmp_path):
    make_wav(tmp_path / "stream.wav", seconds=8.0, bursts=(2.0, 5.5))
    media = await media_server(aiohttp_server, tmp_path)
    settings = make_settings(allow_local_files=True, api_keys=("page-key",), admin_token="admin-secret")
    server = await aiohttp_server(create_app(settings, stages=demo_pipeline()))
    base = f"http://127.0.0.1:{server.port}"
    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
    problems = watch_page(page, {"127.0.0.1"})
    response = await page.goto(base + "/")
    assert response.status == 200
    assert "Content-Security-Policy" in response.headers or "content-security-policy" in response.headers
    # without the API key the list cannot load, and the page says what to do
    await page.wait_for_function("document.getElementById('jobs-message').textContent.includes('API key')")
    problems.clear()  # the 401 above is logged by the browser as a failed resource; expected
    await page.click("#access summary")
    await page.fill("#api-key", "page-key")
    await page.fill("#admin-token", "admin-secret")
    await page.click("#access-form button[type=submit]")
    await page.wait_for_selector("#admin:not([hidden]) .stat")
    assert await page.locator("#admin-stats .stat").count() == 6
    assert await page.evaluate("sessionStorage.getItem('klipstream.apiKey')") == "page-key"

    await page.fill("#vod-url", f"{media}/stream.wav")
    await page.click("#submit-button")
    await page.wait_for_selector("#job-badge.completed", timeout=30_000)
    assert await page.get_attribute("#overall-bar", "aria-valuenow") == "100"
    stages = page.locator("#stages .stage")
    assert await stages.count() == 4
    assert await page.locator('#stages .stage[data-status="completed"]').count() == 4

    rows = page.locator("#highlights tbody tr")
    await rows.first.wait_for()
    assert await rows.count() == 3
    times = [await rows.nth(i).locator("td.time").inner_text() for i in range(3)]
    assert "00:00:02–00:00:03" in times
    await page.wait_for_function(f"({CANVAS_INK})() > 0.02", timeout=10_000)
    # the planted highlights are marked: the columns at 2-3 s are tinted even where the wave is thin
    marked = await page.evaluate("""() => {
      const c = document.getElementById('waveform');
      const x = Math.round(c.width * 2.5 / 8);
      const px = c.getContext('2d').getImageData(x, 2, 1, 1).data;
      return px[3];
    }""")
    assert marked > 0

    await page.fill("#transcript-search", "insane")
    await page.wait_for_selector("#transcript mark")
    assert await page.locator("#transcript mark").count() == 1
    assert "1 match" in await page.inner_text("#transcript-count")
    links = page.locator("#artifacts a")
    assert await links.count() == 4
    href = await links.first.get_attribute("href")
    assert href and href.startswith("/files/")

    await rows.nth(0).click()
    start = float((await rows.nth(0).locator("td.time").inner_text())[6:8])
    await page.wait_for_function(f"document.getElementById('player').currentTime >= {start}", timeout=10_000)
    assert await page.locator("#highlights tr.playing").count() == 1

    await page.wait_for_selector("#jobs .badge.completed")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web_page.png"), full_page=True)
    await page.emulate_media(color_scheme="dark")
    await page.screenshot(path=str(ARTIFACTS / "web_page_dark.png"), full_page=True)
    assert problems == []


async def test_page_with_the_real_pipeline(aiohttp_server, make_settings, browser, tmp_path):
    """The shipped pipeline end to end through the page: a 31 s speech clip served over loopback."""
    shutil.copyfile(SPEECH, tmp_path / "speech.ogg")
    media = await media_server(aiohttp_server, tmp_path)
    server = await aiohttp_server(create_app(make_settings()))
    base = f"http://127.0.0.1:{server.port}"
    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
    problems = watch_page(page, {"127.0.0.1"})
    await page.goto(base + "/")
    await page.fill("#vod-url", f"{media}/speech.ogg")
    await page.click("#submit-button")
    await page.wait_for_selector("#job-badge.completed", timeout=50_000)
    assert await page.locator("#stages .stage").count() == 7
    assert await page.locator("#highlights tbody tr").count() >= 1
    await page.wait_for_function(f"({CANVAS_INK})() > 0.02", timeout=10_000)
    await page.fill("#transcript-search", "boss")
    await page.wait_for_selector("#transcript mark")
    assert await page.locator("#transcript mark").count() >= 1
    assert await page.locator("#artifacts a").count() >= 8
    assert await page.locator("#job-warnings li").count() >= 1  # no chat for a non-Twitch source, said so
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web_page_real.png"), full_page=True)
    assert problems == []


async def test_failed_job_shows_error_and_retries(aiohttp_server, make_settings, browser, tmp_path):
    (tmp_path / "broken.wav").write_text("not audio at all")
    media = await media_server(aiohttp_server, tmp_path)
    server = await aiohttp_server(create_app(make_settings(), stages=demo_pipeline()))
    base = f"http://127.0.0.1:{server.port}"
    page = await browser.new_page(viewport={"width": 420, "height": 900})  # phone-sized: one column
    problems = watch_page(page, {"127.0.0.1"})
    await page.goto(base + "/")
    await page.fill("#vod-url", f"{media}/broken.wav")
    await page.click("#submit-button")
    await page.wait_for_selector("#job-badge.failed", timeout=30_000)
    assert "not a WAV file" in await page.inner_text("#error-message")
    assert (await page.inner_text("#error-action")).strip()
    assert await page.is_visible("#retry-button")
    job_id = (await page.evaluate("location.hash")).removeprefix("#job=")
    await page.click("#retry-button")
    await page.wait_for_selector("#job-badge.failed", timeout=30_000)
    resp = await page.request.get(f"{base}/api/v1/analysis/{job_id}")
    assert (await resp.json())["retry_count"] == 1
    assert await page.is_hidden("#admin")  # no admin token entered
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web_page_failed_mobile.png"), full_page=True)
    assert problems == []


async def test_page_routes_refuse_other_files(aiohttp_server, make_settings):
    server = await aiohttp_server(create_app(make_settings(), stages=demo_pipeline()))
    client_base = f"http://127.0.0.1:{server.port}"
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            async with session.get(f"{client_base}/static/{name}") as resp:
                assert resp.status == 200 and kind in resp.headers["Content-Type"]
        for bad in ("../server.py", "%2e%2e%2fserver.py", "missing.js"):
            async with session.get(f"{client_base}/static/{bad}") as resp:
                assert resp.status == 404
        async with session.get(client_base + "/") as resp:
            text = await resp.text()
            assert resp.status == 200 and "<title>KlipStream Analysis</title>" in text
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing loaded from elsewhere
