"""The single streaming decode of a job's media into everything later stages read.

Decoding is the expensive part, so it happens once: every decoded frame feeds, in the same pass,
the 16 kHz mono PCM for transcription, the compressed mono playback file, the waveform summary and
the per-frame loudness/spectral features. Nothing grows with the input except files on disk and a
few float32 numbers per 50 ms, so a 12-hour VOD fits in the same memory as a 5-minute clip.

Speed comes from touching Python as little as possible per decoded frame: frames are only copied
into a batch, and resampling, encoding and feature maths run on ~3 s batches at a time.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

from klipstream.errors import InvalidVideoUrl, VideoTooLong

PCM_RATE = 16_000  # what faster-whisper expects
HOP_SECONDS = 0.05  # one feature frame per 50 ms
HOP_SAMPLES = int(PCM_RATE * HOP_SECONDS)
WAVEFORM_POINTS = 20_000  # the existing frontend draws exactly this many
BATCH_SAMPLES = 3 * PCM_RATE  # 16 kHz samples per batch handed to the encoder, features and waveform
MAX_GAP_SECONDS = 600.0  # larger timestamp jumps are broken timestamps, not silence to insert
_PROGRESS_INTERVAL = 0.25  # seconds of wall time between progress callbacks


class PassCancelled(Exception):
    """The job was cancelled while the pass ran; partial outputs have been removed."""


@dataclass(frozen=True)
class PlaybackFormat:
    """How the compressed playback file is encoded."""

    ext: str
    codec: str
    container: str
    bit_rate: int
    options: dict[str, str] = field(default_factory=dict)


# The playback file is encoded from the same 16 kHz mono stream as the PCM: LAME is the slowest part
# of the pass (~300x real time at 16 kHz with its fastest setting, ~240x at 22.05 kHz), and a second
# resampler plus the extra samples of 22.05 kHz would pull the whole pass below 200x real time on one
# core (figures in bench/bench_audio_pass.py). 16 kHz keeps the speech band, which is what a
# highlight reviewer listens for.
MP3 = PlaybackFormat("mp3", "libmp3lame", "mp3", 48_000, {"compression_level": "9"})
OPUS = PlaybackFormat("ogg", "libopus", "ogg", 40_000, {"compression_level": "3"})


def playback_format() -> PlaybackFormat:
    """MP3 when the PyAV build has an MP3 encoder (the frontend expects audio_{id}.mp3), else Ogg/Opus."""
    for fmt in (MP3, OPUS):
        try:
            av.codec.Codec(fmt.codec, "w")
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
        return fmt
    raise RuntimeError("this PyAV build has neither libmp3lame nor libopus")


@dataclass(frozen=True)
class AudioPassOutputs:
    pcm: Path
    audio: Path
    waveform: Path
    features: Path


@dataclass(frozen=True)
class AudioPassResult:
    duration_seconds: float  # of the decoded audio (PCM samples / 16000)
    pcm_samples: int
    declared_seconds: float | None  # what the container claimed, if anything
    warnings: tuple[str, ...]


ProgressCallback = Callable[[float, float], None]  # (decoded_seconds, fraction in [0, 1])


# --------------------------------------------------------------------------------------------------
# Waveform: a bounded summary folded to exactly WAVEFORM_POINTS at the end.
# --------------------------------------------------------------------------------------------------


class WaveformSummary:
    """Sum of |sample| per bin, with bins that double in size whenever the table is full.

    The final block size depends on the total length, which a stream does not know up front; a
    fixed-capacity table of ever-coarser bins keeps memory constant while staying far finer than
    the output (at least capacity/2 bins for any length), so the fold at the end is accurate.
    """

    def __init__(self, capacity: int = 1 << 18) -> None:
        if capacity % 2:
            raise ValueError("capacity must be even")
        self._sums = np.zeros(capacity, dtype=np.float64)
        self._capacity = capacity
        self._count = 0
        self._bin = 1  # samples per bin
        self._carry_sum = 0.0  # a partly filled bin
        self._carry_n = 0
        self.total_samples = 0

    def add(self, samples: np.ndarray) -> None:
        a = np.abs(samples.astype(np.float32))
        self.total_samples += a.size
        pos = 0
        while pos < a.size:
            left = a.size - pos
            if self._carry_n or left < self._bin:
                take = min(self._bin - self._carry_n, left)
                self._carry_sum += float(a[pos : pos + take].sum(dtype=np.float64))
                self._carry_n += take
                pos += take
                if self._carry_n == self._bin:
                    if self._count == self._capacity:
                        self._halve()  # the completed bin is now half of a doubled one: keep filling it
                    else:
                        self._sums[self._count] = self._carry_sum
                        self._count += 1
                        self._carry_sum, self._carry_n = 0.0, 0
                continue
            k = min(left // self._bin, self._capacity - self._count)
            if k == 0:
                self._halve()
                continue
            block = a[pos : pos + k * self._bin].reshape(k, self._bin).sum(axis=1, dtype=np.float64)
            self._sums[self._count : self._count + k] = block
            self._count += k
            pos += k * self._bin

    def _halve(self) -> None:
        # Only called when full, and capacity is even, so bins pair up; a pending partial bin
        # follows all of them and simply becomes part of a larger one.
        pairs = self._count // 2
        self._sums[:pairs] = self._sums[0 : 2 * pairs : 2] + self._sums[1 : 2 * pairs : 2]
        self._sums[pairs:] = 0.0
        self._count = pairs
        self._bin *= 2

    def fold(self, points: int = WAVEFORM_POINTS) -> np.ndarray:
        """Mean |amplitude| per each of `points` equal blocks, divided by the largest; zeros if silent."""
        total = self.total_samples
        if total == 0:
            return np.zeros(points, dtype=np.float32)
        sums = self._sums[: self._count]
        edges = np.arange(self._count + 1, dtype=np.float64) * self._bin
        cumulative = np.concatenate(([0.0], np.cumsum(sums)))
        if self._carry_n:
            edges = np.append(edges, edges[-1] + self._carry_n)
            cumulative = np.append(cumulative, cumulative[-1] + self._carry_sum)
        # Integrate |x| up to each block boundary, assuming uniform amplitude inside a fine bin.
        bounds = np.linspace(0.0, float(total), points + 1)
        at = np.interp(bounds, edges, cumulative)
        means = np.diff(at) / np.diff(bounds)
        peak = float(means.max())
        if peak <= 0:
            return np.zeros(points, dtype=np.float32)
        return np.clip(means / peak, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Features: loudness, spectral centroid and spectral flux per 50 ms frame.
# --------------------------------------------------------------------------------------------------


VOICE_BAND_HZ = (300.0, 3400.0)  # where speech energy is, and most game sound is not
PITCH_HZ = (75.0, 400.0)  # fundamental frequency of adult speech, shouting included
PITCH_RATE = 8_000  # pitch is read from the spectrum below 4 kHz, as if sampled at 8 kHz
VOICED = 0.35  # autocorrelation peak (relative to lag 0) above which a frame is voiced


class FeatureFrames:
    """Per-HOP_SAMPLES frame features of 16 kHz mono int16 audio, computed batch by batch.

    Besides loudness, spectral centroid and flux: the voice-band level and the pitch, the prosody
    of excited or shouted speech (transcripts rarely show it: Whisper writes few capitals or
    exclamation marks). Pitch is the strongest autocorrelation lag in the speech range, taken
    from the frame's power spectrum below 4 kHz (one small inverse FFT per frame); 0 when the
    frame is not voiced.
    """

    def __init__(self) -> None:
        self._window = np.hanning(HOP_SAMPLES).astype(np.float32)
        self._freqs = np.fft.rfftfreq(HOP_SAMPLES, 1.0 / PCM_RATE).astype(np.float32)
        self._voice = (self._freqs >= VOICE_BAND_HZ[0]) & (self._freqs <= VOICE_BAND_HZ[1])
        self._pitch_bins = HOP_SAMPLES * PITCH_RATE // PCM_RATE // 2 + 1  # spectrum bins below 4 kHz
        self._pitch_size = HOP_SAMPLES * PITCH_RATE // PCM_RATE
        self._lags = (int(PITCH_RATE / PITCH_HZ[1]), int(PITCH_RATE / PITCH_HZ[0]))
        # Normalise magnitudes so a full-scale sine peaks near 1 whatever the frame length.
        self._scale = np.float32(2.0 / self._window.sum())
        self._pending = np.zeros(0, dtype=np.float32)
        self._previous: np.ndarray | None = None
        self._loudness: list[np.ndarray] = []
        self._centroid: list[np.ndarray] = []
        self._flux: list[np.ndarray] = []
        self._voice_db: list[np.ndarray] = []
        self._pitch: list[np.ndarray] = []

    def add(self, samples: np.ndarray) -> None:
        x = samples.astype(np.float32) * np.float32(1.0 / 32768.0)
        if self._pending.size:
            x = np.concatenate((self._pending, x))
        n = x.size // HOP_SAMPLES
        if n:
            frames = x[: n * HOP_SAMPLES].reshape(n, HOP_SAMPLES)
            self._frames(frames, np.full(n, HOP_SAMPLES, dtype=np.float32))
        self._pending = x[n * HOP_SAMPLES :].copy()

    def finish(self) -> dict[str, np.ndarray]:
        if self._pending.size:
            # The last partial frame counts: loudness over its real samples, spectrum zero-padded.
            frame = np.zeros((1, HOP_SAMPLES), dtype=np.float32)
            frame[0, : self._pending.size] = self._pending
            self._frames(frame, np.array([self._pending.size], dtype=np.float32))
            self._pending = np.zeros(0, dtype=np.float32)

        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)

        return {
            "loudness_dbfs": joined(self._loudness),
            "centroid_hz": joined(self._centroid),
            "flux": joined(self._flux),
            "voice_dbfs": joined(self._voice_db),
            "pitch_hz": joined(self._pitch),
        }

    def _frames(self, frames: np.ndarray, lengths: np.ndarray) -> None:
        rms = np.sqrt(np.einsum("ij,ij->i", frames, frames) / lengths)
        self._loudness.append((20.0 * np.log10(np.maximum(rms, 1e-6))).astype(np.float32))  # floor -120 dBFS
        mag = np.abs(np.fft.rfft(frames * self._window, axis=1)) * self._scale
        total = mag.sum(axis=1)
        weighted = mag @ self._freqs
        self._centroid.append(np.where(total > 1e-9, weighted / np.maximum(total, 1e-9), 0.0).astype(np.float32))
        previous = self._previous if self._previous is not None else mag[:1]
        diff = np.diff(np.concatenate((previous, mag)), axis=0)
        self._flux.append(np.sqrt((np.maximum(diff, 0.0) ** 2).sum(axis=1)).astype(np.float32))
        self._previous = mag[-1:].copy()
        power = mag * mag
        voice = power[:, self._voice].sum(axis=1)
        self._voice_db.append((10.0 * np.log10(np.maximum(voice, 1e-12))).astype(np.float32))
        autocorr = np.fft.irfft(power[:, : self._pitch_bins], n=self._pitch_size, axis=1)
        low, high = self._lags
        segment = autocorr[:, low : high + 1]
        best = segment.argmax(axis=1)
        peak = segment[np.arange(len(best)), best]
        voiced = peak > VOICED * np.maximum(autocorr[:, 0], 1e-12)
        self._pitch.append(np.where(voiced, PITCH_RATE / (low + best), 0.0).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


class _Downmixer:
    """Decoded frames in, 16 kHz mono s16 in BATCH_SAMPLES-long frames out, through one FFmpeg filter graph.

    Frames are pushed one by one but pulled only every PULL_EVERY pushes: each pull that finds
    nothing raises inside PyAV, and at ~170,000 AAC frames per hour that overhead alone would
    cost more than the resampling.
    """

    PULL_EVERY = 64

    def __init__(self, frame: av.AudioFrame) -> None:
        self.key = _frame_key(frame)
        self.format = frame.format
        self.layout = frame.layout
        self.rate = frame.sample_rate
        self.graph = av.filter.Graph()
        extra = {"time_base": str(frame.time_base)} if frame.time_base is not None else {}
        source = self.graph.add(
            "abuffer",
            sample_rate=str(frame.sample_rate),
            sample_fmt=frame.format.name,
            channel_layout=frame.layout.name,
            **extra,
        )
        convert = self.graph.add("aformat", sample_rates=str(PCM_RATE), sample_fmts="s16p", channel_layouts="mono")
        sink = self.graph.add("abuffersink")
        source.link_to(convert)
        convert.link_to(sink)
        self.graph.configure()
        self.graph.set_audio_frame_size(BATCH_SAMPLES)
        self.pushed = 0

    def push(self, frame: av.AudioFrame) -> list[av.AudioFrame]:
        self.graph.push(frame)
        self.pushed += 1
        return self.pull() if self.pushed % self.PULL_EVERY == 0 else []

    def push_silence(self, seconds: float) -> list[av.AudioFrame]:
        """Feed `seconds` of silence in the source format, a second at a time to bound memory."""
        out: list[av.AudioFrame] = []
        dtype = _DTYPES.get(self.format.name.rstrip("p"))
        if dtype is None or dtype is np.uint8:  # u8 silence is not zero; such media is too rare to bother
            return out
        remaining = round(seconds * self.rate)
        channels = len(self.layout.channels)
        while remaining > 0:
            n = min(remaining, self.rate)
            shape = (channels, n) if self.format.is_planar else (1, n * channels)
            frame = av.AudioFrame.from_ndarray(
                np.zeros(shape, dtype=dtype), format=self.format.name, layout=self.layout.name
            )
            frame.sample_rate = self.rate
            self.graph.push(frame)
            out.extend(self.pull())
            remaining -= n
        return out

    def pull(self) -> list[av.AudioFrame]:
        out: list[av.AudioFrame] = []
        while True:
            try:
                out.append(self.graph.pull())  # type: ignore[arg-type]  # an audio graph yields audio frames
            except (av.error.BlockingIOError, EOFError):
                return out

    def drain(self) -> list[av.AudioFrame]:
        self.graph.push(None)
        return self.pull()


def _frame_key(frame: av.AudioFrame) -> tuple[str, str, int]:
    return (frame.format.name, frame.layout.name, frame.sample_rate)


_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32, "dbl": np.float64}


class _Writers:
    """The pass's outputs, written under `.part` names and renamed only when complete."""

    def __init__(self, outputs: AudioPassOutputs, fmt: PlaybackFormat) -> None:
        self.outputs = outputs
        self.parts = {p: p.with_name(p.name + ".part") for p in (outputs.pcm, outputs.audio, outputs.waveform)}
        self.pcm = open(self.parts[outputs.pcm], "wb", buffering=1 << 20)
        self.playback = av.open(str(self.parts[outputs.audio]), "w", format=fmt.container)
        self.stream: av.AudioStream = self.playback.add_stream(fmt.codec, rate=PCM_RATE, layout="mono")  # type: ignore[assignment]
        self.stream.bit_rate = fmt.bit_rate
        self.stream.codec_context.options = dict(fmt.options)
        self._closed = False

    def encode(self, frame: av.AudioFrame | None) -> None:
        for packet in self.stream.encode(frame):
            self.playback.mux(packet)

    def commit(self, waveform: np.ndarray, features: dict[str, Any]) -> None:
        self.encode(None)
        self.close()
        with open(self.parts[self.outputs.waveform], "w") as fh:
            json.dump([round(float(v), 4) for v in waveform], fh, separators=(",", ":"))
        features_part = self.outputs.features.with_name(self.outputs.features.name + ".part.npz")
        self.parts[self.outputs.features] = features_part
        np.savez_compressed(features_part, **features)  # type: ignore[arg-type]
        for final, part in self.parts.items():
            part.replace(final)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pcm.close()
        self.playback.close()

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        for part in self.parts.values():
            part.unlink(missing_ok=True)


