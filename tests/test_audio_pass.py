"""The single audio pass and the audio stage, on small media made with PyAV."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from klipstream.acquisition.audio_pass import (
    HOP_SAMPLES,
    AudioPassOutputs,
    FeatureFrames,
    PassCancelled,
    WaveformSummary,
    run_audio_pass,
)
from klipstream.errors import InvalidVideoUrl, VideoTooLong
from klipstream.stages.audio import AUDIO
from tests.media_fixtures import tone, write_audio, write_av
from tests.stage_helpers import make_context


async def _run_stage(media: Path, workdir: Path, **settings):  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as http:
        ctx, sink = make_context(AUDIO, workdir, http, inputs={"media": media}, **settings)
        await AUDIO.run(ctx)
    return ctx, sink


def _outputs(directory: Path) -> AudioPassOutputs:
    return AudioPassOutputs(
        directory / "a.pcm", directory / "a.mp3", directory / "a_waveform.json", directory / "a_features.npz"
    )


async def test_stage_writes_all_four_artifacts(tmp_path: Path) -> None:
    media = write_audio(tmp_path / "vod.ts", 4.0)
    ctx, sink = await _run_stage(media, tmp_path / "job")
    assert set(ctx.outputs) == {"pcm", "audio", "waveform", "features"}
    assert ctx.outputs["audio"].name == f"audio_{ctx.video_id}.mp3"
    assert ctx.outputs["waveform"].name == f"audio_{ctx.video_id}_waveform.json"

    pcm = np.fromfile(ctx.outputs["pcm"], dtype="<i2")
    assert pcm.size == pytest.approx(4.0 * 16000, rel=0.01)
    assert np.abs(pcm).max() > 10000  # the tone is there at about -6 dBFS

    waveform = json.loads(ctx.outputs["waveform"].read_text())
    assert len(waveform) == 20000
    assert min(waveform) >= 0.0 and max(waveform) == 1.0
    # The tone swells and fades once a second: loud at 0.25 s, quiet at 0.75 s.
    per_second = 20000 / 4.0

    def around(t: float) -> float:  # one waveform point is only 3.2 samples here: average 0.1 s
        return float(np.mean(waveform[int((t - 0.05) * per_second) : int((t + 0.05) * per_second)]))

    assert around(1.25) > 4 * around(1.75)

    features = np.load(ctx.outputs["features"])
    frames = features["loudness_dbfs"].size
    assert frames == pytest.approx(4.0 / 0.05, abs=2)
    assert features["centroid_hz"].size == frames and features["flux"].size == frames
    assert all(features[k].dtype == np.float32 for k in ("loudness_dbfs", "centroid_hz", "flux"))
    assert float(features["hop_seconds"]) == 0.05 and int(features["sample_rate"]) == 16000
    assert float(features["duration_seconds"]) == pytest.approx(pcm.size / 16000)
    loud = features["loudness_dbfs"]
    assert loud[int(1.25 / 0.05)] > loud[int(1.75 / 0.05)] + 6
    assert abs(float(np.median(features["centroid_hz"][5:-5])) - 440) < 80

    with av.open(str(ctx.outputs["audio"])) as played:
        stream = played.streams.audio[0]
        assert stream.codec_context.name in ("mp3", "mp3float") and stream.channels == 1
        decoded = sum(frame.samples for frame in played.decode(stream)) / stream.sample_rate
    assert decoded == pytest.approx(4.0, abs=0.15)

    assert sink.progress[-1][1] == 1.0
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == sorted(p.name for p in ctx.outputs.values())


async def test_silent_media_gives_valid_flat_outputs(tmp_path: Path) -> None:
    media = write_audio(tmp_path / "silent.m4a", 2.0, container="mp4", silent=True)
    ctx, _ = await _run_stage(media, tmp_path / "job")
    waveform = json.loads(ctx.outputs["waveform"].read_text())
    assert len(waveform) == 20000 and set(waveform) == {0.0}
    features = np.load(ctx.outputs["features"])
    assert float(features["loudness_dbfs"].max()) <= -100
    assert not np.isnan(features["centroid_hz"]).any() and not np.isnan(features["flux"]).any()


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda d: write_av(d / "mute.mp4", 1.0, audio=False), "no_audio_track"),
        (lambda d: _write(d / "page.media", b"<!doctype html><html><body>Sign in</body></html>" * 20), "not_media"),
        (lambda d: _truncate(write_audio(d / "cut.m4a", 3.0, container="mp4"), 0.5), "not_media"),
        (lambda d: _write(d / "empty.media", b""), "not_media"),
    ],
    ids=["no-audio-track", "html", "truncated-mp4", "empty"],
)
async def test_bad_media_is_classified_and_leaves_nothing(tmp_path: Path, make, code: str) -> None:  # type: ignore[no-untyped-def]
    media = make(tmp_path)
    with pytest.raises(InvalidVideoUrl) as err:
        await _run_stage(media, tmp_path / "job")
    assert err.value.code == code
    assert list((tmp_path / "job").iterdir()) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


async def test_truncated_transport_stream_decodes_what_is_there(tmp_path: Path) -> None:
    media = _truncate(write_audio(tmp_path / "cut.ts", 4.0), 0.5)
    ctx, _ = await _run_stage(media, tmp_path / "job")
    pcm_seconds = ctx.outputs["pcm"].stat().st_size / 32000
    assert 1.0 < pcm_seconds < 3.0


async def test_timestamp_gaps_are_filled_with_silence(tmp_path: Path) -> None:
    path = tmp_path / "gap.ts"
    rate = 48_000
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        signal = tone(2.0, rate)
        for start in range(0, signal.size, 4800):
            frame = av.AudioFrame.from_ndarray(signal[None, start : start + 4800], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start if start < rate else start + 2 * rate  # a 2 s hole after the first second
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    ctx, sink = await _run_stage(path, tmp_path / "job")
    pcm = np.fromfile(ctx.outputs["pcm"], dtype="<i2")
    assert pcm.size / 16000 == pytest.approx(4.0, abs=0.1)
    assert np.abs(pcm[int(1.5 * 16000) : int(2.5 * 16000)]).max() == 0  # the hole is silence
    assert any("skipped" in w for w in sink.warnings)


async def test_too_long_media_is_refused(tmp_path: Path) -> None:
    media = write_audio(tmp_path / "vod.ts", 3.0)
    with pytest.raises(VideoTooLong):
        await _run_stage(media, tmp_path / "job", max_video_seconds=1.0)
    assert list((tmp_path / "job").iterdir()) == []


def test_cancel_stops_the_pass_and_removes_outputs(tmp_path: Path) -> None:
    media = write_audio(tmp_path / "vod.ts", 30.0)
    cancelled = threading.Event()
    seen: list[float] = []

    def progress(seconds: float, fraction: float) -> None:
        seen.append(seconds)
        cancelled.set()  # as the stage context does when the job is cancelled

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PassCancelled):
        run_audio_pass(media, _outputs(out), cancelled=cancelled, progress=progress)
    assert seen and seen[-1] < 30.0
    assert list(out.iterdir()) == []


async def test_stage_cancel_returns_promptly(tmp_path: Path) -> None:
    media = write_audio(tmp_path / "vod.ts", 30.0)
    async with aiohttp.ClientSession() as http:
        ctx, _ = make_context(AUDIO, tmp_path / "job", http, inputs={"media": media})
        task = asyncio.create_task(AUDIO.run(ctx))
        for _ in range(2000):  # until the pass has started writing
            if any(p.name.endswith(".part") for p in (tmp_path / "job").iterdir()):
                break
            await asyncio.sleep(0.002)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 2.0
    assert ctx.cancelled.is_set()
    assert list((tmp_path / "job").iterdir()) == []  # the thread noticed and removed its partial files


def test_waveform_fold_matches_exact_block_means() -> None:
    rng = np.random.default_rng(7)
    points, block = 50, 64
    samples = (rng.standard_normal(points * block) * 3000).astype(np.int16)
    summary = WaveformSummary(capacity=64)  # forces several halvings
    position = 0
    while position < samples.size:  # irregular chunks, as decoded batches are
        step = int(rng.integers(1, 300))
        summary.add(samples[position : position + step])
        position += step
    exact = np.abs(samples.astype(np.float64)).reshape(points, block).mean(axis=1)
    np.testing.assert_allclose(summary.fold(points), exact / exact.max(), rtol=1e-5)


def test_waveform_fold_of_short_and_empty_input() -> None:
    summary = WaveformSummary()
    assert summary.fold(10).tolist() == [0.0] * 10
    summary.add(np.array([0, 0, 1000, 1000], dtype=np.int16))
    folded = summary.fold(4)
    assert folded.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_features_do_not_depend_on_batch_boundaries() -> None:
    signal = (tone(1.03, 16000) * 20000).astype(np.int16)
    whole = FeatureFrames()
    whole.add(signal)
    pieces = FeatureFrames()
    for start in range(0, signal.size, 333):
        pieces.add(signal[start : start + 333])
    a, b = whole.finish(), pieces.finish()
    assert a["loudness_dbfs"].size == -(-signal.size // HOP_SAMPLES)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4)
