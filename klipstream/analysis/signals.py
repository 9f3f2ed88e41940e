"""Per-second signals for highlight fusion, each normalised to [0, 1].

Everything lands on one grid: 1 s bins anchored at 0 s, as many as the audio is long. Each signal's
scaling is documented on the function that makes it; no signal is on another scale.

| signal        | source                                 | meaning of 1.0                                      |
|---------------|----------------------------------------|-----------------------------------------------------|
| loudness      | features.loudness_dbfs                 | 3 spreads above the trailing 5-min median loudness  |
| flux          | features.flux (spectral change)        | 3 spreads above the trailing 5-min median flux      |
| speech        | transcript segments (+ sentiment rows) | the strongest emotional reaction the scorer gives   |
| chat_surge    | chat messages per second, lag-shifted  | Poisson z >= 6 over the trailing 5-min rate          |
| chat_emotion  | chat reaction strength, lag-shifted    | every message a maximal reaction, against baseline  |
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from klipstream.analysis.baselines import centered_mean, poisson_surge, robust_relative, rolling_quantile
from klipstream.analysis.cancel import check
from klipstream.analysis.chat_scoring import ChatSignals
from klipstream.analysis.lexicon import EMOTIONS
from klipstream.analysis.text_scoring import TextScorer
from klipstream.transcript import Segment

BASELINE_SECONDS = 300  # trailing window of every rolling baseline
CHAT_MIN_LAG = 2  # chat reacts 2-20 s after what it reacts to
CHAT_MAX_LAG = 20


class FeatureFormatError(ValueError):
    """The features file lacks the arrays the audio pass writes."""


@dataclass(frozen=True)
class AudioFeatures:
    hop_seconds: float
    loudness_dbfs: np.ndarray
    centroid_hz: np.ndarray
    flux: np.ndarray
    duration_seconds: float

    @classmethod
    def load(cls, path: Path) -> AudioFeatures:
        try:
            with np.load(path) as z:
                hop = float(z["hop_seconds"])
                loud = np.asarray(z["loudness_dbfs"], dtype=np.float32)
                centroid = np.asarray(z["centroid_hz"], dtype=np.float32)
                flux = np.asarray(z["flux"], dtype=np.float32)
                duration = float(z["duration_seconds"]) if "duration_seconds" in z else len(loud) * hop
        except (KeyError, ValueError, OSError) as exc:
            raise FeatureFormatError(f"audio features file is unreadable: {exc}") from None
        if not hop > 0 or not math.isfinite(duration):
            raise FeatureFormatError("audio features have no valid time base")
        return cls(hop, loud, centroid, flux, max(duration, 0.0))

    @property
    def seconds(self) -> int:
        return max(1, math.ceil(self.duration_seconds - 1e-9))

    def per_second(self, values: np.ndarray, *, power_db: bool = False) -> np.ndarray:
        """Frames averaged into 1 s bins; loudness is averaged as power, not as dB."""
        n = self.seconds
        frames_per_s = max(1, round(1.0 / self.hop_seconds))
        v = np.asarray(values, dtype=np.float64)[: n * frames_per_s]
        if power_db:
            v = 10.0 ** (v / 10.0)
        v = np.pad(v, (0, n * frames_per_s - len(v)), constant_values=np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a second past the last frame is all-NaN
            out = np.nanmean(v.reshape(n, frames_per_s), axis=1)
        if power_db:
            out = 10.0 * np.log10(np.maximum(out, 1e-12))
        return out


def loudness_signal(features: AudioFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(loudness score in [0, 1], dB above the trailing baseline) per second.

    Scaling: per-second power-mean dBFS, 3 s centred mean, then `robust_relative` against the
    trailing 5-minute median with a 1.5 dB spread floor: 1.0 = three spreads (typically 10-15 dB)
    above what this stream sounded like in the last five minutes.
    """
    db = centered_mean(np.nan_to_num(features.per_second(features.loudness_dbfs, power_db=True), nan=-90.0), 3)
    median = rolling_quantile(db, BASELINE_SECONDS, 0.5)
    return robust_relative(db, BASELINE_SECONDS, floor=1.5), db - median


