"""The analysis steps as plain functions, shared by the stages, the benchmarks and the evaluation.

No artifacts, no event loop: inputs are parsed data, outputs are tables and highlights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from klipstream.analysis.chat_scoring import (
    ChatMessage,
    ChatScores,
    ChatSignals,
    FilterStats,
    filter_messages,
    per_second,
    score_messages,
    window_rows,
)
from klipstream.analysis.highlights import Highlight, Timeline, detect, fuse
from klipstream.analysis.signals import (
    AudioFeatures,
    chat_signals,
    flux_signal,
    loudness_signal,
    speech_signal,
)
from klipstream.analysis.text_scoring import TextScorer
from klipstream.transcript import Segment


@dataclass
class ChatAnalysis:
    messages: list[ChatMessage]  # kept messages (no bots, no commands), time order
    scores: ChatScores
    signals: ChatSignals
    rows: list[dict[str, Any]]  # 30 s windows of the chat sentiment CSV
    stats: FilterStats


def analyze_chat(
    messages: Iterable[ChatMessage],
    duration: float,
    bot_accounts: Iterable[str],
    scorer: TextScorer | None = None,
    cancelled: threading.Event | None = None,
) -> ChatAnalysis:
    kept, stats = filter_messages(messages, bot_accounts)
    scores = score_messages(kept, scorer or TextScorer(), cancelled)
    signals = per_second(scores, duration, kept)
    return ChatAnalysis(kept, scores, signals, window_rows(scores, signals), stats)


def build_timeline(
    features: AudioFeatures,
    segments: Sequence[Segment],
    chat: ChatSignals | None,
    *,
    sentiment_rows: Sequence[dict[str, Any]] | None = None,
    scorer: TextScorer | None = None,
    cancelled: threading.Event | None = None,
) -> Timeline:
    seconds = features.seconds
    loud, db_above = loudness_signal(features)
    audio = {"loudness": loud, "flux": flux_signal(features)}
    speech = speech_signal(segments, seconds, scorer or TextScorer(), sentiment_rows, cancelled)
    chat_set = chat_signals(chat, seconds) if chat is not None else None
    return fuse(audio, db_above, speech, chat_set)


def find_highlights(
    timeline: Timeline,
    top_n: int,
    segments: Sequence[Segment] = (),
    messages: Sequence[ChatMessage] = (),
) -> list[Highlight]:
    return detect(timeline, top_n, segments=segments, messages=messages)
