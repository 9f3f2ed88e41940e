"""The four transcript files the frontend and the analysis stages read (types: klipstream.transcript).

Files (names come from klipstream/artifacts.py; the columns are the ones the existing frontend reads):
- transcript JSON: `{language, duration, model, segments: [{id, start, end, text, words: [...]}]}`
- words CSV: `start_time,end_time,word` (then `probability`, an extra column the old files lacked)
- paragraphs CSV: `start_time,end_time,text`; a paragraph ends at a pause of at least
  PARAGRAPH_PAUSE seconds or once it has run PARAGRAPH_MAX seconds
- segments CSV: `window_id,start_time,end_time,word_count,speech_rate,text` over 60 s windows every
  30 s. A word belongs to every window that holds at least half of its duration (a zero-length
  word: every window that holds its instant, borders included), so with the 50 % overlap most words appear in two
  windows, which is what the old sliding-window file did. Windows cover the whole audio whether
  or not anyone speaks: silent windows have word_count 0 and empty text, so readers can join
  this file against other per-window data without gaps. After the last full window, one shorter
  tail window starts at the next hop and ends at the audio's end; audio shorter than one window
  gives a single window [0, duration]; zero-length audio gives a header only.
  speech_rate is words per minute of the window's actual length.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from klipstream.transcript import Paragraph, Transcript, Window, Word

PARAGRAPH_PAUSE = 0.8  # seconds of silence that start a new paragraph
PARAGRAPH_MAX = 20.0  # seconds after which a paragraph is closed at the next word
WINDOW_SECONDS = 60.0
HOP_SECONDS = 30.0


def _t(seconds: float) -> float:
    return round(seconds, 3)


def _join(words: Iterable[Word]) -> str:
    return "".join(w.word for w in words).strip()


def paragraphs(words: Iterable[Word]) -> Iterator[Paragraph]:
    current: list[Word] = []
    for word in words:
        if current and (
            word.start - current[-1].end >= PARAGRAPH_PAUSE or word.start - current[0].start >= PARAGRAPH_MAX
        ):
            yield Paragraph(current[0].start, current[-1].end, _join(current))
            current = []
        current.append(word)
    if current:
        yield Paragraph(current[0].start, current[-1].end, _join(current))


def window_bounds(duration: float) -> list[tuple[float, float]]:
    if duration <= 0:
        return []
    if duration <= WINDOW_SECONDS:
        return [(0.0, duration)]
    bounds = []
    start = 0.0
    while start + WINDOW_SECONDS <= duration:
        bounds.append((start, start + WINDOW_SECONDS))
        start += HOP_SECONDS
    last_end = bounds[-1][1]
    if last_end < duration:
        bounds.append((start, duration))
    return bounds


def in_window(word: Word, start: float, end: float) -> bool:
    length = word.end - word.start
    if length <= 0:
        return start <= word.start <= end
    overlap = min(word.end, end) - max(word.start, start)
    return overlap >= length / 2


def windows(words: list[Word], duration: float) -> Iterator[Window]:
    """Sliding windows over `words` (sorted by start). A word can only belong to windows whose
    span touches it, so a moving lower index keeps this linear in the number of words."""
    lo = 0
    for window_id, (start, end) in enumerate(window_bounds(duration)):
        while lo < len(words) and words[lo].end < start:
            lo += 1
        members = []
        i = lo
        while i < len(words) and words[i].start <= end:
            if in_window(words[i], start, end):
                members.append(words[i])
            i += 1
        minutes = (end - start) / 60.0
        rate = len(members) / minutes if minutes > 0 else 0.0
        yield Window(window_id, _t(start), _t(end), len(members), round(rate, 2), _join(members))


def write_transcript_json(path: Path, transcript: Transcript) -> None:
    """Written segment by segment so a long VOD's transcript is never one giant string."""
    with path.open("w", encoding="utf-8") as out:
        head = {"language": transcript.language, "duration": _t(transcript.duration), "model": transcript.model}
        out.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "segments": [')
        for i, seg in enumerate(transcript.segments):
            item = {
                "id": seg.id,
                "start": _t(seg.start),
                "end": _t(seg.end),
                "text": seg.text,
                "words": [
                    {"start": _t(w.start), "end": _t(w.end), "word": w.word, "probability": round(w.probability, 4)}
                    for w in seg.words
                ],
            }
            out.write(("," if i else "") + "\n" + json.dumps(item, ensure_ascii=False))
        out.write("\n]}\n")


def write_words_csv(path: Path, words: Iterable[Word]) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["start_time", "end_time", "word", "probability"])
        for w in words:
            writer.writerow([_t(w.start), _t(w.end), w.word.strip(), round(w.probability, 4)])


def write_paragraphs_csv(path: Path, words: Iterable[Word]) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["start_time", "end_time", "text"])
        for p in paragraphs(words):
            writer.writerow([_t(p.start), _t(p.end), p.text])


def write_segments_csv(path: Path, words: list[Word], duration: float) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["window_id", "start_time", "end_time", "word_count", "speech_rate", "text"])
        for w in windows(words, duration):
            writer.writerow(list(w))


def write_all(
    transcript: Transcript, json_path: Path, words_path: Path, paragraphs_path: Path, segments_path: Path
) -> None:
    words = list(transcript.words())
    write_transcript_json(json_path, transcript)
    write_words_csv(words_path, words)
    write_paragraphs_csv(paragraphs_path, words)
    write_segments_csv(segments_path, words, transcript.duration)
