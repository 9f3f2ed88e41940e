"""The reaction lexicon: emotes, emoji and chat slang mapped to emotion scores.

VADER knows English words but not Twitch: "KEKW" or "Sadge" carry most of the emotion in chat and
are invisible to it. The lexicon is data (klipstream/analysis/data/lexicon.csv) so it can be
extended without touching code; this module loads and validates it and matches it against text.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass
from importlib import resources

EMOTIONS: tuple[str, ...] = ("excitement", "funny", "happiness", "anger", "sadness", "neutral")
"""Emotion axes used everywhere in the analysis, each a score in [0, 1]."""

_KINDS = ("emote", "word", "emoji")
_ELONGATED = re.compile(r"(.)\1{2,}")
_LAUGH = re.compile(r"^(?:(?:ha){2,}h?|(?:ah){2,}|(?:he){2,}h?|l+o+l+[lo]*|lmf?a+o+|xd+|rofl)$")
_STRIP = "\"'.,!?;:()[]{}<>*~`"


class LexiconError(ValueError):
    """The shipped lexicon file is malformed (a packaging bug, caught by the tests)."""


@dataclass(frozen=True, slots=True)
class Entry:
    token: str
    kind: str
    sentiment: float  # [-1, 1]
    emotions: tuple[float, ...]  # EMOTIONS order, each [0, 1]


@dataclass(frozen=True, slots=True)
class Hits:
    """What the lexicon found in one text."""

    count: int  # matched entries (an emote repeated five times counts five)
    emote_count: int  # matches of kind "emote" or "emoji"
    sentiment: float  # mean sentiment of the matches, 0 when none
    emotions: tuple[float, ...]  # mean emotion vector of the matches, zeros when none
    matched: frozenset[int]  # indices of the whitespace tokens that matched


@dataclass(frozen=True)
class Lexicon:
    emotes: dict[str, Entry]  # case-sensitive whole tokens
    words: dict[str, Entry]  # lower-case single words
    phrases: dict[tuple[str, ...], Entry]  # lower-case 2-3 word phrases
    emoji: dict[str, Entry]
    laugh: Entry  # used for laughter spelled freely ("hahahah", "LOOOL", "xDDD")

    def __len__(self) -> int:
        return len(self.emotes) + len(self.words) + len(self.phrases) + len(self.emoji)

    def match(self, text: str) -> Hits:
        """Match emotes, phrases, words and emoji in `text`.

        Words are tried as written, then with elongations folded ("gooooo" -> "go", "nooo" -> "no",
        then "noo"), because elongation is how chat spells emphasis.
        """
        tokens = text.split()
        found: list[Entry] = []
        matched: set[int] = set()
        emote_count = 0
        lowered = [_fold(t) for t in tokens]
        shortened = [_ELONGATED.sub(r"\1", t) for t in lowered]  # "gooooo" -> "go" for phrases
        i = 0
        while i < len(tokens):
            entry = None
            width = 1
            for n in (3, 2):
                if i + n <= len(tokens):
                    entry = self.phrases.get(tuple(lowered[i : i + n])) or self.phrases.get(tuple(shortened[i : i + n]))
                    if entry is not None:
                        width = n
                        break
            if entry is None:
                raw = tokens[i]
                entry = self.emotes.get(raw) or self.emotes.get(raw.strip(_STRIP))
                if entry is None:
                    entry = self._word(lowered[i])
            if entry is not None:
                found.append(entry)
                matched.update(range(i, i + width))
                if entry.kind == "emote":
                    emote_count += 1
            i += width
        if self.emoji and not text.isascii():
            for symbol, entry in self.emoji.items():
                n = text.count(symbol)
                if n:
                    found.extend([entry] * n)
                    emote_count += n
        if not found:
            return Hits(0, 0, 0.0, (0.0,) * len(EMOTIONS), frozenset())
        sentiment = sum(e.sentiment for e in found) / len(found)
        emotions = tuple(sum(col) / len(found) for col in zip(*(e.emotions for e in found), strict=True))
        return Hits(len(found), emote_count, sentiment, emotions, frozenset(matched))

    def _word(self, word: str) -> Entry | None:
        if not word:
            return None
        entry = self.words.get(word)
        if entry is not None:
            return entry
        if _LAUGH.match(word):
            return self.laugh
        if _ELONGATED.search(word):
            return self.words.get(_ELONGATED.sub(r"\1", word)) or self.words.get(_ELONGATED.sub(r"\1\1", word))
        return None


def _fold(token: str) -> str:
    return token.strip(_STRIP).lower()


def parse_lexicon(text: str) -> Lexicon:
    """Parse and validate lexicon CSV text; raises LexiconError naming the bad line."""
    rows = csv.DictReader(io.StringIO("".join(line for line in text.splitlines(True) if not line.startswith("#"))))
    expected = ["token", "kind", "sentiment", *EMOTIONS]
    if rows.fieldnames != expected:
        raise LexiconError(f"lexicon header must be {','.join(expected)}, got {rows.fieldnames}")
    emotes: dict[str, Entry] = {}
    words: dict[str, Entry] = {}
    phrases: dict[tuple[str, ...], Entry] = {}
    emoji: dict[str, Entry] = {}
    for row in rows:
        where = f"lexicon line {rows.line_num}"
        token, kind = (row["token"] or "").strip(), (row["kind"] or "").strip()
        if not token or kind not in _KINDS:
            raise LexiconError(f"{where}: needs a token and a kind in {_KINDS}")
        try:
            sentiment = float(row["sentiment"])
            emotions = tuple(float(row[name]) for name in EMOTIONS)
        except (TypeError, ValueError):
            raise LexiconError(f"{where}: scores must be numbers") from None
        if not -1.0 <= sentiment <= 1.0 or not all(0.0 <= v <= 1.0 for v in emotions):
            raise LexiconError(f"{where}: sentiment must be in [-1, 1] and emotions in [0, 1]")
        entry = Entry(token, kind, sentiment, emotions)
        if kind == "emote":
            table: dict = emotes
            key: object = token
        elif kind == "emoji":
            table, key = emoji, token
        elif " " in token:
            table, key = phrases, tuple(token.lower().split())
            if len(key) > 3:  # type: ignore[arg-type]
                raise LexiconError(f"{where}: phrases have at most 3 words")
        else:
            table, key = words, token.lower()
        if key in table:
            raise LexiconError(f"{where}: duplicate {kind} {token!r}")
        table[key] = entry
    laugh = words.get("hahaha")
    if laugh is None:
        raise LexiconError("lexicon needs a 'hahaha' word entry (the score of free-form laughter)")
    return Lexicon(emotes, words, phrases, emoji, laugh)


@functools.cache
def load_lexicon() -> Lexicon:
    """The lexicon shipped with the package, loaded once per process."""
    text = resources.files("klipstream.analysis").joinpath("data/lexicon.csv").read_text(encoding="utf-8")
    return parse_lexicon(text)