def _open(source: Path) -> av.container.InputContainer:
    try:
        return av.open(str(source), "r", timeout=30.0)
    except av.error.FileNotFoundError:
        raise InvalidVideoUrl("The downloaded media file is missing.", code="media_missing") from None
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise InvalidVideoUrl(
            "The URL did not lead to playable media (the file is not audio or video, or is damaged).",
            code="not_media",
            suggested_action="Check that the link plays in a browser and points at a video, not a web page.",
        ) from exc


def _declared_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _decoded_frames(
    container: av.container.InputContainer, stream: av.AudioStream, warnings: list[str], cancelled: threading.Event
) -> Iterator[av.AudioFrame]:
    """Every decodable frame; damaged packets are skipped, a damaged tail ends the stream with a warning."""
    good = bad = 0
    packets = container.demux(stream)
    while True:
        if cancelled.is_set():
            raise PassCancelled()
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as exc:
            if good == 0:
                raise InvalidVideoUrl(
                    "The media could not be read: it is damaged or not audio.", code="corrupt_media"
                ) from exc
            warnings.append("The media ended in damaged data; analysis covers the part before it.")
            break
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            bad += 1
            if bad > 50 and bad > good // 10:
                raise InvalidVideoUrl(
                    "Too much of the audio track is damaged to analyse.", code="corrupt_media"
                ) from None
            continue
        good += 1
        yield from frames  # type: ignore[misc]
    with contextlib.suppress(av.error.FFmpegError):
        yield from stream.decode(None)  # type: ignore[misc]
    if bad:
        warnings.append(f"{bad} damaged audio packets were skipped.")


