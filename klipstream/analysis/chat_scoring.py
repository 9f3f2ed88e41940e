"""Chat analytics as a stream: drop bots, commands and Twitch notices, score each message once, and
keep a few compact numbers per message; aggregate them on a time grid at the end.

Memory is a few dozen bytes per message (fixed-width columns, no Python object per message) plus
the scorer's bounded cache, so a million-message chat fits comfortably; the messages themselves
stay in the chat artifact, which readers seek into by second (`ChatSignals.offsets`).

Grids are anchored at 0 s (the VOD start), never at the first message, so windows line up with the
transcript and the audio. Two grids come out of here: 1 s per-second sums (what the highlight
fusion reads) and 30 s windows (the `{id}_chat_sentiment.csv` table people chart).
"""

from __future__ import annotations

import array
import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klipstream.analysis.baselines import poisson_surge, rolling_quantile
from klipstream.analysis.lexicon import EMOTIONS
from klipstream.analysis.reactions import CATEGORIES, NOT_A_REACTION, canonical, classify_message, tokens
from klipstream.analysis.text_scoring import TextScorer
from klipstream.chat import ChatMessage, SystemEvent

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
    "reaction_share",
    "system_events",
)
SYSTEM_KINDS: tuple[str, ...] = tuple(e.value for e in SystemEvent)
CLIP_COMMANDS = frozenset({"!clip", "!clipit", "!clips"})

# Bits of a message's flags column.
REACTION, LAUGHTER, SHOCK, BURST, LEARNED = 1, 2, 4, 8, 16
LEARN_LIFT = 2.0
LEARN_MIN_CHATTERS = 10
LEARN_LIMIT = 50
TEXT_CACHE = 200_000  # distinct message texts whose analysis is remembered
MAX_TOKEN_NAMES = 500_000  # token spellings remembered for naming learned tokens (bounded memory)


@dataclass
class FilterStats:
    kept: int = 0
    bot_messages: int = 0
    commands: int = 0
    system_events: int = 0


