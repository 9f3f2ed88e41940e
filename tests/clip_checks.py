"""Reading a cut clip back: which frames it holds, how long it is, and whether sound and picture agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from tests.media_fixtures import beep_onsets, read_counter


@dataclass(frozen=True)
class ClipFacts:
    counters: list[int]  # the frame number burned into each decoded frame, in display order
    first_time: float  # presentation time of the first frame
    fps: float
    width: int
    height: int
    duration: float  # container duration
    sync_errors: list[float]  # seconds each beep is off from the frame it belongs to
    moov_before_mdat: bool


def source_frame_at(path: Path, vod_seconds: float, fps: int = 30) -> int:
    """The source frame nearest to VOD time `vod_seconds` (VOD time 0 is the audio's start)."""
    with av.open(str(path)) as container:
        audio = container.streams.audio[0] if container.streams.audio else None
        origin = float(audio.start_time * audio.time_base) if audio is not None else 0.0
        first = next(iter(container.decode(video=0)))
        v0 = float(first.time)
    return round((origin + vod_seconds - v0) * fps)


def inspect_clip(path: Path, fps: int = 30) -> ClipFacts:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        counters, first_time = [], None
        for frame in container.decode(stream):
            if first_time is None:
                first_time = float(frame.time)
            counters.append(read_counter(frame.to_ndarray(format="gray")))
        width, height = stream.codec_context.width, stream.codec_context.height
        duration = container.duration / av.time_base
    assert first_time is not None
    errors: list[float] = []
    with av.open(str(path)) as container:
        if container.streams.audio:
            astream = container.streams.audio[0]
            chunks, t0 = [], None
            for frame in container.decode(astream):
                if t0 is None:
                    t0 = float(frame.time)
                chunks.append(frame.to_ndarray()[0])
            samples = np.concatenate(chunks)
            for onset in beep_onsets(samples, astream.rate):
                at = (t0 or 0.0) + onset
                # beep k starts with source frame k*fps; that frame is shown at first_time + offset
                k = round(at - first_time + counters[0] / fps)
                errors.append(at - (first_time + (k * fps - counters[0]) / fps))
    data = path.read_bytes()
    return ClipFacts(
        counters=counters,
        first_time=first_time,
        fps=fps,
        width=width,
        height=height,
        duration=duration,
        sync_errors=errors,
        moov_before_mdat=0 <= data.find(b"moov") < data.find(b"mdat"),
    )