def run_audio_pass(
    source: Path,
    outputs: AudioPassOutputs,
    *,
    cancelled: threading.Event,
    progress: ProgressCallback | None = None,
    expected_seconds: float | None = None,
    max_seconds: float | None = None,
    playback: PlaybackFormat | None = None,
) -> AudioPassResult:
    """Decode `source` once and write the four outputs; blocking, meant for a worker thread.

    Raises InvalidVideoUrl for media that has no decodable audio, VideoTooLong past `max_seconds`,
    PassCancelled when `cancelled` is set. On any failure no output (not even a partial one) is left.
    """
    fmt = playback or playback_format()
    container = _open(source)
    writers: _Writers | None = None
    try:
        if not container.streams.audio:
            raise InvalidVideoUrl(
                "The media has no audio track, so there is nothing to analyse.",
                code="no_audio_track",
                suggested_action="Submit a VOD or file that has sound.",
            )
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        if max_seconds is not None and declared is not None and declared > max_seconds:
            raise VideoTooLong(f"The media lasts {declared / 3600:.1f} h, over the {max_seconds / 3600:.1f} h limit.")
        total = expected_seconds or declared
        writers = _Writers(outputs, fmt)
        result = _decode_into(container, stream, writers, cancelled, progress, total, max_seconds)
        return AudioPassResult(
            duration_seconds=result[0], pcm_samples=result[1], declared_seconds=declared, warnings=result[2]
        )
    except BaseException:
        if writers is not None:
            writers.discard()
        raise
    finally:
        container.close()


