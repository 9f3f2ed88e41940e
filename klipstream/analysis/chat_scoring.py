"""Chat analytics: drop bots and commands, score messages, aggregate on a time grid.

Grids are anchored at 0 s (the VOD start), never at the first message, so windows line up with the
transcript and the audio. Two grids come out of here: 1 s per-second sums (the fine signal the
highlight fusion reads) and 30 s windows (the `{id}_chat_sentiment.csv` table people chart).
"""

from __future__ import annotations

import csv
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klipstream.analysis.baselines import poisson_surge, rolling_quantile
from klipstream.analysis.cancel import check
from klipstream.analysis.lexicon import EMOTIONS
from klipstream.analysis.text_scoring import TextScorer
from klipstream.chat import ChatMessage

CHAT_SENTIMENT_COLUMNS = (
    "start_time",
    "end_time",
    "message_count",
    "avg_sentiment",
    "avg_highlight",
    *(f"avg_{name}" for name in EMOTIONS),
    # Extra columns come after the ones the existing frontend reads.
    "unique_chatters",
    "messages_per_minute",
    "emote_density",
    "surge_score",
)


@dataclass(frozen=True, slots=True)
class FilterStats:
    kept: int
    bot_messages: int
    commands: int


def filter_messages(
    messages: Iterable[ChatMessage], bot_accounts: Iterable[str]
) -> tuple[list[ChatMessage], FilterStats]:
    """Drop bot accounts and bot commands ("!uptime"); keep every human reaction, however short.

    "gg", "F" or "W" are the signal here, so nothing is dropped for being short or repetitive.
    """
    bots = {b.lower() for b in bot_accounts}
    kept: list[ChatMessage] = []
    bot_count = commands = 0
    for m in messages:
        if m.user in bots:
            bot_count += 1
        elif m.text.lstrip().startswith("!"):
            commands += 1
        else:
            kept.append(m)
    return kept, FilterStats(len(kept), bot_count, commands)


@dataclass
class ChatScores:
    """Per-message scores as parallel arrays (time order)."""

    times: np.ndarray  # float64 seconds
    users: np.ndarray  # int32 user index (interned logins)
    sentiment: np.ndarray  # [-1, 1]
    highlight: np.ndarray  # [0, 1], see text_scoring
    emotions: np.ndarray  # (n, 6) in EMOTIONS order, [0, 1]
    emotes: np.ndarray  # int32 emotes per message


def score_messages(
    messages: Sequence[ChatMessage], scorer: TextScorer, cancelled: threading.Event | None = None
) -> ChatScores:
    """Score every message (cached by text inside the scorer; chat repeats a lot)."""
    n = len(messages)
    table = np.empty((n, 8), dtype=np.float64)  # sentiment, highlight, 6 emotions
    emotes = np.empty(n, dtype=np.int32)
    users = np.empty(n, dtype=np.int32)
    user_ids: dict[str, int] = {}
    for i, m in enumerate(messages):
        if i % 4096 == 0:
            check(cancelled)
        s = scorer.score(m.text)
        table[i] = (s.sentiment, s.highlight, s.excitement, s.funny, s.happiness, s.anger, s.sadness, s.neutral)
        emotes[i] = max(s.emote_count, m.emote_fragments)
        users[i] = user_ids.setdefault(m.user, len(user_ids))
    times = np.fromiter((m.time for m in messages), dtype=np.float64, count=n)
    return ChatScores(times, users, table[:, 0].copy(), table[:, 1].copy(), table[:, 2:].copy(), emotes)


@dataclass
class ChatSignals:
    """Per-second chat sums on a 1 s grid anchored at 0 (sums, so any coarser grid is a reshape)."""

    count: np.ndarray  # messages per second (bots and commands excluded)
    users: np.ndarray  # distinct chatters within each second
    emotes: np.ndarray
    sentiment_sum: np.ndarray
    highlight_sum: np.ndarray
    emotion_sums: np.ndarray  # (6, n)
    hop_seconds: float = 1.0
    # The kept messages themselves (time order), so highlight explanations can quote chat without
    # parsing the whole chat JSON again.
    messages: list[ChatMessage] = field(default_factory=list)

    @property
    def seconds(self) -> int:
        return len(self.count)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez_compressed(
                f,
                hop_seconds=np.float64(self.hop_seconds),
                count=self.count,
                users=self.users,
                emotes=self.emotes,
                sentiment_sum=self.sentiment_sum,
                highlight_sum=self.highlight_sum,
                emotion_sums=self.emotion_sums,
                emotion_names=np.array(EMOTIONS),
                message_times=np.array([m.time for m in self.messages], dtype=np.float64),
                message_users=_pack(m.user for m in self.messages),
                message_texts=_pack(m.text for m in self.messages),
            )

    @classmethod
    def load(cls, path: Path) -> ChatSignals:
        with np.load(path) as z:
            return cls(
                count=z["count"],
                users=z["users"],
                emotes=z["emotes"],
                sentiment_sum=z["sentiment_sum"],
                highlight_sum=z["highlight_sum"],
                emotion_sums=z["emotion_sums"],
                hop_seconds=float(z["hop_seconds"]),
                messages=_unpack_messages(z),
            )

    def fit(self, seconds: int) -> ChatSignals:
        """The same signals padded with zeros or cut to `seconds` (the audio's length rules)."""
        n = self.seconds
        if seconds == n:
            return self

        def fix(a: np.ndarray) -> np.ndarray:
            if seconds <= n:
                return a[..., :seconds]
            pad = [(0, 0)] * (a.ndim - 1) + [(0, seconds - n)]
            return np.pad(a, pad)

        return ChatSignals(
            fix(self.count),
            fix(self.users),
            fix(self.emotes),
            fix(self.sentiment_sum),
            fix(self.highlight_sum),
            fix(self.emotion_sums),
            self.hop_seconds,
            self.messages,
        )


