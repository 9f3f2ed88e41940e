"""Clips through the HTTP API, as a user gets them: submit with options.clips, read results, fetch files.

The download (real yt-dlp over loopback HLS, Twitch-like master playlist) and the clips stage are
the shipped ones. The analysis between them is pinned by a small stage that writes a known
transcript and known highlights, so the test can check every clip against exact expectations
without depending on what the highlight detector picks.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import opentimelineio as otio
import pysubs2
import pytest
import webvtt

from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from klipstream.server import create_app
from klipstream.stages.clips import CLIPS
from klipstream.stages.download import DOWNLOAD
from tests.clip_checks import inspect_clip, source_frame_at
from tests.media_fixtures import (
    MediaServer,
    media_server,
    read_mono,
    write_audio,
    write_counter_video,
    write_hls,
    write_master,
)

__all__ = ["media_server"]

FPS = 30
HIGHLIGHTS = [
    {"rank": 1, "start_time": 2.5, "end_time": 6.3, "peak_time": 4.0, "reason": "loud moment", "score": 0.9},
    {"rank": 2, "start_time": 7.2, "end_time": 10.4, "peak_time": 9.0, "reason": "chat burst", "score": 0.7},
]
WORDS = [
    (2.6, 2.9, " no"),
    (3.0, 3.3, " way"),
    (3.4, 3.9, " that"),
    (4.0, 4.4, " worked."),
    (8.0, 8.3, " gg"),
    (8.4, 8.9, " everyone"),
]


async def _pinned_analysis(ctx: StageContext) -> None:
    """Stands in for transcription and highlight detection with fixed, known results."""
    words = [{"start": s, "end": e, "word": w, "probability": 0.9} for s, e, w in WORDS]
    transcript = {"language": "en", "segments": [{"id": 0, "start": 2.6, "end": 8.9, "text": "", "words": words}]}
    ctx.output_path("transcript_json").write_text(json.dumps(transcript))
    ctx.output_path("highlights_json").write_text(json.dumps({"highlights": HIGHLIGHTS}))
    ctx.add_artifact("transcript_json")
    ctx.add_artifact("highlights_json")
    ctx.set_highlights(HIGHLIGHTS)


PINNED = Stage(
    "analysis",
    DisplayStage.ANALYZING,
    _pinned_analysis,
    needs=("media",),
    provides=("transcript_json", "highlights_json"),
    resource=Resource.CPU,
)
PIPELINE = [DOWNLOAD, PINNED, CLIPS]


def twitch_like(server: MediaServer, tmp: Path, seconds: float, **video: Any) -> tuple[str, Path]:
    """A master playlist with an audio-only rendition and a muxed counter-video rendition."""
    source = write_counter_video(tmp / "video.ts", seconds, **video)
    write_hls(server.root, write_audio(tmp / "audio.ts", seconds), segments=3, name="audio.m3u8")
    write_hls(server.root, source, segments=4, name="video.m3u8")
    write_master(server.root, "audio.m3u8", "video.m3u8", height=video.get("height", 180))
    return server.url("master.m3u8"), source


async def wait_for(client: Any, job_id: str, check: Any, timeout: float = 60.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            job = await (await client.get(f"/api/v1/analysis/{job_id}")).json()
            if check(job):
                return job
            await asyncio.sleep(0.05)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def _seconds(clock: str) -> float:
    """A WebVTT timestamp (webvtt-py's *_in_seconds properties drop the milliseconds)."""
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


async def fetch(client: Any, url: str, dest: Path) -> Path:
    resp = await client.get(url)
    assert resp.status == 200, url
    await asyncio.to_thread(dest.write_bytes, await resp.read())
    return dest


async def test_clips_from_a_twitch_like_vod(
    media_server: MediaServer, make_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    url, source = twitch_like(media_server, tmp_path, 12.0)
    client = await make_client(make_settings(), PIPELINE)
    options = {
        "clips": {
            "vertical": True,
            "vertical_height": 640,
            "facecam": {"x": 0.7, "y": 0.6, "width": 0.3, "height": 0.4},
        }
    }
    resp = await client.post("/api/v1/analysis", json={"url": url, "options": options})
    assert resp.status == 202, await resp.text()
    job = await wait_for(client, (await resp.json())["job_id"], finished)
    assert job["status"] == "completed", job
    assert job["options"]["include_video"] is True  # clips imply the video rendition
    results = job["results"]
    for key in ("clips_json", "captions_srt", "captions_vtt", "edit_otio", "edit_edl", "edit_fcpxml", "video"):
        assert key in results, key
    for n in (1, 2):
        for family in ("clip", "vertical", "thumbnail", "clip_srt", "clip_vtt"):
            assert f"{family}_{n}" in results, f"{family}_{n}"
    clips_stage = next(s for s in job["stages"] if s["name"] == "clips")
    assert clips_stage["status"] == "completed" and clips_stage["message"] == "2 clips with vertical versions"

    manifest = await (await client.get(results["clips_json"])).json()
    for n, highlight in enumerate(HIGHLIGHTS, 1):
        start, end = highlight["start_time"], highlight["end_time"]
        clip = inspect_clip(await fetch(client, results[f"clip_{n}"], tmp_path / f"clip_{n}.mp4"))
        first = source_frame_at(source, start)
        assert clip.counters[0] == first, "the first frame is the requested one"
        assert clip.counters == list(range(first, first + len(clip.counters)))
        assert abs(clip.duration - (end - start)) <= 1 / FPS + 1e-3
        assert clip.sync_errors and max(abs(e) for e in clip.sync_errors) < 0.040
        assert clip.moov_before_mdat
        vertical = inspect_clip(await fetch(client, results[f"vertical_{n}"], tmp_path / f"vertical_{n}.mp4"))
        assert (vertical.width, vertical.height) == (360, 640)
        assert abs(vertical.duration - clip.duration) <= 1 / FPS + 1e-3

        # per-clip captions: cue times are the words' times relative to the clip's first frame
        clip_start = manifest["clips"][n - 1]["start_time"]
        said = [(s - clip_start, e - clip_start) for s, e, _ in WORDS if start <= (s + e) / 2 < end]
        srt = pysubs2.load(str(await fetch(client, results[f"clip_srt_{n}"], tmp_path / f"c{n}.srt")))
        vtt = webvtt.read(str(await fetch(client, results[f"clip_vtt_{n}"], tmp_path / f"c{n}.vtt")))
        assert abs(srt[0].start / 1000 - said[0][0]) < 0.1 and abs(srt[-1].end / 1000 - said[-1][1]) < 0.1
        assert abs(_seconds(vtt.captions[0].start) - said[0][0]) < 0.1
        assert abs(_seconds(vtt.captions[-1].end) - said[-1][1]) < 0.1

    # whole-VOD captions use VOD time
    vod = pysubs2.load(str(await fetch(client, results["captions_srt"], tmp_path / "all.srt")))
    assert abs(vod[0].start / 1000 - WORDS[0][0]) < 0.1 and "no way that worked." in vod[0].plaintext

    # edit lists read back with the same ranges
    edl = otio.adapters.read_from_file(
        str(await fetch(client, results["edit_edl"], tmp_path / "e.edl")), adapter_name="cmx_3600", rate=FPS
    )
    fcp = otio.adapters.read_from_file(str(await fetch(client, results["edit_fcpxml"], tmp_path / "e.xml")))
    for edit in (edl, fcp):
        ranges = [c.source_range for c in edit.find_clips()]
        assert len(ranges) == 2
        for got, entry in zip(ranges, manifest["clips"], strict=True):
            assert abs(got.start_time.to_seconds() - entry["start_time"]) <= 1 / FPS
            assert abs(got.end_time_exclusive().to_seconds() - entry["end_time"]) <= 1 / FPS


async def test_audio_only_source_completes_with_a_warning(
    media_server: MediaServer, make_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    write_audio(media_server.root / "talk.m4a", 6.0, container="mp4")
    client = await make_client(make_settings(), PIPELINE)
    resp = await client.post("/api/v1/analysis", json={"url": media_server.url("talk.m4a"), "options": {"clips": True}})
    job = await wait_for(client, (await resp.json())["job_id"], finished)
    assert job["status"] == "completed", job
    clips_stage = next(s for s in job["stages"] if s["name"] == "clips")
    assert clips_stage["status"] == "unavailable"
    assert any("no clips were made" in w and "audio only" in w for w in job["warnings"]), job["warnings"]
    assert not any(key.startswith(("clip", "vertical", "edit_")) for key in job["results"])


async def test_clips_are_skipped_unless_asked_for(
    media_server: MediaServer, make_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    url, _ = twitch_like(media_server, tmp_path, 4.0)
    client = await make_client(make_settings(), PIPELINE)
    resp = await client.post("/api/v1/analysis", json={"url": url})
    job = await wait_for(client, (await resp.json())["job_id"], finished)
    assert job["status"] == "completed"
    clips_stage = next(s for s in job["stages"] if s["name"] == "clips")
    assert clips_stage["status"] == "skipped" and clips_stage["message"] == "not requested for this job"
    assert "video" not in job["results"] and job["warnings"] == []


async def test_bad_clip_options_are_a_422(make_client: Any, make_settings: Any) -> None:
    client = await make_client(make_settings(), PIPELINE)
    for clips in ({"fill": "stretch"}, {"facecam": {"x": 0.9, "y": 0, "width": 0.5, "height": 0.5}}, {"height": 5}):
        resp = await client.post(
            "/api/v1/analysis", json={"url": "https://example.com/v.mp4", "options": {"clips": clips}}
        )
        assert resp.status == 422, clips


def _workers_of(directory: Path) -> list[int]:
    """Live clip worker and ffmpeg processes whose command line names files under `directory`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        ours = str(directory) in cmdline or cwd == str(directory)  # ffmpeg runs in the job directory
        if state != "Z" and ("klipstream.clips.worker" in cmdline or "ffmpeg" in cmdline) and ours:
            pids.append(int(entry.name))
    return pids


async def test_cancel_stops_the_clip_processes_within_two_seconds(
    media_server: MediaServer, make_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    url, _ = twitch_like(media_server, tmp_path, 16.0, width=480, height=270, gop=60)
    settings = make_settings(clip_preset="medium")
    client = await make_client(settings, [DOWNLOAD, _long_highlights_stage(), CLIPS])
    resp = await client.post("/api/v1/analysis", json={"url": url, "options": {"clips": {"vertical": True}}})
    job_id = (await resp.json())["job_id"]

    def clipping(job: dict[str, Any]) -> bool:
        stage = next(s for s in job["stages"] if s["name"] == "clips")
        return finished(job) or (stage["status"] == "running" and stage["progress"] > 0.05)

    job = await wait_for(client, job_id, clipping)
    assert job["status"] == "running", job
    jobs_dir = settings.jobs_dir / job_id
    async with asyncio.timeout(10):  # the worker, and soon its ffmpeg for the first vertical version
        while len(_workers_of(jobs_dir)) < 2:
            await asyncio.sleep(0.05)
    started = time.monotonic()
    assert (await client.delete(f"/api/v1/analysis/{job_id}")).status in (200, 202)
    job = await wait_for(client, job_id, finished, timeout=5.0)
    assert job["status"] == "cancelled"
    assert time.monotonic() - started < 2.0
    assert _workers_of(jobs_dir) == []
    leftovers = [p.name for p in jobs_dir.iterdir()] if jobs_dir.exists() else []
    made_by_clips = ("_clip_", "_vertical_", "_thumbnail_", ".ass", "_clips", "_highlights.otio")
    assert not any(part in name for name in leftovers for part in made_by_clips), leftovers


def _long_highlights_stage() -> Stage:
    async def run(ctx: StageContext) -> None:
        spans = [{"rank": i + 1, "start_time": 1.0 + 7 * i, "end_time": 7.5 + 7 * i} for i in range(2)]
        ctx.output_path("highlights_json").write_text(json.dumps({"highlights": spans}))
        ctx.add_artifact("highlights_json")

    return Stage("analysis", DisplayStage.ANALYZING, run, needs=("media",), provides=("highlights_json",))


SPEECH = Path(__file__).resolve().parent / "fixtures" / "speech" / "speech.ogg"


@pytest.mark.slow
async def test_the_shipped_pipeline_cuts_captioned_clips(
    media_server: MediaServer, aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    """Real transcription and highlight detection on speech, then clips with captions from its words."""
    speech = read_mono(SPEECH)
    seconds = speech.size / 48_000
    write_counter_video(media_server.root / "talk.mp4", seconds, sound=speech)
    client = await aiohttp_client(create_app(make_settings()))
    body = {"url": media_server.url("talk.mp4"), "options": {"clips": {"vertical": True, "vertical_height": 640}}}
    resp = await client.post("/api/v1/analysis", json=body)
    job = await wait_for(client, (await resp.json())["job_id"], finished, timeout=300)
    assert job["status"] == "completed", job
    assert job["highlights"], "the detector found moments in the speech"
    results = job["results"]
    for h in job["highlights"]:
        assert {f"clip_{h['rank']}", f"vertical_{h['rank']}", f"thumbnail_{h['rank']}"} <= set(results)
    manifest = await (await client.get(results["clips_json"])).json()
    assert sum(c["words"] for c in manifest["clips"]) > 0
    vod = pysubs2.load(str(await fetch(client, results["captions_srt"], tmp_path / "all.srt")))
    assert len(vod) >= 3