def flux_signal(features: AudioFeatures) -> np.ndarray:
    """Spectral flux score in [0, 1]: sudden sounds (explosions, shouting onsets).

    Scaling: log(1 + flux) per second, 3 s centred mean, `robust_relative` against the trailing
    5-minute median with a 0.05 spread floor; 1.0 = three spreads above the recent typical flux.
    """
    if len(features.flux) == 0:
        return np.zeros(features.seconds)
    flux = np.log1p(np.maximum(features.per_second(features.flux), 0.0))
    return robust_relative(centered_mean(np.nan_to_num(flux, nan=0.0), 3), BASELINE_SECONDS, floor=0.05)


@dataclass
class SpeechSignals:
    speech: np.ndarray  # [0, 1] emotional reaction in what the streamer says
    emotions: np.ndarray  # (6, n) EMOTIONS of the speech, 0 where nobody speaks
    present: bool  # anything was said at all


def speech_signal(
    segments: Sequence[Segment],
    seconds: int,
    scorer: TextScorer,
    window_rows: Sequence[dict[str, Any]] | None = None,
    cancelled: threading.Event | None = None,
) -> SpeechSignals:
    """What the streamer says, scored per segment and spread over the seconds it covers.

    Scaling: each segment's `highlight` from the text scorer (its strongest reaction, [0, 1], see
    text_scoring) over the seconds the segment spans. When per-window scores from the transcript
    analysis (sentiment_json, possibly from an LLM) exist, the value is 0.7 * segment + 0.3 *
    window reaction, the window's reaction being max(excitement, funny, anger, sadness,
    0.6 * happiness); without segments, the windows alone. A convex blend of [0, 1] values stays
    in [0, 1].
    """
    seg_value = np.zeros(seconds)
    seg_cover = np.zeros(seconds)
    emotions = np.zeros((len(EMOTIONS), seconds))
    for i, seg in enumerate(segments):
        if i % 256 == 0:
            check(cancelled)
        if not seg.text:
            continue
        a, b = int(seg.start), min(seconds, max(int(seg.start) + 1, math.ceil(seg.end)))
        if a >= seconds:
            continue
        s = scorer.score(seg.text)
        seg_value[a:b] = np.maximum(seg_value[a:b], s.highlight)
        seg_cover[a:b] = 1.0
        vec = np.array([s.excitement, s.funny, s.happiness, s.anger, s.sadness, s.neutral])
        emotions[:, a:b] = np.maximum(emotions[:, a:b], vec[:, None])
    has_segments = bool(seg_cover.any())
    win_value = None
    if window_rows:
        acc, cnt = np.zeros(seconds), np.zeros(seconds)
        for row in window_rows:
            try:
                a, b = int(float(row["start_time"])), min(seconds, math.ceil(float(row["end_time"])))
                if not row.get("text"):
                    continue
                e = [float(row[k]) for k in ("excitement", "funny", "happiness", "anger", "sadness")]
            except (KeyError, TypeError, ValueError):
                continue
            acc[a:b] += max(e[0], e[1], e[3], e[4], 0.6 * e[2])
            cnt[a:b] += 1
        if cnt.any():
            win_value = np.divide(acc, cnt, out=np.zeros(seconds), where=cnt > 0)
    if has_segments and win_value is not None:
        value = 0.7 * seg_value + 0.3 * win_value
    elif has_segments:
        value = seg_value
    elif win_value is not None:
        value = win_value
    else:
        value = np.zeros(seconds)
    return SpeechSignals(np.clip(value, 0.0, 1.0), emotions, has_segments or win_value is not None)