def _pack(texts: Iterable[str]) -> np.ndarray:
    """Strings as one UTF-8 byte array, newline-separated (newlines inside become spaces)."""
    blob = "\n".join(t.replace("\n", " ").replace("\r", " ") for t in texts).encode("utf-8")
    return np.frombuffer(blob, dtype=np.uint8)


def _unpack_messages(z: Any) -> list[ChatMessage]:
    if "message_times" not in z:
        return []
    times = z["message_times"]
    if len(times) == 0:
        return []
    users = bytes(z["message_users"]).decode("utf-8").split("\n")
    texts = bytes(z["message_texts"]).decode("utf-8").split("\n")
    if not len(users) == len(texts) == len(times):
        return []
    return [ChatMessage(float(t), u, x) for t, u, x in zip(times, users, texts, strict=True)]


def per_second(scores: ChatScores, duration: float, messages: Sequence[ChatMessage] = ()) -> ChatSignals:
    """Sum the per-message scores into 1 s bins from 0 to `duration` (messages past it extend it)."""
    last = float(scores.times[-1]) if len(scores.times) else 0.0
    seconds = max(1, math.ceil(max(duration, last + 1e-9)))
    idx = np.minimum(scores.times.astype(np.int64), seconds - 1)
    count = np.bincount(idx, minlength=seconds).astype(np.float64)
    pairs = np.unique(idx.astype(np.int64) * (int(scores.users.max(initial=0)) + 1) + scores.users)
    users = np.bincount(pairs // (int(scores.users.max(initial=0)) + 1), minlength=seconds).astype(np.float64)
    emotion_sums = np.stack([np.bincount(idx, weights=scores.emotions[:, k], minlength=seconds) for k in range(6)])
    return ChatSignals(
        count=count,
        users=users,
        emotes=np.bincount(idx, weights=scores.emotes, minlength=seconds),
        sentiment_sum=np.bincount(idx, weights=scores.sentiment, minlength=seconds),
        highlight_sum=np.bincount(idx, weights=scores.highlight, minlength=seconds),
        emotion_sums=emotion_sums,
        messages=list(messages),
    )


def window_rows(scores: ChatScores, signals: ChatSignals, window: float = 30.0) -> list[dict[str, Any]]:
    """Rows of `{id}_chat_sentiment.csv`: fixed `window`-second windows from 0 to the end.

    Averages of a window without messages are None (written as empty cells): there is nothing to
    average, and inventing a neutral 0 would look like a measured calm chat.
    surge_score: the window's message count against the trailing median of the previous 5 minutes
    of windows, scaled by `poisson_surge` to [0, 1].
    """
    width = max(1, round(window))
    seconds = signals.seconds
    n_windows = max(1, math.ceil(seconds / width))
    padded = n_windows * width

    def windowed(a: np.ndarray) -> np.ndarray:
        return (
            np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, padded - a.shape[-1])])
            .reshape(*a.shape[:-1], n_windows, width)
            .sum(-1)
        )

    count = windowed(signals.count)
    emotes = windowed(signals.emotes)
    sentiment = windowed(signals.sentiment_sum)
    highlight = windowed(signals.highlight_sum)
    emotions = windowed(signals.emotion_sums)
    widx = np.minimum((scores.times // width).astype(np.int64), n_windows - 1)
    stride = int(scores.users.max(initial=0)) + 1
    unique_pairs = np.unique(widx * stride + scores.users)
    chatters = np.bincount(unique_pairs // stride, minlength=n_windows)
    baseline = rolling_quantile(count, max(1, round(300 / width)), 0.5, step=1)
    surge = poisson_surge(count, baseline)
    rows: list[dict[str, Any]] = []
    for w in range(n_windows):
        start = float(w * width)
        end = float(min((w + 1) * width, max(seconds, start + 1)))
        c = int(count[w])
        row: dict[str, Any] = {"start_time": start, "end_time": end, "message_count": c}
        if c:
            row["avg_sentiment"] = sentiment[w] / c
            row["avg_highlight"] = highlight[w] / c
            for k, name in enumerate(EMOTIONS):
                row[f"avg_{name}"] = emotions[k, w] / c
            row["emote_density"] = emotes[w] / c
        else:
            for name in ("avg_sentiment", "avg_highlight", *(f"avg_{e}" for e in EMOTIONS), "emote_density"):
                row[name] = None
        row["unique_chatters"] = int(chatters[w])
        row["messages_per_minute"] = c * 60.0 / (end - start)
        row["surge_score"] = float(surge[w])
        rows.append(row)
    return rows


def write_chat_sentiment_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CHAT_SENTIMENT_COLUMNS)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in CHAT_SENTIMENT_COLUMNS])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    return str(value)
