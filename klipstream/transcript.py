"""A transcript as plain data: words, segments, 60 s windows, and reading them back from files.

The types mirror faster-whisper's own Word and Segment but are plain NamedTuples of this package,
so the server process can hold and pickle them without importing faster_whisper (the model only
ever lives in worker processes), and the analysis reads the transcript artifact into the same
types the transcription wrote it from. All times are seconds from the start of the VOD.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class Word(NamedTuple):
    start: float
    end: float
    word: str  # as the model spells it, usually with a leading space
    probability: float


class Segment(NamedTuple):
    id: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...]


@dataclass(frozen=True)
class Transcript:
    language: str | None  # None when nothing was spoken and no language was requested
    duration: float  # seconds of audio, speech or not
    model: str
    segments: list[Segment]

    def words(self) -> Iterator[Word]:
        for segment in self.segments:
            yield from segment.words


class Paragraph(NamedTuple):
    start: float
    end: float
    text: str


class Window(NamedTuple):
    window_id: int
    start: float
    end: float
    word_count: int
    speech_rate: float  # words per minute
    text: str


class TranscriptFormatError(ValueError):
    """A transcript file lacks what the transcription stage writes."""


def load_segments(path: Path) -> list[Segment]:
    """The segments of a transcript JSON, in time order; a transcript of silence is an empty list."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = []
    for i, seg in enumerate(data.get("segments") or []):
        try:
            words = tuple(
                Word(float(w["start"]), float(w["end"]), str(w["word"]), float(w.get("probability") or 0.0))
                for w in seg.get("words") or []
            )
            out.append(
                Segment(
                    int(seg.get("id", i)),
                    float(seg["start"]),
                    float(seg["end"]),
                    str(seg.get("text") or "").strip(),
                    words,
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    out.sort(key=lambda s: s.start)
    return out


def load_windows(path: Path) -> list[Window]:
    """The 60 s windows of a segments CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"start_time", "end_time", "word_count", "speech_rate", "text"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise TranscriptFormatError(f"segments CSV needs the columns {sorted(needed)}")
        out = []
        for i, row in enumerate(reader):
            try:
                window_id = int(row.get("window_id") or i)
                start, end = float(row["start_time"]), float(row["end_time"])
                words = int(float(row["word_count"] or 0))
                rate = float(row["speech_rate"] or 0.0)
            except ValueError:
                raise TranscriptFormatError(f"segments CSV line {reader.line_num} has a non-numeric field") from None
            out.append(Window(window_id, start, end, words, rate, (row["text"] or "").strip()))
    return out
