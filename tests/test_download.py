"""The download stage against real yt-dlp and a loopback static server."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import aiohttp
import av
import pytest
from yt_dlp.networking import Response
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import DownloadError, ExtractorError, GeoRestrictedError, UnsupportedError

from klipstream.acquisition import media as media_fetch
from klipstream.acquisition.media import DownloadProgress, classify_ytdlp_error, parse_progress
from klipstream.errors import InvalidVideoUrl, NetworkError, VideoNotFound, VideoTooLong, VideoUnavailable
from klipstream.stages.download import DOWNLOAD, local_media_path, summarise
from tests.media_fixtures import MediaServer, media_server, write_audio, write_av, write_hls, write_master
from tests.stage_helpers import make_context

__all__ = ["media_server"]  # the fixture is used by name


async def _run(url: str, workdir: Path, **kwargs):  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as http:
        ctx, sink = make_context(DOWNLOAD, workdir, http, url=url, **kwargs)
        await DOWNLOAD.run(ctx)
    return ctx, sink


async def test_hls_playlist_is_downloaded_whole(media_server: MediaServer, tmp_path: Path) -> None:
    source = write_audio(tmp_path / "vod.ts", 4.0)
    write_hls(media_server.root, source, segments=4)
    ctx, sink = await _run(media_server.url("index.m3u8"), tmp_path / "job")

    media = ctx.outputs["media"]
    assert media.parent == tmp_path / "job" and media.name.startswith(f"source_{ctx.video_id}.")
    assert media.read_bytes() == source.read_bytes()  # the fragments, concatenated in order
    assert sink.video is not None and sink.video.extractor
    assert sink.progress and sink.progress[-1][1] == 1.0
    assert all(0.0 <= fraction <= 1.0 for _, fraction, _ in sink.progress)
    assert any(detail and "fragment" in detail for _, _, detail in sink.progress)
    assert sum(r.endswith(".ts") for r in media_server.requests) == 4
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [media.name]  # no leftovers


async def test_direct_file_is_downloaded(media_server: MediaServer, tmp_path: Path) -> None:
    source = write_audio(media_server.root / "clip.m4a", 3.0, container="mp4")
    ctx, sink = await _run(media_server.url("clip.m4a"), tmp_path / "job")
    assert ctx.outputs["media"].read_bytes() == source.read_bytes()
    assert ctx.outputs["media"].suffix == ".m4a"
    assert sink.video is not None and sink.video.title == "clip"
    assert "video" not in ctx.outputs


async def test_include_video_fetches_both_renditions(media_server: MediaServer, tmp_path: Path) -> None:
    audio = write_audio(tmp_path / "audio.ts", 3.0)
    video = write_av(tmp_path / "video.ts", 3.0)
    write_hls(media_server.root, audio, segments=2, name="audio.m3u8")
    write_hls(media_server.root, video, segments=2, name="video.m3u8")
    write_master(media_server.root, "audio.m3u8", "video.m3u8")
    ctx, _ = await _run(
        media_server.url("master.m3u8"), tmp_path / "job", options={"include_video": True, "video_height": 240}
    )
    assert ctx.outputs["media"].read_bytes() == audio.read_bytes()  # the audio-only rendition
    assert ctx.outputs["video"].read_bytes() == video.read_bytes()
    with av.open(str(ctx.outputs["video"])) as container:
        assert container.streams.video


async def test_html_page_is_not_media(media_server: MediaServer, tmp_path: Path) -> None:
    (media_server.root / "page.html").write_text("<html><head><title>Hi</title></head><body>No video</body></html>")
    with pytest.raises(InvalidVideoUrl):
        await _run(media_server.url("page.html"), tmp_path / "job")


async def test_missing_url_is_not_found(media_server: MediaServer, tmp_path: Path) -> None:
    with pytest.raises(VideoNotFound) as err:
        await _run(media_server.url("gone.m3u8"), tmp_path / "job")
    assert "404" in err.value.message


async def test_unreachable_host_is_a_network_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(NetworkError):
        await _run(f"http://127.0.0.1:{port}/vod.m3u8", tmp_path / "job")


async def test_private_address_refused_before_any_request(media_server: MediaServer, tmp_path: Path) -> None:
    write_audio(media_server.root / "clip.ts", 1.0)
    with pytest.raises(InvalidVideoUrl) as err:
        await _run(media_server.url("clip.ts"), tmp_path / "job", allow_private_urls=False)
    assert err.value.code == "private_address"
    assert media_server.requests == []


async def test_resolved_format_hosts_are_checked(tmp_path: Path) -> None:
    urls = ("https://93.184.215.14/a.m3u8", "http://127.0.0.1:9/seg-1.ts")
    with pytest.raises(InvalidVideoUrl) as err:
        await media_fetch.ensure_public_urls(urls, allow_private=False)
    assert err.value.code == "private_address"
    await media_fetch.ensure_public_urls(urls, allow_private=True)


def test_resolution_guard_refuses_private_answers() -> None:
    with media_fetch.public_addresses_only(), pytest.raises(socket.gaierror):
        socket.getaddrinfo("localhost", 80)
    assert socket.getaddrinfo("localhost", 80)  # only inside the guard, only in that thread


async def test_download_child_refuses_private_fragment_hosts(media_server: MediaServer, tmp_path: Path) -> None:
    """A format URL that (re)resolves to a private address is refused by the child itself."""
    source = write_audio(tmp_path / "vod.ts", 2.0)
    write_hls(media_server.root, source, segments=2)
    meta = await asyncio.to_thread(media_fetch.extract_metadata, media_server.url("index.m3u8"), allow_private=True)
    info_json = tmp_path / "info.json"
    info_json.write_text(json.dumps(meta.info))
    args = media_fetch.download_args(info_json, tmp_path / "out", "best", fragments=2, public_only=True)
    with pytest.raises(InvalidVideoUrl) as err:
        await media_fetch.run_download(args, on_progress=lambda p: None, time_limit=60)
    assert err.value.code == "private_address"
    assert not any(r.endswith(".ts") for r in media_server.requests)


async def test_cancel_kills_download_and_removes_partial_files(media_server: MediaServer, tmp_path: Path) -> None:
    write_audio(media_server.root / "big.ts", 20.0)
    media_server.throttled["big.ts"] = 20_000  # bytes per second: would take about a minute
    workdir = tmp_path / "job"
    async with aiohttp.ClientSession() as http:
        ctx, sink = make_context(DOWNLOAD, workdir, http, url=media_server.url("big.ts"))
        task = asyncio.create_task(DOWNLOAD.run(ctx))
        for _ in range(200):
            if any(detail and "MB" in detail and "0.0 MB" not in detail for _, _, detail in sink.progress):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"no download progress was reported: {sink.progress}")
        assert any(p.name.startswith("source_") for p in workdir.iterdir())  # a partial file exists
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 2.0
    assert [p.name for p in workdir.iterdir()] == []
    for _ in range(40):  # the server sees the connection drop
        if media_server.open_streams == 0:
            break
        await asyncio.sleep(0.05)
    assert media_server.open_streams == 0


async def test_local_files_only_when_allowed(tmp_path: Path) -> None:
    source = write_audio(tmp_path / "local.ts", 2.0)
    with pytest.raises(InvalidVideoUrl) as err:
        await _run(str(source), tmp_path / "job")
    assert err.value.code == "local_file_refused"

    ctx, sink = await _run(str(source), tmp_path / "job2", allow_local_files=True)
    assert ctx.outputs["media"].read_bytes() == source.read_bytes()
    assert sink.video is not None and sink.video.duration_seconds == pytest.approx(2.0, abs=0.1)

    with pytest.raises(VideoTooLong):
        await _run(str(source), tmp_path / "job3", allow_local_files=True, max_video_seconds=1.0)
    with pytest.raises(VideoNotFound):
        await _run(str(tmp_path / "nope.ts"), tmp_path / "job4", allow_local_files=True)


def test_local_media_path() -> None:
    assert local_media_path("/data/vod.mp4") == Path("/data/vod.mp4")
    assert local_media_path("file:///data/my%20vod.mp4") == Path("/data/my vod.mp4")
    assert local_media_path("https://www.twitch.tv/videos/123456789") is None


def _http_error(status: int) -> HTTPError:
    import io

    return HTTPError(Response(io.BytesIO(b""), "https://example.com/v", {}, status=status))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (GeoRestrictedError("not in your country"), VideoUnavailable),
        (UnsupportedError("https://example.com/page"), InvalidVideoUrl),
        (ExtractorError("Unable to download webpage", cause=_http_error(404)), VideoNotFound),
        (ExtractorError("Unable to download webpage", cause=_http_error(403)), VideoUnavailable),
        (ExtractorError("Unable to download webpage", cause=_http_error(503)), NetworkError),
        (ExtractorError("Video 123 does not exist", expected=True), VideoNotFound),
        (ExtractorError("You must be logged into an account that has access", expected=True), VideoUnavailable),
        (TransportError("connection reset"), NetworkError),
    ],
)
def test_yt_dlp_errors_are_classified(exc: Exception, expected: type) -> None:
    wrapped = DownloadError(f"ERROR: {exc}", exc_info=(type(exc), exc, None))
    assert type(classify_ytdlp_error(wrapped)) is expected
    assert type(classify_ytdlp_error(exc)) is expected


def test_progress_lines_and_summary() -> None:
    line = "KSPROGRESS downloading 1048576 4194304 NA 524288.0 NA NA"
    progress = parse_progress(line)
    assert progress == DownloadProgress(1048576, 4194304, 524288.0, None, None, False)
    assert progress.fraction == 0.25
    fragments = parse_progress("KSPROGRESS downloading 1000 NA 40000 NA 3 12")
    assert fragments is not None and fragments.total_bytes == 40000 and fragments.fragment_count == 12
    assert parse_progress("[download] 5% of 10MiB") is None

    fraction, detail = summarise([progress, None])
    assert fraction == pytest.approx(0.125)
    assert "0.52 MB/s" in detail
    fraction, _ = summarise([progress, DownloadProgress(1048576, 4194304, None, None, None, False)])
    assert fraction == pytest.approx(0.25)


async def test_metadata_thread_refuses_private_hosts_inside_yt_dlp(media_server: MediaServer) -> None:
    """yt-dlp's own requests (redirects included) cannot reach a private address: resolution refuses."""
    write_audio(media_server.root / "clip.ts", 1.0)
    with pytest.raises(InvalidVideoUrl) as err:
        await asyncio.to_thread(media_fetch.extract_metadata, media_server.url("clip.ts"), allow_private=False)
    assert err.value.code == "private_address"
    assert media_server.requests == []