def lag_kernel() -> np.ndarray:
    """Weights for "chat at t + lag reacts to t", lag = 2..20 s.

    Chat typically types 3-8 s after a moment; later messages are weaker evidence for t because
    they may react to something after it: weight 1.0 for 3-8 s, 0.7 at 2 s, falling linearly
    to 0.4 at 20 s.
    """
    lags = np.arange(CHAT_MIN_LAG, CHAT_MAX_LAG + 1, dtype=np.float64)
    w = np.where(lags < 3, 0.7, np.where(lags <= 8, 1.0, 1.0 - 0.6 * (lags - 8) / (CHAT_MAX_LAG - 8)))
    return w


def attribute_back(x: np.ndarray, kernel: np.ndarray | None = None) -> np.ndarray:
    """Move a chat response back to the moment that caused it.

    attributed[t] = max over lag in [2, 20] of kernel[lag] * x[t + lag]: the strongest
    lag-weighted reaction in the window after t is credited to t, so the highlight lands on the
    moment and not on the reaction. Preserves [0, 1].
    """
    kernel = lag_kernel() if kernel is None else kernel
    n = len(x)
    padded = np.concatenate([np.asarray(x, dtype=np.float64), np.zeros(CHAT_MAX_LAG + 1)])
    views = sliding_window_view(padded[CHAT_MIN_LAG:], len(kernel))[:n]  # views[t, j] = x[t + 2 + j]
    return (views * kernel).max(axis=1)


@dataclass
class ChatSignalSet:
    surge: np.ndarray  # [0, 1], lag-attributed
    emotion: np.ndarray  # [0, 1], lag-attributed
    emotions: np.ndarray  # (6, n) mean emotions of the reaction, lag-attributed
    rate: np.ndarray  # messages per second, 5 s mean (not shifted), for explanations
    baseline_rate: np.ndarray  # trailing median of `rate`
    present: bool


def chat_signals(chat: ChatSignals, seconds: int) -> ChatSignalSet:
    """Chat surge and chat emotion, shifted back to the moments they react to.

    chat_surge scaling: messages in a 5 s window against the trailing 5-minute median of that
    count, scored by `poisson_surge` ((count - expected) / sqrt(expected + 1), 1.0 at z >= 6).
    chat_emotion scaling: mean reaction strength (per-message `highlight`, [0, 1]) over the 5 s
    window, shrunk towards the stream's overall mean by 3 pseudo-messages so a lone emote cannot
    max it out, then (value - trailing median) / (1 - trailing median), clipped to [0, 1].
    Both then go through `attribute_back`.
    """
    chat = chat.fit(seconds)
    count5 = np.convolve(chat.count, np.ones(5), mode="same")
    base5 = rolling_quantile(count5, BASELINE_SECONDS, 0.5)
    surge = poisson_surge(count5, base5)
    total = chat.count.sum()
    prior = float(chat.highlight_sum.sum() / total) if total else 0.0
    h5 = np.convolve(chat.highlight_sum, np.ones(5), mode="same")
    mean_h = (h5 + 3.0 * prior) / (count5 + 3.0)
    base_h = rolling_quantile(mean_h, BASELINE_SECONDS, 0.5)
    emotion = np.clip((mean_h - base_h) / np.maximum(1.0 - base_h, 0.05), 0.0, 1.0)
    emo5 = np.stack([np.convolve(row, np.ones(5), mode="same") for row in chat.emotion_sums])
    emotions = np.divide(emo5, count5, out=np.zeros_like(emo5), where=count5 > 0)
    kernel = lag_kernel()
    attributed_emotions = np.stack([attribute_back(row, kernel) for row in emotions])
    return ChatSignalSet(
        surge=attribute_back(surge, kernel),
        emotion=attribute_back(emotion, kernel),
        emotions=attributed_emotions,
        rate=count5 / 5.0,
        baseline_rate=base5 / 5.0,
        present=bool(total > 0),
    )
