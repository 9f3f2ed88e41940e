"""The web page's clips in real headless Chromium: ask for clips, then play, download and caption them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from klipstream.server import create_app
from tests.media_fixtures import MediaServer, media_server
from tests.test_clips_api import HIGHLIGHTS, PIPELINE, twitch_like
from tests.test_web_page import ARTIFACTS, browser, watch_page

pytestmark = pytest.mark.browser
__all__ = ["browser", "media_server"]


async def test_highlight_rows_offer_their_clips(
    aiohttp_server: Any, make_settings: Any, browser: Any, media_server: MediaServer, tmp_path: Path
) -> None:
    url, _ = twitch_like(media_server, tmp_path, 12.0)
    server = await aiohttp_server(create_app(make_settings(), stages=PIPELINE))
    base = f"http://127.0.0.1:{server.port}"
    page = await browser.new_page(viewport={"width": 1280, "height": 1100})
    problems = watch_page(page, {"127.0.0.1"})
    await page.goto(base + "/")
    assert await page.is_disabled("#want-vertical")
    await page.fill("#vod-url", url)
    await page.check("#want-clips")
    await page.check("#want-vertical")
    await page.click("#submit-button")
    await page.wait_for_selector("#job-badge.completed", timeout=60_000)

    rows = page.locator("#highlights tbody tr")
    assert await rows.count() == len(HIGHLIGHTS)
    assert await page.is_visible("#clip-col")
    for n in range(1, len(HIGHLIGHTS) + 1):
        row = rows.nth(n - 1)
        assert await row.get_by_role("button", name=f"Play clip {n}").count() == 1
        for label in (f"Download clip {n}", f"Download vertical clip {n}", f"Download captions of clip {n} (SRT)"):
            href = await row.get_by_role("link", name=label).get_attribute("href")
            assert href and href.startswith("/files/"), label
            assert (await page.request.get(base + href)).ok
    # per-highlight files are on the rows, not repeated in the artifact list
    artifact_names = await page.locator("#artifacts a").all_inner_texts()
    assert "clip 1" not in artifact_names and "edit edl" in artifact_names

    await rows.nth(0).get_by_role("button", name="Play clip 1").click()
    assert await page.is_visible("#clip-view")
    player = page.locator("#clip-player")
    async with asyncio.timeout(15):
        while not await player.evaluate("v => v.currentTime > 0.3 && v.videoWidth === 320"):
            await asyncio.sleep(0.1)
    assert await page.locator("#player").evaluate("p => p.paused")  # the page's audio player stops
    assert await page.locator("#clip-player track").count() == 1  # the clip's WebVTT captions
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web_page_clips.png"), full_page=True)
    await page.click("#clip-close")
    assert await page.is_hidden("#clip-view")
    assert await page.locator("#stages .stage").count() == 3
    assert problems == []


async def test_stage_not_asked_for_is_not_shown(
    aiohttp_server: Any, make_settings: Any, browser: Any, media_server: MediaServer, tmp_path: Path
) -> None:
    url, _ = twitch_like(media_server, tmp_path, 4.0)
    server = await aiohttp_server(create_app(make_settings(), stages=PIPELINE))
    page = await browser.new_page()
    problems = watch_page(page, {"127.0.0.1"})
    await page.goto(f"http://127.0.0.1:{server.port}/")
    await page.fill("#vod-url", url)
    await page.click("#submit-button")
    await page.wait_for_selector("#job-badge.completed", timeout=60_000)
    assert await page.locator("#stages .stage").count() == 2  # download and analysis; clips not asked for
    assert await page.is_hidden("#clip-col")
    assert problems == []
