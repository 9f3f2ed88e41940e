"""Find speech with the Silero VAD that faster-whisper bundles and cut the audio into chunks at silences.

Where the VAD runs: Silero needs faster_whisper (and onnxruntime), which the server process must
never import, so `speech_probabilities` is called only inside the transcription worker processes,
as ordinary pool tasks. The audio is split into VAD blocks of BLOCK_SECONDS so a long VOD's VAD
runs on every worker at once and never holds more than one block in memory. Each block returns
one speech probability per 32 ms frame (a few hundred KB for an hour); the planning below is
plain numpy on those probabilities and runs in the server process (in a thread).

Planning follows faster-whisper's own VAD rules (threshold 0.5, silence below 0.35 for 2 s ends
a speech region, 0.4 s of padding), so a chunk's audio is the same speech a plain
`WhisperModel.transcribe(vad_filter=True)` would decode. Regions are then packed into chunks of at
most `chunk_seconds` of speech; the silences between regions are dropped, as faster-whisper does.
A region longer than a chunk is cut at its quietest point (lowest smoothed speech probability)
in the second half of the allowed length, i.e. in a pause between words, never inside one. Cut
pieces share their border sample, so every sample of speech is decoded exactly once: no word is
lost or duplicated at chunk borders.

The Silero recurrent state restarts at each block border; it settles within a few frames, and
only the probabilities of those frames can differ from a single pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
BYTES_PER_SAMPLE = 2  # signed 16-bit little-endian mono
FRAME = 512  # samples per Silero frame (32 ms)
BLOCK_SECONDS = 300  # VAD block per pool task
BLOCK_SAMPLES = BLOCK_SECONDS * SAMPLE_RATE  # a multiple of FRAME, so blocks' frames line up
SMOOTH_FRAMES = 7  # ~0.22 s moving average when looking for the quietest cut point


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5  # speech starts at or above this probability
    neg_threshold: float = 0.35  # speech ends only below this
    min_silence_seconds: float = 2.0  # a pause this long ends a region
    pad_seconds: float = 0.4  # kept around each region


@dataclass(frozen=True)
class Chunk:
    """One pool task: speech pieces (sample ranges in VOD time), decoded as one concatenated clip."""

    index: int
    pieces: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.pieces[0][0]

    @property
    def end(self) -> int:
        return self.pieces[-1][1]

    @property
    def speech_samples(self) -> int:
        return sum(e - s for s, e in self.pieces)

    @property
    def speech_seconds(self) -> float:
        return self.speech_samples / SAMPLE_RATE


def sample_count(pcm_path: Path) -> int:
    return pcm_path.stat().st_size // BYTES_PER_SAMPLE


def read_samples(pcm_path: Path | str, start: int, end: int) -> np.ndarray:
    """Samples [start, end) as float32 in [-1, 1), read through a memory map (never the whole file)."""
    if end <= start:
        return np.zeros(0, dtype=np.float32)
    raw = np.memmap(pcm_path, dtype="<i2", mode="r", offset=start * BYTES_PER_SAMPLE, shape=(end - start,))
    out = raw.astype(np.float32)
    out *= 1.0 / 32768.0
    del raw
    return out


def vad_blocks(total_samples: int) -> list[tuple[int, int]]:
    return [(s, min(total_samples, s + BLOCK_SAMPLES)) for s in range(0, total_samples, BLOCK_SAMPLES)]


def speech_probabilities(pcm_path: Path | str, start: int, end: int) -> np.ndarray:
    """Per-frame speech probability of samples [start, end). Worker processes only (imports faster_whisper)."""
    from faster_whisper.vad import get_vad_model  # heavy: keep out of the server process

    audio = read_samples(pcm_path, start, end)
    if audio.size == 0:
        return np.zeros(0, dtype=np.float32)
    audio = np.pad(audio, (0, (-audio.size) % FRAME))
    probs = get_vad_model()(audio)
    return np.asarray(probs, dtype=np.float32).reshape(-1)


def speech_regions(probs: np.ndarray, params: VadParams = VadParams()) -> list[tuple[int, int]]:
    """[start, end) frame ranges of speech, with hysteresis between the two thresholds."""
    min_silence = max(1, round(params.min_silence_seconds * SAMPLE_RATE / FRAME))
    regions: list[tuple[int, int]] = []
    start = -1  # frame where the current region began; -1 when outside speech
    silence = -1  # frame where the current pause inside a region began
    for i, p in enumerate(probs.tolist()):
        if p >= params.threshold:
            if start < 0:
                start = i
            silence = -1
        elif start >= 0 and p < params.neg_threshold:
            if silence < 0:
                silence = i
            if i + 1 - silence >= min_silence:
                regions.append((start, silence))
                start = silence = -1
    if start >= 0:
        regions.append((start, silence if silence >= 0 else len(probs)))
    return regions


def _quietest(probs: np.ndarray, lo: int, hi: int) -> int:
    """Frame boundary in [lo, hi) at the middle of the quietest stretch."""
    window = probs[max(0, lo - SMOOTH_FRAMES) : hi + SMOOTH_FRAMES]
    smooth = np.convolve(window, np.ones(SMOOTH_FRAMES) / SMOOTH_FRAMES, mode="same")
    offset = lo - max(0, lo - SMOOTH_FRAMES)
    inner = smooth[offset : offset + (hi - lo)]
    return lo + int(np.argmin(inner))


def split_long(probs: np.ndarray, region: tuple[int, int], max_frames: int) -> list[tuple[int, int]]:
    start, end = region
    parts = []
    while end - start > max_frames:
        cut = _quietest(probs, start + max_frames // 2, start + max_frames)
        parts.append((start, cut))
        start = cut
    parts.append((start, end))
    return parts


def plan_chunks(
    probs: np.ndarray, total_samples: int, chunk_seconds: float, params: VadParams = VadParams()
) -> list[Chunk]:
    """Chunks of at most `chunk_seconds` of speech, in VOD order, cut only in silence."""
    pad = round(params.pad_seconds * SAMPLE_RATE)
    max_samples = max(int(chunk_seconds * SAMPLE_RATE), 4 * FRAME + 2 * pad)
    max_frames = max(2, (max_samples - 2 * pad) // FRAME)
    regions = speech_regions(probs, params)

    # Padded sample ranges per region; a gap narrower than two pads is shared at its middle.
    padded: list[tuple[int, int]] = []
    for i, (s, e) in enumerate(regions):
        lo = s * FRAME - pad
        hi = min(total_samples, e * FRAME) + pad
        if i > 0:
            gap = s * FRAME - regions[i - 1][1] * FRAME
            lo = s * FRAME - min(pad, gap // 2)
        if i + 1 < len(regions):
            gap = regions[i + 1][0] * FRAME - e * FRAME
            hi = e * FRAME + min(pad, gap - gap // 2)
        padded.append((max(0, lo), min(total_samples, hi)))

    pieces: list[tuple[int, int]] = []
    for (s, e), (lo, hi) in zip(regions, padded, strict=True):
        parts = split_long(probs, (s, e), max_frames)
        for j, (ps, pe) in enumerate(parts):
            a = lo if j == 0 else ps * FRAME
            b = hi if j == len(parts) - 1 else pe * FRAME
            if b > a:
                pieces.append((a, b))

    chunks: list[Chunk] = []
    current: list[tuple[int, int]] = []
    size = 0
    for piece in pieces:
        length = piece[1] - piece[0]
        if current and size + length > max_samples:
            chunks.append(Chunk(len(chunks), tuple(current)))
            current, size = [], 0
        current.append(piece)
        size += length
    if current:
        chunks.append(Chunk(len(chunks), tuple(current)))
    return chunks