def _decode_into(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    writers: _Writers,
    cancelled: threading.Event,
    progress: ProgressCallback | None,
    total_seconds: float | None,
    max_seconds: float | None,
) -> tuple[float, int, tuple[str, ...]]:
    warnings: list[str] = []
    waveform = WaveformSummary()
    features = FeatureFrames()
    mixer: _Downmixer | None = None  # bound to one input format; rebuilt if HLS switches renditions
    pcm_samples = 0
    source_seconds = 0.0  # audio pushed into the mixer so far, inserted silence included
    time_base = float(stream.time_base) if stream.time_base is not None else None
    start_time: float | None = None
    inserted_gaps = 0.0
    last_report = 0.0

    def take(frames: list[av.AudioFrame]) -> None:
        nonlocal pcm_samples, last_report
        for out in frames:
            writers.encode(out)  # the playback file is encoded from the same 16 kHz stream
            pcm = out.to_ndarray().reshape(-1)
            writers.pcm.write(pcm.astype("<i2", copy=False).tobytes())
            waveform.add(pcm)
            features.add(pcm)
            pcm_samples += pcm.size
        if not frames:
            return
        seconds = pcm_samples / PCM_RATE
        if max_seconds is not None and seconds > max_seconds:
            raise VideoTooLong(f"The media is longer than the {max_seconds / 3600:.1f} h limit.")
        now = time.monotonic()
        if progress is not None and now - last_report >= _PROGRESS_INTERVAL:
            last_report = now
            progress(seconds, min(1.0, seconds / total_seconds) if total_seconds else 0.0)

    for frame in _decoded_frames(container, stream, warnings, cancelled):
        if mixer is None or mixer.key != _frame_key(frame):
            if mixer is not None:
                take(mixer.drain())
            mixer = _Downmixer(frame)
        # HLS media can skip time (missing segments); insert the silence so every later timestamp
        # still matches the VOD's clock.
        if frame.pts is not None and time_base is not None:
            at = frame.pts * time_base
            if start_time is None:
                start_time = at
            gap = (at - start_time) - source_seconds
            if 0.25 < gap <= MAX_GAP_SECONDS:
                take(mixer.push_silence(gap))
                source_seconds += gap
                inserted_gaps += gap
        take(mixer.push(frame))
        source_seconds += frame.samples / frame.sample_rate
    if mixer is not None:
        take(mixer.drain())
    if cancelled.is_set():
        raise PassCancelled()
    if pcm_samples == 0:
        raise InvalidVideoUrl("No audio could be decoded from the media.", code="no_audio_decoded")
    if inserted_gaps:
        warnings.append(f"The audio skipped {inserted_gaps:.1f} s in total; the gaps were filled with silence.")
    duration = pcm_samples / PCM_RATE
    if total_seconds and total_seconds - duration > max(2.0, 0.05 * total_seconds):
        warnings.append(
            f"Only {duration:.0f} s of audio could be decoded of the {total_seconds:.0f} s announced; "
            "the media looks truncated."
        )
    writers.commit(
        waveform.fold(),
        {
            "hop_seconds": np.float64(HOP_SECONDS),
            "duration_seconds": np.float64(duration),
            "sample_rate": np.int64(PCM_RATE),
            **features.finish(),
        },
    )
    if progress is not None:
        progress(duration, 1.0)
    return duration, pcm_samples, tuple(warnings)
