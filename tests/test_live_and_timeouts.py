"""Live streams are refused as such, and a download past its time budget is not retried (issue 13, item 6)."""

from __future__ import annotations

from pathlib import Path

from klipstream.stages.download import DOWNLOAD
from tests.media_fixtures import MediaServer, media_server, write_audio, write_hls
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_api_basics import wait_status

__all__ = ["media_server"]  # the fixture is used by name


async def test_twitch_channel_url_is_refused_at_submission(make_client, settings):
    client = await make_client(settings, simple_pipeline(Recorder()))
    for url in ("https://www.twitch.tv/somestreamer", "https://twitch.tv/somestreamer/live"):
        resp = await client.post("/api/v1/analysis", json={"url": url})
        assert resp.status == 422, url
        body = await resp.json()
        assert "finished VODs" in body["detail"] and body["errors"][0]["field"] == "url"
    # VODs and clips of the same channel are fine
    for url in ("https://www.twitch.tv/videos/2345678901", "https://clips.twitch.tv/SomeClipSlug"):
        assert (await client.post("/api/v1/analysis", json={"url": url})).status == 202, url


async def test_live_hls_stream_fails_at_once_as_invalid_url(
    make_client, settings, media_server: MediaServer, tmp_path: Path
):
    source = write_audio(tmp_path / "live.ts", 4.0)
    playlist = write_hls(media_server.root, source, segments=4, name="live.m3u8")
    playlist.write_text(playlist.read_text().replace("#EXT-X-ENDLIST\n", "").replace("#EXT-X-PLAYLIST-TYPE:VOD\n", ""))
    client = await make_client(settings, [DOWNLOAD])
    resp = await client.post("/api/v1/analysis", json={"url": media_server.url("live.m3u8")})
    assert resp.status == 202
    job = await wait_status(client, (await resp.json())["job_id"], {"failed", "completed"}, timeout=60)
    assert job["status"] == "failed"
    assert job["error"]["error_type"] == "invalid_video_url" and job["error"]["error_code"] == "live_stream"
    assert "finished VODs" in job["error"]["message"] and not job["error"]["is_retryable"]
    assert job["stages"][0]["attempts"] == 1
    assert not [r for r in media_server.requests if r.endswith(".ts")]  # no segment was fetched


async def test_download_past_its_time_limit_is_not_retried(
    make_client, make_settings, media_server: MediaServer, tmp_path: Path
):
    write_audio(media_server.root / "slow.m4a", 20.0, container="mp4")
    media_server.throttled["slow.m4a"] = 20_000  # bytes per second: far too slow for the limit
    settings = make_settings(stage_timeout_seconds=4.0, stage_retries=2)
    client = await make_client(settings, [DOWNLOAD])
    resp = await client.post("/api/v1/analysis", json={"url": media_server.url("slow.m4a")})
    job = await wait_status(client, (await resp.json())["job_id"], {"failed", "completed"}, timeout=60)
    assert job["status"] == "failed"
    assert job["error"]["error_type"] == "processing_timeout" and not job["error"]["is_retryable"]
    assert job["stages"][0]["attempts"] == 1  # a timed-out transfer is not started over
