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


# --------------------------------------------------------------------------------------------------
# A video whose every frame says which frame it is, and whose audio says where each second starts.
# --------------------------------------------------------------------------------------------------

COUNTER_BITS = 20  # enough for an hour at 60 fps
BEEP_SECONDS = 0.1  # a beep starts exactly on every whole second of the source


def counter_frame(index: int, width: int, height: int) -> np.ndarray:
    """A moving pattern with the frame number burned in as a row of black/white blocks (bit 0 left).

    Blocks survive lossy compression and scaling, so a test can read the number back from a
    decoded frame with `read_counter`.
    """
    y = np.arange(height, dtype=np.int32)[:, None]
    x = np.arange(width, dtype=np.int32)[None, :]
    shift = index * 4
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = ((x + shift) * 255 // max(1, width)) % 256
    image[..., 1] = ((y * 2 + shift) % 256).astype(np.uint8)
    image[..., 2] = (((x // 16 + y // 16 + index) % 2) * 160).astype(np.uint8)
    band = counter_band(height)
    block = width // COUNTER_BITS
    image[:band] = 128
    for bit in range(COUNTER_BITS):
        image[:band, bit * block : (bit + 1) * block] = 255 if (index >> bit) & 1 else 0
    return image


def counter_band(height: int) -> int:
    return max(8, height // 10)


def beep_onsets(samples: np.ndarray, rate: int) -> list[float]:
    """Seconds (from the first sample) where a beep starts: loud 1 ms blocks after ≥ 0.3 s of quiet."""
    block = rate // 1000
    n = samples.size // block
    loud = np.abs(samples[: n * block]).reshape(n, block).max(axis=1) > 0.1
    onsets, quiet = [], 0  # a beep cut at the very start is not an onset
    for i, on in enumerate(loud):
        if on and quiet >= 300:
            # refine inside the block: the first sample above the threshold
            part = np.abs(samples[i * block : (i + 1) * block]) > 0.1
            onsets.append((i * block + int(np.argmax(part))) / rate)
        quiet = 0 if on else quiet + 1
    return onsets


def read_counter(gray: np.ndarray) -> int:
    """The frame number burned into a decoded frame (as a 2-D luma array) by `counter_frame`."""
    height, width = gray.shape
    band = counter_band(height)
    block = width / COUNTER_BITS  # the frame may have been scaled since it was written
    value = 0
    for bit in range(COUNTER_BITS):
        left, right = round((bit + 0.3) * block), round((bit + 0.7) * block)
        cell = gray[band // 4 : max(band // 4 + 1, band * 3 // 4), left : max(left + 1, right)]
        if float(cell.mean()) > 128:
            value |= 1 << bit
    return value


def beeps(seconds: float, rate: int = 48_000) -> np.ndarray:
    """Silence with a 1 kHz beep of BEEP_SECONDS starting exactly at every whole second."""
    t = np.arange(int(seconds * rate)) / rate
    on = (t % 1.0) < BEEP_SECONDS
    return (0.6 * on * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)


def write_counter_video(
    path: Path,
    seconds: float,
    *,
    width: int = 320,
    height: int = 180,
    fps: int = 30,
    gop: int = 30,
    bframes: int = 2,
    audio: bool = True,
    audio_codec: str = "aac",
    sound: np.ndarray | None = None,
) -> Path:
    """H.264 (closed GOPs of `gop` frames, B-frames like a streaming encoder) plus AAC beeps
    (or `sound`: mono float samples at 48 kHz).

    MPEG-TS unless the name ends in .mp4, like Twitch's HLS renditions.
    """
    container = "mp4" if path.suffix == ".mp4" else "mpegts"
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.options = {
            "preset": "ultrafast" if bframes == 0 else "superfast",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:open-gop=0",
        }
        audio_stream = out.add_stream(audio_codec, rate=48_000, layout="stereo") if audio else None
        rate = 48_000
        signal = (sound if sound is not None else beeps(seconds, rate)) if audio else np.zeros(0, np.float32)
        chunk = rate // fps
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(counter_frame(i, width, height), format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
            if audio_stream is not None:
                part = signal[i * chunk : (i + 1) * chunk]
                if part.size:
                    planes = np.stack([part, part])
                    if audio_codec == "mp2":  # MP2 takes interleaved 16-bit samples
                        pcm = (planes.T.reshape(1, -1) * 32767).astype(np.int16)
                        aframe = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
                    else:
                        aframe = av.AudioFrame.from_ndarray(planes, format="fltp", layout="stereo")
                    aframe.sample_rate = rate
                    aframe.pts = i * chunk
                    for packet in audio_stream.encode(aframe):
                        out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio_stream is not None:
            for packet in audio_stream.encode(None):
                out.mux(packet)
    return path


def read_mono(path: Path, rate: int = 48_000) -> np.ndarray:
    """A sound file as mono float32 samples at `rate`."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)
