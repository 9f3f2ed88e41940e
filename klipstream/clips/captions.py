"""Captions from word timings: cues with sensible line breaks, as SRT, WebVTT and burned-in ASS.

A cue starts at its first word and ends at its last, so what a viewer reads matches what is said
to the word. Cues break at sentence ends, at pauses, and before they get too long to read; a long
cue is split into two lines at the word boundary that balances them best. The vertical version
uses shorter cues (a narrow frame, big letters) and highlights the word being spoken.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from klipstream.transcript import Segment, Word


@dataclass(frozen=True)
class CueStyle:
    max_chars: int  # per line
    max_lines: int
    max_seconds: float
    pause_seconds: float  # a silence this long ends a cue


SUBTITLES = CueStyle(max_chars=42, max_lines=2, max_seconds=6.0, pause_seconds=0.8)  # broadcast norms
VERTICAL = CueStyle(max_chars=18, max_lines=2, max_seconds=2.5, pause_seconds=0.5)  # short-form video

_SENTENCE_END = (".", "?", "!", "…")


@dataclass(frozen=True)
class TimedWord:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    lines: tuple[str, ...]
    words: tuple[TimedWord, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def words_between(segments: Iterable[Segment], start: float, end: float) -> list[TimedWord]:
    """The words said in [start, end), with times relative to `start` and clamped to the span.

    A word counts when its middle falls inside the span, so a clip never opens on half a word's
    caption from before it.
    """
    out: list[TimedWord] = []
    for word in all_words(segments):
        middle = (word.start + word.end) / 2
        if start <= middle < end:
            out.append(TimedWord(max(0.0, word.start - start), min(end - start, word.end - start), word.text))
    return out


def all_words(segments: Iterable[Segment]) -> list[TimedWord]:
    out = []
    for segment in segments:
        for word in segment.words:
            text = _clean(word)
            if text:
                out.append(TimedWord(float(word.start), max(float(word.start), float(word.end)), text))
    out.sort(key=lambda w: w.start)
    return out


def _clean(word: Word) -> str:
    return " ".join(str(word.word).split())


def build_cues(words: Sequence[TimedWord], style: CueStyle = SUBTITLES) -> list[Cue]:
    cues: list[Cue] = []
    current: list[TimedWord] = []
    limit = style.max_chars * style.max_lines
    for word in words:
        if current:
            text_len = len(" ".join(w.text for w in current)) + 1 + len(word.text)
            ends_sentence = current[-1].text.endswith(_SENTENCE_END)
            if (
                text_len > limit
                or word.end - current[0].start > style.max_seconds
                or word.start - current[-1].end >= style.pause_seconds
                or ends_sentence
            ):
                cues.append(_cue(current, style))
                current = []
        current.append(word)
    if current:
        cues.append(_cue(current, style))
    # never overlap: a cue ends when the next begins
    fixed = []
    for i, cue in enumerate(cues):
        end = cue.end
        if i + 1 < len(cues):
            end = min(end, cues[i + 1].start)
        fixed.append(Cue(cue.start, max(end, cue.start + 0.001), cue.lines, cue.words))
    return fixed


def _cue(words: list[TimedWord], style: CueStyle) -> Cue:
    return Cue(words[0].start, words[-1].end, split_lines([w.text for w in words], style.max_chars), tuple(words))


def split_lines(words: Sequence[str], max_chars: int) -> tuple[str, ...]:
    """One line if it fits; else two, broken where the longer line is shortest."""
    text = " ".join(words)
    if len(text) <= max_chars or len(words) < 2:
        return (text,)
    best = min(
        range(1, len(words)),
        key=lambda i: (max(len(" ".join(words[:i])), len(" ".join(words[i:]))), i),
    )
    return (" ".join(words[:best]), " ".join(words[best:]))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(cues: Sequence[Cue]) -> str:
    blocks = []
    for i, cue in enumerate(cues, 1):
        # SRT has no escapes and players read <...> as formatting tags: show brackets as look-alikes
        lines = [line.replace("-->", "->").replace("<", "‹").replace(">", "›") for line in cue.lines]
        blocks.append(f"{i}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks)


def webvtt(cues: Sequence[Cue]) -> str:
    out = ["WEBVTT", ""]
    for cue in cues:
        out.append(f"{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}")
        out.extend(_vtt_escape(line) for line in cue.lines)
        out.append("")
    return "\n".join(out) + "\n"


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("-->", "->")


# --------------------------------------------------------------------------------------------------
# Burned-in captions (Advanced SubStation Alpha, rendered by libass in ffmpeg)
# --------------------------------------------------------------------------------------------------

CAPTION_FONT = "DejaVu Sans"  # fonts-dejavu-core; libass falls back through fontconfig otherwise
_WHITE, _ACTIVE, _BLACK = "&H00FFFFFF", "&H0000D7FF", "&H00000000"  # ASS colours are &HAABBGGRR


def ass(cues: Sequence[Cue], width: int, height: int, *, margin_v: int | None = None) -> str:
    """One event per spoken word: the cue's lines with that word highlighted, word by word."""
    size = max(12, round(height * 0.045))
    margin = round(height * 0.2) if margin_v is None else margin_v
    header = "\n".join(
        [
            "[Script Info]",
            "ScriptType: v4.00+",
            f"PlayResX: {width}",
            f"PlayResY: {height}",
            "WrapStyle: 2",
            "ScaledBorderAndShadow: yes",
            "",
            "[V4+ Styles]",
            "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, "
            "Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, "
            "Alignment, MarginL, MarginR, MarginV, Encoding",
            f"Style: Caption,{CAPTION_FONT},{size},{_WHITE},{_WHITE},{_BLACK},{_BLACK},-1,0,0,0,100,100,0,0,1,"
            f"{max(1, size // 11)},0,2,{round(width * 0.06)},{round(width * 0.06)},{margin},1",
            "",
            "[Events]",
            "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text",
        ]
    )
    events = []
    for cue in cues:
        for i, word in enumerate(cue.words):
            start = word.start
            end = cue.words[i + 1].start if i + 1 < len(cue.words) else cue.end
            if end <= start:
                continue
            events.append(f"Dialogue: 0,{_ass_clock(start)},{_ass_clock(end)},Caption,,0,0,0,,{_highlighted(cue, i)}")
    return header + "\n" + "\n".join(events) + "\n"


def _highlighted(cue: Cue, index: int) -> str:
    """The cue's lines with word `index` in the active colour; lines split where the cue splits."""
    parts: list[str] = []
    first_line_words = len(cue.lines[0].split(" ")) if len(cue.lines) > 1 else len(cue.words)
    for i, word in enumerate(cue.words):
        text = _ass_escape(word.text)
        if i == index:
            text = "{\\c" + _ACTIVE + "&}" + text + "{\\c" + _WHITE + "&}"
        sep = "" if i == 0 else ("\\N" if i == first_line_words else " ")
        parts.append(sep + text)
    return "".join(parts)


def _ass_escape(text: str) -> str:
    return text.replace("\\", "/").replace("{", "(").replace("}", ")")


def _ass_clock(seconds: float) -> str:
    cs = max(0, round(seconds * 100))
    h, cs = divmod(cs, 360_000)
    m, cs = divmod(cs, 6000)
    s, cs = divmod(cs, 100)
    return f"{h}:{m:02d}:{s:02d}.{cs:02d}"