def _grid(seconds: np.ndarray, n: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(seconds, weights=weights, minlength=n)[:n].astype(np.float64)


@dataclass
class ChatSignals:
    """A VOD's chat on a 1 s grid anchored at 0 (sums per second, so any coarser grid is a
    reshape), plus the kept messages' seconds, chatters and reaction flags."""

    count: np.ndarray  # kept messages per second (no bots, commands or notices)
    users: np.ndarray  # distinct chatters within each second
    emotes: np.ndarray
    sentiment_sum: np.ndarray
    highlight_sum: np.ndarray
    emotion_sums: np.ndarray  # (6, n) EMOTIONS
    reactions: np.ndarray  # messages with a reaction marker (klipstream.analysis.reactions)
    category_votes: np.ndarray  # (len(CATEGORIES), n)
    new_chatters: np.ndarray  # chatters seen for the first time in this VOD
    system: np.ndarray  # (len(SYSTEM_KINDS), n) Twitch notices: subs, gifts, raids, bits...
    clip_commands: np.ndarray  # "!clip" commands: viewers asking for this moment to be clipped
    offsets: np.ndarray  # int64 byte offset in the chat JSON of the first message at or after each second; -1
    message_seconds: np.ndarray  # int32, per kept message, time order
    message_users: np.ndarray  # int32 interned chatter of each kept message
    message_flags: np.ndarray  # uint8 REACTION | LAUGHTER | SHOCK | BURST | LEARNED
    learned_tokens: list[str] = field(default_factory=list)  # this VOD's own reaction vocabulary
    hop_seconds: float = 1.0

    @property
    def seconds(self) -> int:
        return len(self.count)

    _ARRAYS = (
        "count",
        "users",
        "emotes",
        "sentiment_sum",
        "highlight_sum",
        "emotion_sums",
        "reactions",
        "category_votes",
        "new_chatters",
        "system",
        "clip_commands",
        "offsets",
        "message_seconds",
        "message_users",
        "message_flags",
    )

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez_compressed(
                f,
                hop_seconds=np.float64(self.hop_seconds),
                emotion_names=np.array(EMOTIONS),
                category_names=np.array([c.value for c in CATEGORIES]),
                system_kinds=np.array(SYSTEM_KINDS),
                learned_tokens=np.array(self.learned_tokens, dtype=str),
                **{name: getattr(self, name) for name in self._ARRAYS},
            )

    @classmethod
    def load(cls, path: Path) -> ChatSignals:
        with np.load(path) as z:
            missing = [name for name in cls._ARRAYS if name not in z]
            if missing:
                raise ValueError(f"chat signals file lacks {', '.join(missing)}")
            return cls(
                **{name: z[name] for name in cls._ARRAYS},
                learned_tokens=[str(t) for t in z["learned_tokens"]],
                hop_seconds=float(z["hop_seconds"]),
            )

    def fit(self, seconds: int) -> ChatSignals:
        """The same signals padded with zeros or cut to `seconds` (the audio's length rules)."""
        n = self.seconds
        if seconds == n:
            return self

        def fix(a: np.ndarray, fill: float = 0) -> np.ndarray:
            if seconds <= n:
                return a[..., :seconds]
            pad = [(0, 0)] * (a.ndim - 1) + [(0, seconds - n)]
            return np.pad(a, pad, constant_values=fill)

        keep = self.message_seconds < seconds
        grids = {name: fix(getattr(self, name)) for name in self._ARRAYS[:11]}
        return ChatSignals(
            **grids,
            offsets=fix(self.offsets, -1),
            message_seconds=self.message_seconds[keep],
            message_users=self.message_users[keep],
            message_flags=self.message_flags[keep],
            learned_tokens=self.learned_tokens,
            hop_seconds=self.hop_seconds,
        )

    def chatters_in(self, start: int, stop: int) -> int:
        """Distinct chatters with a message in seconds [start, stop)."""
        lo, hi = np.searchsorted(self.message_seconds, [start, stop])
        return len(np.unique(self.message_users[lo:hi]))


class ChatAccumulator:
    """Takes messages one by one (time order), keeps fixed-width columns per kept message."""

    def __init__(self, bot_accounts: Iterable[str], scorer: TextScorer | None = None) -> None:
        self.bots = {b.lower() for b in bot_accounts}
        self.scorer = scorer or TextScorer()
        self.stats = FilterStats()
        self._texts: dict[tuple[str, int], tuple[tuple[float, ...], int, int, int, tuple[int, ...]]] = {}
        self._users: dict[str, int] = {}
        self._seconds = array.array("i")
        self._user_ids = array.array("i")
        self._flags = array.array("B")
        self._categories = array.array("B")
        self._scores = array.array("f")  # sentiment, 6 EMOTIONS, highlight per message
        self._emotes = array.array("H")
        self._new = array.array("B")
        self._system: list[tuple[int, int]] = []
        self._clips = array.array("i")
        self._offsets: dict[int, int] = {}
        # Every distinct token of every kept message, as (hash, message index): learning the VOD's
        # reaction vocabulary and marking the messages that use it are then array operations.
        self._token_hashes = array.array("q")
        self._token_messages = array.array("i")
        self._token_names: dict[int, str] = {}
        self.last_second = 0

    def add(self, message: ChatMessage, offset: int = -1) -> None:
        second = max(0, int(message.time))
        self.last_second = max(self.last_second, second)
        if offset >= 0 and second not in self._offsets:
            self._offsets[second] = offset
        if message.system is not None:
            self.stats.system_events += 1
            self._system.append((second, SYSTEM_KINDS.index(message.system)))
            return
        if message.user in self.bots:
            self.stats.bot_messages += 1
            return
        text = message.text.strip()
        if text.startswith("!"):
            self.stats.commands += 1
            if text.split(maxsplit=1)[0].lower() in CLIP_COMMANDS:
                self._clips.append(second)
            return
        self.stats.kept += 1
        key = (message.text, message.emote_fragments)
        known = self._texts.get(key)
        if known is None:
            known = self._per_text(*key)
            if len(self._texts) >= TEXT_CACHE:
                self._texts.clear()  # chat's hot set refills within seconds
            self._texts[key] = known
        scores, emotes, flags, votes, hashes = known
        user = self._users.get(message.user)
        if user is None:
            user = self._users[message.user] = len(self._users)
            self._new.append(1)
        else:
            self._new.append(0)
        index = len(self._seconds)
        self._seconds.append(second)
        self._user_ids.append(user)
        self._flags.append(flags)
        self._categories.append(votes)
        self._scores.extend(scores)
        self._emotes.append(emotes)
        self._token_hashes.extend(hashes)
        self._token_messages.extend([index] * len(hashes))

    def _per_text(self, text: str, emote_fragments: int) -> tuple[tuple[float, ...], int, int, int, tuple[int, ...]]:
        """Everything about a message that depends only on its text: chat repeats itself a lot, so
        this runs once per distinct text, not once per message."""
        score = self.scorer.score(text)
        reaction = classify_message(text, emote_fragments) if text.strip() else NOT_A_REACTION
        flags = REACTION * reaction.reaction | LAUGHTER * reaction.laughter | SHOCK * reaction.shock
        flags |= BURST * reaction.burst
        votes = 0
        for category in reaction.categories:
            votes |= 1 << CATEGORIES.index(category)
        hashes = []
        for token in {canonical(token) for token in tokens(text)}:
            key = hash(token)
            hashes.append(key)
            if key not in self._token_names and len(self._token_names) < MAX_TOKEN_NAMES:
                self._token_names[key] = token
        # sentiment, the six EMOTIONS, then the reaction strength
        scores = (*score[:7], score.highlight)
        return scores, min(65535, max(score.emote_count, emote_fragments)), flags, votes, tuple(hashes)

    def learn(self, surge_seconds: np.ndarray) -> list[str]:
        """Learn this VOD's reaction tokens from the seconds its chat surged (a boolean mask over
        the grid), flag the messages that use them, and return the tokens, strongest first.

        A token is learned when its share of surge messages is at least LEARN_LIFT times its share
        of all messages, in at least LEARN_MIN_CHATTERS distinct chatters' messages during surges;
        both shares are add-one smoothed so rare tokens cannot look decisive.
        """
        seconds = np.frombuffer(self._seconds, dtype=np.int32)
        if len(seconds) == 0 or not surge_seconds.any():
            return []
        hashes = np.frombuffer(self._token_hashes, dtype=np.int64)
        owners = np.frombuffer(self._token_messages, dtype=np.int32)
        in_surge_message = surge_seconds[np.minimum(seconds, len(surge_seconds) - 1)]
        surge_messages = int(in_surge_message.sum())
        if surge_messages == 0:
            return []
        all_keys, all_counts = np.unique(hashes, return_counts=True)
        in_surge = in_surge_message[owners]
        keys, counts = np.unique(hashes[in_surge], return_counts=True)
        overall = all_counts[np.searchsorted(all_keys, keys)]
        lift = ((counts + 1) / (surge_messages + 2)) / ((overall + 1) / (len(seconds) + 2))
        candidates = keys[(lift >= LEARN_LIFT) & (counts >= LEARN_MIN_CHATTERS)]
        if len(candidates) == 0:
            return []
        users = np.frombuffer(self._user_ids, dtype=np.int32)
        learned: list[tuple[float, str, int]] = []
        for key in candidates:
            chatters = len(np.unique(users[owners[in_surge & (hashes == key)]]))
            name = self._token_names.get(int(key))
            if name is not None and chatters >= LEARN_MIN_CHATTERS:
                learned.append((float(lift[np.searchsorted(keys, key)]), name, int(key)))
        learned.sort(key=lambda item: (-item[0], item[1]))
        learned = learned[:LEARN_LIMIT]
        if learned:
            marked = np.unique(owners[np.isin(hashes, [key for _, _, key in learned])])
            flags = np.frombuffer(self._flags, dtype=np.uint8)
            flags[marked] |= LEARNED | REACTION
        return [name for _, name, _ in learned]

    def finish(self, duration: float, learned_tokens: Sequence[str] = ()) -> ChatSignals:
        """The per-second grid from 0 to `duration` (messages past it extend it)."""
        n = max(1, math.ceil(max(duration, self.last_second + 1e-9)))
        seconds = np.minimum(np.frombuffer(self._seconds, dtype=np.int32).astype(np.int64), n - 1)
        users = np.frombuffer(self._user_ids, dtype=np.int32)
        flags = np.frombuffer(self._flags, dtype=np.uint8)
        cats = np.frombuffer(self._categories, dtype=np.uint8)
        scores = np.frombuffer(self._scores, dtype=np.float32).reshape(-1, 8).astype(np.float64)
        pairs = np.unique(seconds * (int(users.max(initial=0)) + 1) + users)
        system = np.zeros((len(SYSTEM_KINDS), n))
        for second, kind in self._system:
            system[kind, min(second, n - 1)] += 1
        offsets = np.full(n, -1, dtype=np.int64)
        if self._offsets:
            known = np.array(sorted(self._offsets.items()), dtype=np.int64)
            known = known[known[:, 0] < n]
            # Each second points at its first message, or at the next second that has one.
            idx = np.searchsorted(known[:, 0], np.arange(n))
            has = idx < len(known)
            offsets[has] = known[idx[has], 1]
        return ChatSignals(
            count=_grid(seconds, n),
            users=np.bincount(pairs // (int(users.max(initial=0)) + 1), minlength=n)[:n].astype(np.float64),
            emotes=_grid(seconds, n, np.frombuffer(self._emotes, dtype=np.uint16).astype(np.float64)),
            sentiment_sum=_grid(seconds, n, scores[:, 0]),
            highlight_sum=_grid(seconds, n, scores[:, 7]),
            emotion_sums=np.stack([_grid(seconds, n, scores[:, 1 + k]) for k in range(len(EMOTIONS))]),
            reactions=_grid(seconds, n, ((flags & REACTION) > 0).astype(np.float64)),
            category_votes=np.stack(
                [_grid(seconds, n, ((cats >> k) & 1).astype(np.float64)) for k in range(len(CATEGORIES))]
            ),
            new_chatters=_grid(seconds, n, np.frombuffer(self._new, dtype=np.uint8).astype(np.float64)),
            system=system,
            clip_commands=np.bincount(
                np.minimum(np.frombuffer(self._clips, dtype=np.int32), n - 1), minlength=n
            ).astype(np.float64)[:n],
            offsets=offsets,
            message_seconds=seconds.astype(np.int32),
            message_users=users.copy(),
            message_flags=flags.copy(),
            learned_tokens=list(learned_tokens),
        )


def window_rows(signals: ChatSignals, window: float = 30.0) -> list[dict[str, Any]]:
    """Rows of `{id}_chat_sentiment.csv`: fixed `window`-second windows from 0 to the end.

    Averages of a window without messages are None (written as empty cells): there is nothing to
    average, and inventing a neutral 0 would look like a measured calm chat.
    surge_score: the window's message count against the trailing median of the previous 5 minutes
    of windows, scaled by `poisson_surge` to [0, 1]. reaction_share: the share of its messages
    that are reactions; system_events: Twitch notices (subs, gifts, raids, bits) in the window.
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
    reactions = windowed(signals.reactions)
    system = windowed(signals.system).sum(axis=0)
    widx = np.minimum(signals.message_seconds.astype(np.int64) // width, n_windows - 1)
    stride = int(signals.message_users.max(initial=0)) + 1
    unique_pairs = np.unique(widx * stride + signals.message_users)
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
            row["reaction_share"] = reactions[w] / c
        else:
            for name in ("avg_sentiment", "avg_highlight", *(f"avg_{e}" for e in EMOTIONS), "emote_density"):
                row[name] = None
            row["reaction_share"] = None
        row["unique_chatters"] = int(chatters[w])
        row["messages_per_minute"] = c * 60.0 / (end - start)
        row["surge_score"] = float(surge[w])
        row["system_events"] = int(system[w])
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
