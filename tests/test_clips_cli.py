"""`klipstream analyze --clips` on a local video file: the clips are cut and the CLI says where."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from klipstream import cli
from klipstream.cli import local as local_run
from klipstream.server import create_app
from tests.clip_checks import inspect_clip
from tests.media_fixtures import write_counter_video
from tests.test_clips_api import HIGHLIGHTS, PIPELINE


@pytest.fixture(autouse=True)
def _pinned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_run, "default_stages", lambda: PIPELINE)
    for name in list(os.environ):
        if name.startswith("KLIPSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_analyze_with_clips_prints_where_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_counter_video(tmp_path / "stream.mp4", 12.0)
    out = tmp_path / "out"
    assert cli.main(["analyze", str(source), "--out", str(out), "--clips", "--vertical", "--fill", "crop"]) == 0
    text = capsys.readouterr().out
    assert "Clips" in text
    for n in range(1, len(HIGHLIGHTS) + 1):
        for family in ("clip", "vertical", "thumbnail"):
            produced = next(out.glob(f"*_{family}_{n:03d}.*"))
            assert f"out/{produced.name}" in text, produced.name  # where each file is, one per line
    vertical = inspect_clip(next(out.glob("*_vertical_001.mp4")))
    assert (vertical.width, vertical.height) == (1080, 1920)
    assert next(out.glob("*_highlights.edl")).is_file() and next(out.glob("*_highlights.xml")).is_file()


def test_analyze_json_lists_each_clip_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_counter_video(tmp_path / "stream.ts", 12.0)
    assert cli.main(["analyze", str(source), "--out", str(tmp_path / "o"), "--clips", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["options"]["clips"] == {
        "vertical": False,
        "fill": "blur",
        "facecam": None,
        "captions": True,
        "height": None,
        "vertical_height": None,
    }
    assert Path(job["results"]["clip_1"]).is_file() and Path(job["results"]["clip_srt_2"]).is_file()
    assert "vertical_1" not in job["results"]


async def test_submit_with_clips_then_watch_prints_the_clip_urls(
    aiohttp_server: Any, make_settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await aiohttp_server(create_app(make_settings(allow_local_files=True), stages=PIPELINE))
    base = f"http://127.0.0.1:{server.port}"
    source = write_counter_video(tmp_path / "stream.ts", 12.0)
    argv = ["submit", str(source), "--clips", "--vertical", "--watch", "--server", base]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "Clips" in out
    for n in range(1, len(HIGHLIGHTS) + 1):
        assert f"_clip_{n:03d}.mp4" in out and f"_vertical_{n:03d}.mp4" in out
