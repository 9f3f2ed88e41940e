"""The analysis steps as plain functions, shared by the stages, the benchmarks and the evaluation.

No artifacts, no event loop: inputs are parsed data (or a reader of the chat), outputs are
tables and highlights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from klipstream.analysis.cancel import check
from klipstream.analysis.chat_scoring import ChatAccumulator, ChatSignals, FilterStats, window_rows
from klipstream.analysis.highlights import Highlight, Timeline, detect, fuse
from klipstream.analysis.signals import (
    DEFAULT_LAG,
    AudioFeatures,
    ChatLag,
    ViewerClip,
    chat_signals,
    chat_surge,
    estimate_chat_lag,
    flux_signal,
    loudness_signal,
    speech_signal,
    viewer_marks,
    voice_signal,
)
from klipstream.analysis.text_scoring import TextScorer
from klipstream.chat import ChatMessage
from klipstream.transcript import Segment

LEARN_FROM_TOP = 0.03  # share of the VOD's seconds, by chat surge, that reaction tokens are learned from

ChatReader = Callable[[], Iterable[tuple[int, ChatMessage]]]
"""Yields (byte offset in the chat JSON or -1, message) in time order."""


@dataclass
class ChatAnalysis:
    signals: ChatSignals
    rows: list[dict[str, Any]]  # 30 s windows of the chat sentiment CSV
    stats: FilterStats


def analyze_chat(
    read: ChatReader,
    duration: float,
    bot_accounts: Iterable[str],
    scorer: TextScorer | None = None,
    cancelled: threading.Event | None = None,
) -> ChatAnalysis:
    """One pass over the chat, then this VOD's reaction vocabulary learned from its surges."""
    accumulator = ChatAccumulator(bot_accounts, scorer)
    for i, (offset, message) in enumerate(read()):
        if i % 4096 == 0:
            check(cancelled)
        accumulator.add(message, offset)
    first = accumulator.finish(duration)
    surge = chat_surge(first, first.seconds).score
    learned: list[str] = []
    if surge.any():
        threshold = np.quantile(surge, 1.0 - LEARN_FROM_TOP)
        learned = accumulator.learn(surge >= max(threshold, 1e-9))
    signals = accumulator.finish(duration, learned) if learned else first
    return ChatAnalysis(signals, window_rows(signals), accumulator.stats)


def analyze_messages(
    messages: Sequence[ChatMessage], duration: float, bot_accounts: Iterable[str], **kwargs: Any
) -> ChatAnalysis:
    """`analyze_chat` over messages already in memory (tests, benchmarks)."""
    return analyze_chat(lambda: ((-1, m) for m in messages), duration, bot_accounts, **kwargs)


def build_timeline(
    features: AudioFeatures,
    segments: Sequence[Segment],
    chat: ChatSignals | None,
    *,
    sentiment_rows: Sequence[dict[str, Any]] | None = None,
    viewer_clips: Sequence[ViewerClip] = (),
    scorer: TextScorer | None = None,
    cancelled: threading.Event | None = None,
) -> Timeline:
    seconds = features.seconds
    loud, db_above = loudness_signal(features)
    audio = {"loudness": loud, "flux": flux_signal(features)}
    speech = speech_signal(segments, seconds, scorer or TextScorer(), sentiment_rows, cancelled)
    chat_set = None
    lag: ChatLag = DEFAULT_LAG
    commands = None
    if chat is not None:
        fitted = chat.fit(seconds)
        if fitted.count.any():
            lag = estimate_chat_lag(np.maximum(audio["loudness"], audio["flux"]), chat_surge(fitted, seconds).score)
        chat_set = chat_signals(fitted, seconds, lag)
        commands = fitted.clip_commands
    marks = viewer_marks(seconds, viewer_clips, commands, lag)
    return fuse(audio, db_above, speech, chat_set, marks=marks, voice=voice_signal(features))


def find_highlights(
    timeline: Timeline,
    top_n: int,
    segments: Sequence[Segment] = (),
    samples: Callable[[float, float], list[ChatMessage]] | None = None,
) -> list[Highlight]:
    return detect(timeline, top_n, segments=segments, samples=samples)
