"""Small media files made with PyAV at test time, and a loopback static server for yt-dlp to fetch.

Nothing is checked in: each test writes the few seconds of audio it needs. HLS playlists are made
the way Twitch serves VODs (MPEG-TS segments with AAC audio, a media playlist, optionally a master
playlist with an audio-only and a video rendition).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest_asyncio
from aiohttp import web

TS_PACKET = 188


def tone(seconds: float, rate: int = 48_000, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """A tone whose loudness rises and falls once a second, so waveform and features have shape."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 1.0 * t)
    return (amplitude * envelope * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_audio(
    path: Path,
    seconds: float,
    *,
    container: str = "mpegts",
    codec: str = "aac",
    rate: int = 48_000,
    silent: bool = False,
    freq: float = 440.0,
) -> Path:
    """Stereo audio in `container` (mpegts, mp4, ipod, ...) encoded with `codec`."""
    signal = np.zeros(int(seconds * rate), np.float32) if silent else tone(seconds, rate, freq)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        _encode_audio(out, stream, signal, rate)
    return path


def _encode_audio(out: av.container.OutputContainer, stream: av.AudioStream, signal: np.ndarray, rate: int) -> None:
    chunk = rate // 10
    for start in range(0, signal.size, chunk):
        part = signal[start : start + chunk]
        frame = av.AudioFrame.from_ndarray(np.stack([part, part * 0.8]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        frame.pts = start
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def write_av(path: Path, seconds: float, *, width: int = 160, height: int = 120, audio: bool = True) -> Path:
    """A small video (H.264) with or without an AAC track, in MPEG-TS (or mp4 by extension)."""
    container = "mp4" if path.suffix == ".mp4" else "mpegts"
    fps = 10
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.options = {"preset": "ultrafast"}
        audio_stream = out.add_stream("aac", rate=48_000, layout="stereo") if audio else None
        for i in range(int(seconds * fps)):
            image = np.full((height, width, 3), (i * 7) % 255, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio_stream is not None:
            _encode_audio(out, audio_stream, tone(seconds), 48_000)
    return path


def write_hls(directory: Path, source_ts: Path, *, segments: int = 3, name: str = "index.m3u8") -> Path:
    """Split an MPEG-TS file into `segments` pieces on packet boundaries and write a VOD playlist.

    Concatenated TS segments are the original stream, which is exactly what an HLS downloader
    produces, so the decoded result can be compared with the source.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data = source_ts.read_bytes()
    packets = len(data) // TS_PACKET
    per_segment = -(-packets // segments)
    with av.open(str(source_ts)) as probe:
        duration = (probe.duration or 0) / av.time_base
    stem = Path(name).stem
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-PLAYLIST-TYPE:VOD", "#EXT-X-MEDIA-SEQUENCE:0"]
    lines.append(f"#EXT-X-TARGETDURATION:{int(duration / segments) + 1}")
    for i in range(segments):
        chunk = data[i * per_segment * TS_PACKET : (i + 1) * per_segment * TS_PACKET]
        if not chunk:
            break
        (directory / f"{stem}-{i}.ts").write_bytes(chunk)
        lines += [f"#EXTINF:{duration / segments:.3f},", f"{stem}-{i}.ts"]
    lines.append("#EXT-X-ENDLIST")
    playlist = directory / name
    playlist.write_text("\n".join(lines) + "\n")
    return playlist


def write_master(directory: Path, audio_playlist: str, video_playlist: str, *, height: int = 120) -> Path:
    """A Twitch-like master playlist: an audio-only rendition and a muxed video rendition."""
    width = height * 4 // 3
    text = "\n".join(
        [
            "#EXTM3U",
            f'#EXT-X-STREAM-INF:BANDWIDTH=400000,RESOLUTION={width}x{height},CODECS="avc1.42c00d,mp4a.40.2"',
            video_playlist,
            '#EXT-X-STREAM-INF:BANDWIDTH=160000,CODECS="mp4a.40.2"',
            audio_playlist,
            "",
        ]
    )
    path = directory / "master.m3u8"
    path.write_text(text)
    return path


_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".m4a": "audio/mp4",
    ".mp4": "video/mp4",
    ".mp3": "audio/mpeg",
    ".html": "text/html; charset=utf-8",
}


@dataclass
class MediaServer:
    """A static file server on 127.0.0.1; files under `root`, optional slow paths."""

    root: Path
    base_url: str = ""
    throttled: dict[str, int] = field(default_factory=dict)  # path -> bytes per second
    requests: list[str] = field(default_factory=list)
    open_streams: int = 0

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


SERVER_KEY = web.AppKey("server", MediaServer)


async def _serve(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER_KEY]
    name = request.match_info["name"]
    server.requests.append(f"{request.method} /{name}")
    path = (server.root / name).resolve()
    if not path.is_relative_to(server.root.resolve()) or not path.is_file():
        raise web.HTTPNotFound()
    content_type = _TYPES.get(path.suffix, "application/octet-stream")
    rate = server.throttled.get(name)
    if rate is None:
        return web.FileResponse(path, headers={"Content-Type": content_type})
    data = path.read_bytes()
    response = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(len(data))})
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    server.open_streams += 1
    try:
        step = max(1, rate // 10)
        for start in range(0, len(data), step):
            await response.write(data[start : start + step])
            await asyncio.sleep(0.1)
    finally:
        server.open_streams -= 1
    return response


@pytest_asyncio.fixture
async def media_server(tmp_path: Path) -> AsyncIterator[MediaServer]:
    root = tmp_path / "www"
    root.mkdir()
    server = MediaServer(root=root)
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_route("*", "/{name:.+}", _serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.base_url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()
