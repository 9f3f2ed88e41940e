"""The default, offline text scorer: VADER + the gaming lexicon + intensity cues.

Used for every chat message and, unless an LLM endpoint is configured, for transcript windows.
It is deterministic and needs no network or model weights, so a job always gets real numbers.

Scales (all documented here once, used by every caller):
- sentiment in [-1, 1]: VADER's compound score blended with the mean sentiment of lexicon matches
  (each match counts as much as VADER's whole verdict, so "KEKW KEKW" is mostly the emote).
- excitement, funny, happiness, anger, sadness in [0, 1]: the element-wise max of the lexicon's
  mean emotion vector and VADER's polarity (positive -> happiness; negative -> anger and sadness,
  half each, since VADER cannot tell them apart); then scaled up by intensity:
  e * (1 + 0.5 * intensity), clipped to 1. Excitement is at least 0.7 * intensity: shouting is
  excitement even with no emotional words.
- neutral in [0, 1]: 1 - the strongest of the five emotions ("nothing else is present").
- intensity in [0, 1]: a weighted sum of cues, clipped: exclamation marks (0.35 at 3+), capitals
  in words that are not emotes (0.3 at all caps), elongation like "nooooo" (0.2), the same token
  repeated (0.15 at 4+ repeats), laughter (0.2).
- highlight in [0, 1]: how strongly the text reacts to something: the strongest of excitement,
  funny, anger, sadness and 0.6 * happiness (plain contentment is less clip-worthy).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from klipstream.analysis.lexicon import Hits, Lexicon, load_lexicon

DEFAULT_MODEL = "vader-lexicon-1"
"""The `model` column value for windows scored by this scorer."""

_ELONGATION = re.compile(r"([a-zA-Z])\1{2,}")
_LAUGHTER = re.compile(r"(?:ha){2,}|(?:he){2,}|\bl+o+l+\b|\blmf?ao+\b|\bxd+\b|\brofl\b", re.IGNORECASE)
_WORD_CHARS = re.compile(r"[a-z']+")


class TextScore(NamedTuple):
    sentiment: float
    excitement: float
    funny: float
    happiness: float
    anger: float
    sadness: float
    neutral: float
    intensity: float
    highlight: float
    emote_count: int


NO_TEXT = TextScore(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0)
"""The score of empty text: no emotion present, which is what "neutral" means."""


def intensity_cues(text: str, hits: Hits) -> float:
    """Typographic intensity of `text` in [0, 1] (see module docstring for the weights)."""
    exclaim = min(text.count("!"), 3) / 3.0
    tokens = text.split()
    letters = upper = 0
    for i, token in enumerate(tokens):
        if i in hits.matched:
            continue  # emotes are capitalised by name, not by shouting
        for ch in token:
            if ch.isalpha():
                letters += 1
                upper += ch.isupper()
    caps = upper / letters if letters >= 4 else 0.0
    elongated = 1.0 if _ELONGATION.search(text) else 0.0
    repeats = 0.0
    if len(tokens) >= 2:
        most = Counter(tokens).most_common(1)[0][1]
        repeats = min(most - 1, 3) / 3.0
    laughter = 1.0 if _LAUGHTER.search(text) else 0.0
    return min(1.0, 0.35 * exclaim + 0.3 * caps + 0.2 * elongated + 0.15 * repeats + 0.2 * laughter)


class TextScorer:
    """Scores short texts; remembers scores by exact text because chat repeats itself a lot.

    Not thread-safe for concurrent use of one instance (the cache is a plain dict): give each
    thread its own scorer, they are cheap.
    """

    model = DEFAULT_MODEL

    def __init__(self, lexicon: Lexicon | None = None, *, cache_size: int = 200_000) -> None:
        self.lexicon = lexicon or load_lexicon()
        self._vader = SentimentIntensityAnalyzer()
        self._vader_words = self._vader.lexicon
        self._cache: dict[str, TextScore] = {}
        self._cache_size = cache_size

    def score(self, text: str) -> TextScore:
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        result = self._score(text)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # simple bound; chat's hot set refills within seconds
        self._cache[text] = result
        return result

    def _vader_compound(self, text: str) -> float:
        """VADER's compound score, skipping VADER when no word or emoji of its lexicon is present.

        VADER only scores lexicon words (punctuation and caps only amplify them), so the skip does
        not change any result; it matters because most chat messages are emotes VADER ignores.
        """
        lowered = text.lower()
        if text.isascii() and not any(w in self._vader_words for w in _WORD_CHARS.findall(lowered)):
            return 0.0
        return float(self._vader.polarity_scores(text)["compound"])

    def _score(self, text: str) -> TextScore:
        text = text.strip()
        if not text:
            return NO_TEXT
        hits = self.lexicon.match(text)
        compound = self._vader_compound(text)
        intensity = intensity_cues(text, hits)
        pos, neg = max(compound, 0.0), max(-compound, 0.0)
        vader_emotions = (0.0, 0.0, pos, 0.5 * neg, 0.5 * neg)
        lex = hits.emotions[:5]
        boost = 1.0 + 0.5 * intensity
        excitement, funny, happiness, anger, sadness = (
            min(1.0, max(a, b) * boost) for a, b in zip(lex, vader_emotions, strict=True)
        )
        excitement = max(excitement, 0.7 * intensity)
        if hits.count:
            sentiment = (compound + hits.sentiment * hits.count) / (1 + hits.count)
        else:
            sentiment = compound
        strongest = max(excitement, funny, happiness, anger, sadness)
        highlight = max(excitement, funny, anger, sadness, 0.6 * happiness)
        return TextScore(
            sentiment=max(-1.0, min(1.0, sentiment)),
            excitement=excitement,
            funny=funny,
            happiness=happiness,
            anger=anger,
            sadness=sadness,
            neutral=1.0 - strongest,
            intensity=intensity,
            highlight=highlight,
            emote_count=hits.emote_count,
        )
