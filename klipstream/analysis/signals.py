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

import json
import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from klipstream.analysis.baselines import centered_mean, robust_relative, rolling_quantile
from klipstream.analysis.cancel import check
from klipstream.analysis.chat_scoring import SYSTEM_KINDS, ChatSignals
from klipstream.analysis.lexicon import EMOTIONS
from klipstream.analysis.text_scoring import TextScorer
from klipstream.chat import SystemEvent
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
    voice_dbfs: np.ndarray | None = None  # voice-band level per frame (features of older jobs lack it)
    pitch_hz: np.ndarray | None = None  # fundamental frequency per frame, 0 where not voiced

    @classmethod
    def load(cls, path: Path) -> AudioFeatures:
        try:
            with np.load(path) as z:
                hop = float(z["hop_seconds"])
                loud = np.asarray(z["loudness_dbfs"], dtype=np.float32)
                centroid = np.asarray(z["centroid_hz"], dtype=np.float32)
                flux = np.asarray(z["flux"], dtype=np.float32)
                duration = float(z["duration_seconds"]) if "duration_seconds" in z else len(loud) * hop
                voice = np.asarray(z["voice_dbfs"], dtype=np.float32) if "voice_dbfs" in z else None
                pitch = np.asarray(z["pitch_hz"], dtype=np.float32) if "pitch_hz" in z else None
        except (KeyError, ValueError, OSError) as exc:
            raise FeatureFormatError(f"audio features file is unreadable: {exc}") from None
        if not hop > 0 or not math.isfinite(duration):
            raise FeatureFormatError("audio features have no valid time base")
        return cls(hop, loud, centroid, flux, max(duration, 0.0), voice, pitch)

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
class VoiceSignal:
    score: np.ndarray  # [0, 1]: how much more excited the voice sounds than usual
    level_db_above: np.ndarray  # voice-band level above its trailing median, dB
    pitch_semitones_above: np.ndarray  # median voiced pitch above its trailing median, semitones
    present: bool  # the audio has voiced frames at all


def voice_signal(features: AudioFeatures) -> VoiceSignal | None:
    """Excited or shouted speech from prosody, in [0, 1] per second.

    Per second: the voice-band level (power mean, dBFS), the median pitch of voiced frames
    (semitones) and the pitch range (10th to 90th percentile, semitones). Each is compared with
    the stream's trailing 5-minute median by `robust_relative` (1.0 = three spreads above); the
    score is their mean over seconds with voiced frames, 0 elsewhere. Raised voice, higher pitch
    and a wider melody together are what excitement sounds like, whatever the words.
    """
    if features.voice_dbfs is None or features.pitch_hz is None:
        return None
    n = features.seconds
    frames = max(1, round(1.0 / features.hop_seconds))
    level = np.nan_to_num(features.per_second(features.voice_dbfs, power_db=True), nan=-90.0)
    pitch = np.asarray(features.pitch_hz, dtype=np.float64)[: n * frames]
    pitch = np.pad(pitch, (0, n * frames - len(pitch))).reshape(n, frames)
    semis = np.where(pitch > 0, 12.0 * np.log2(np.maximum(pitch, 1.0) / 100.0), np.nan)
    voiced = np.isfinite(semis).sum(axis=1) >= max(2, frames // 5)
    if not voiced.any():
        return VoiceSignal(np.zeros(n), np.zeros(n), np.zeros(n), False)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(semis, axis=1)
        spread = np.nanpercentile(semis, 90, axis=1) - np.nanpercentile(semis, 10, axis=1)
    median = np.where(voiced, median, np.nan)
    spread = np.where(voiced, spread, np.nan)
    level_v = np.where(voiced, level, np.nan)
    parts = [
        robust_relative(_fill(level_v), BASELINE_SECONDS, floor=1.5),
        robust_relative(_fill(median), BASELINE_SECONDS, floor=0.5),
        robust_relative(_fill(spread), BASELINE_SECONDS, floor=0.5),
    ]
    score = np.where(voiced, np.mean(parts, axis=0), 0.0)
    base_level = rolling_quantile(level_v, BASELINE_SECONDS, 0.5)
    base_pitch = rolling_quantile(median, BASELINE_SECONDS, 0.5)
    return VoiceSignal(
        np.clip(centered_mean(score, 3), 0.0, 1.0),
        np.nan_to_num(level_v - base_level),
        np.nan_to_num(median - base_pitch),
        True,
    )


def _fill(x: np.ndarray) -> np.ndarray:
    """Unvoiced seconds (NaN) take the last voiced value, so baselines see only speech."""
    out = np.asarray(x, dtype=np.float64).copy()
    valid = np.isfinite(out)
    if not valid.any():
        return np.zeros_like(out)
    idx = np.where(valid, np.arange(len(out)), 0)
    np.maximum.accumulate(idx, out=idx)
    out = out[idx]
    first = int(np.argmax(valid))
    out[:first] = out[first]
    return out


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


CHAT_WINDOW = 30  # seconds of chat around a moment that count as its reaction
SURGE_BASELINE_SECONDS = 1200  # trailing span of the chat baseline: slow drift (a raid, a quiet hour) is not a surge
SURGE_PRIOR = 3.0  # chatters added to both sides of the ratio, so a silent chat's first messages are not a sensation
SURGE_FULL_SCALE = 6.0  # robust z-score that maps to 1.0


@dataclass(frozen=True)
class ChatLag:
    """How long this VOD's chat takes to react: the kernel `attribute_back` uses, and where it came from."""

    low: int  # seconds
    high: int
    source: str  # "audio" (measured against this VOD's sound) or "default"
    peak: int | None = None  # the best-aligned lag, when measured


DEFAULT_LAG = ChatLag(CHAT_MIN_LAG, CHAT_MAX_LAG, "default")
LAG_SEARCH = (2, 60)  # bounded range the per-VOD estimate may choose from
LAG_MIN_Z = 20.0  # how far the best lag's agreement must stand above the other lags


def lag_kernel(lag: ChatLag = DEFAULT_LAG) -> np.ndarray:
    """Weights for "chat at t + lag reacts to t", for lag = 0..lag.high.

    Default (no measured lag): chat typically types 3-8 s after a moment; later messages are
    weaker evidence because they may react to something after it: weight 1.0 for 3-8 s, 0.7 at
    2 s, falling linearly to 0.4 at 20 s. With a measured peak lag p, full weight for p-3..p+5,
    falling linearly to 0.4 at the bounds of the range.
    """
    lags = np.arange(0, lag.high + 1, dtype=np.float64)
    if lag.peak is None:
        w = np.where(lags < 3, 0.7, np.where(lags <= 8, 1.0, 1.0 - 0.6 * (lags - 8) / max(1, lag.high - 8)))
    else:
        lo, hi = max(lag.low, lag.peak - 3), min(lag.high, lag.peak + 5)
        w = np.ones_like(lags)
        below, above = lags < lo, lags > hi
        w[below] = 1.0 - 0.6 * (lo - lags[below]) / max(1, lo - lag.low)
        w[above] = 1.0 - 0.6 * (lags[above] - hi) / max(1, lag.high - hi)
    w[lags < lag.low] = 0.0
    return w


def attribute_back(x: np.ndarray, kernel: np.ndarray | None = None) -> np.ndarray:
    """Move a chat response back to the moment that caused it.

    attributed[t] = max over lag of kernel[lag] * x[t + lag]: the strongest lag-weighted
    reaction in the window after t is credited to t, so the highlight lands on the moment and
    not on the reaction. Preserves [0, 1].
    """
    kernel = lag_kernel() if kernel is None else kernel
    n = len(x)
    padded = np.concatenate([np.asarray(x, dtype=np.float64), np.zeros(len(kernel))])
    views = sliding_window_view(padded, len(kernel))[:n]  # views[t, j] = x[t + j]
    return (views * kernel).max(axis=1)


def sliding_chatters(message_seconds: np.ndarray, message_users: np.ndarray, n: int, width: int) -> np.ndarray:
    """Distinct chatters with a message in the `width` seconds centred on each second.

    One user's flood counts once: a message adds one to the windows in which it is its author's
    first message, found from the author's previous message, so this is O(m log m) for m messages.
    """
    if len(message_seconds) == 0 or n <= 0:
        return np.zeros(max(n, 0))
    seconds = message_seconds.astype(np.int64)
    users = message_users.astype(np.int64)
    order = np.lexsort((seconds, users))
    s, u = seconds[order], users[order]
    previous = np.full(len(s), -(10**12), dtype=np.int64)
    same = np.zeros(len(s), dtype=bool)
    same[1:] = u[1:] == u[:-1]
    previous[same] = s[np.flatnonzero(same) - 1]
    half = width // 2
    # A message at s lies in the windows starting (s - width, s]; count it where its author has no
    # earlier message in the same window. Window start i covers the centred span [i-half, i-half+width).
    lo = np.maximum(s - width, previous) + 1 + half
    hi = s + 1 + half
    keep = lo < hi
    diff = np.zeros(n + 1)
    np.add.at(diff, np.clip(lo[keep], 0, n), 1.0)
    np.add.at(diff, np.clip(hi[keep], 0, n), -1.0)
    return np.cumsum(diff)[:n]


@dataclass
class ChatSurge:
    score: np.ndarray  # [0, 1] at chat time (not attributed back)
    chatters: np.ndarray  # distinct chatters in the CHAT_WINDOW around each second
    baseline: np.ndarray  # trailing median of `chatters`
    channel_events: np.ndarray  # bool: chat is answering a gift bomb or a raid, not the stream


CHANNEL_EVENT_BURST = 3  # gift or raid notices within CHANNEL_EVENT_SECONDS that make a burst
CHANNEL_EVENT_SECONDS = 30
CHANNEL_EVENT_ECHO = 60  # seconds chat keeps thanking the gifter or greeting the raiders
CHANNEL_EVENT_DISCOUNT = 0.25


def channel_event_seconds(chat: ChatSignals, seconds: int) -> np.ndarray:
    """Seconds when chat is busy with the channel rather than the stream: within CHANNEL_EVENT_ECHO
    seconds after a burst of gifted subscriptions or a raid (Twitch's notices say so)."""
    kinds = [SYSTEM_KINDS.index(SystemEvent.GIFT.value), SYSTEM_KINDS.index(SystemEvent.RAID.value)]
    notices = chat.system[kinds].sum(axis=0)[:seconds]
    if not notices.any():
        return np.zeros(seconds, dtype=bool)
    recent = np.convolve(notices, np.ones(CHANNEL_EVENT_SECONDS))[: len(notices)]  # notices in [t-29, t]
    raid = chat.system[kinds[1]][:seconds] > 0
    burst = (recent >= CHANNEL_EVENT_BURST) | raid
    echo = np.convolve(burst.astype(np.float64), np.ones(CHANNEL_EVENT_ECHO + 1))[: len(burst)] > 0
    out = np.zeros(seconds, dtype=bool)
    out[: len(echo)] = echo
    return out


def chat_surge(chat: ChatSignals, seconds: int) -> ChatSurge:
    """How far the number of distinct chatters rises above this VOD's recent normal.

    Real chat is over-dispersed (emote walls, copypasta waves, raids), so instead of a Poisson
    z-score, which saturates, the score is a log ratio against the trailing 20-minute median,
    divided by the spread of that ratio over the whole VOD (1.4826 * its median absolute
    deviation, floored at 0.1), and mapped to [0, 1] at SURGE_FULL_SCALE spreads. Counting
    chatters rather than messages means one user's flood is not a reaction. While chat answers a
    gift bomb or a raid (`channel_event_seconds`) the score is discounted to a quarter: those are
    events of the channel, not moments of the stream.
    """
    x = sliding_chatters(chat.message_seconds, chat.message_users, seconds, CHAT_WINDOW)
    base = rolling_quantile(x, SURGE_BASELINE_SECONDS, 0.5)
    ratio = np.log((x + SURGE_PRIOR) / (np.nan_to_num(base, nan=0.0) + SURGE_PRIOR))
    center = float(np.median(ratio)) if len(ratio) else 0.0
    spread = max(0.1, 1.4826 * float(np.median(np.abs(ratio - center)))) if len(ratio) else 1.0
    score = np.clip((ratio - center) / spread / SURGE_FULL_SCALE, 0.0, 1.0)
    events = channel_event_seconds(chat, seconds)
    score = np.where(events, CHANNEL_EVENT_DISCOUNT * score, score)
    return ChatSurge(score, x, base, events)


def estimate_chat_lag(audio_events: np.ndarray, surge: np.ndarray) -> ChatLag:
    """This VOD's chat delay, from how its chat surges line up with its sound.

    Correlates the onsets of chat surges (positive changes of the surge score) with sudden
    sounds (the audio event signal) at every lag in LAG_SEARCH and takes the lag where they agree
    best, if that agreement stands out: LAG_MIN_Z robust spreads (1.4826 * median absolute
    deviation) above the median over all lags, with enough events on both sides. Unrelated sound
    and chat reach 7-13 on generated streams; a real delay 25-45 with ten events or more.
    Otherwise the default kernel stands: a wrong lag moves every highlight, a default one only
    blurs them. Stream delay makes this differ per VOD: from 2-5 s on low-latency streams to over
    30 s on old or re-broadcast ones.
    """
    n = min(len(audio_events), len(surge))
    if n < 600:
        return DEFAULT_LAG
    a = np.asarray(audio_events[:n], dtype=np.float64)
    c = np.clip(np.diff(np.asarray(surge[:n], dtype=np.float64), prepend=0.0), 0.0, None)
    if np.count_nonzero(a > 0.3) < 10 or np.count_nonzero(c > 0.05) < 10:
        return DEFAULT_LAG
    a = a - a.mean()
    c = c - c.mean()
    lo, hi = LAG_SEARCH
    scores = np.array([float(np.dot(a[: n - lag], c[lag:])) for lag in range(lo, hi + 1)])
    best = int(np.argmax(scores))
    center = float(np.median(scores))
    spread = 1.4826 * float(np.median(np.abs(scores - center)))
    if scores[best] <= 0 or spread <= 0 or (scores[best] - center) / spread < LAG_MIN_Z:
        return DEFAULT_LAG
    peak = lo + best
    return ChatLag(max(lo, peak - 8), min(hi, peak + 12), "audio", peak)


@dataclass
class ChatSignalSet:
    surge: np.ndarray  # [0, 1], lag-attributed
    emotion: np.ndarray  # [0, 1], lag-attributed
    emotions: np.ndarray  # (6, n) mean emotions of the reaction, lag-attributed
    categories: np.ndarray  # (len(CATEGORIES), n) category votes of the reaction, lag-attributed
    rate: np.ndarray  # messages per second, 5 s mean (not shifted), for explanations
    baseline_rate: np.ndarray  # trailing median of `rate`
    chatters: np.ndarray  # distinct chatters around each second (not shifted)
    chatters_baseline: np.ndarray
    channel_events: np.ndarray  # bool: chat answers a gift bomb or a raid (not shifted)
    lag: ChatLag
    learned: frozenset[str]  # this VOD's learned reaction tokens
    present: bool


def chat_signals(chat: ChatSignals, seconds: int, lag: ChatLag = DEFAULT_LAG) -> ChatSignalSet:
    """Chat surge and chat reaction, shifted back to the moments they react to.

    chat_surge scaling: see `chat_surge`.
    chat_emotion scaling: mean reaction strength over the 5 s window, shrunk towards the
    stream's overall mean by 3 pseudo-messages so a lone emote cannot max it out, then
    (value - trailing median) / (1 - trailing median), clipped to [0, 1]. A message's strength
    is the lexicon's reaction score (text_scoring's `highlight`), or 0.8 when it carries a
    reaction marker the lexicon does not know (an emote fragment, laughter in any language, a
    burst, a token this VOD's chat uses in its surges).
    Both then go through `attribute_back` with this VOD's lag kernel.
    """
    chat = chat.fit(seconds)
    surge = chat_surge(chat, seconds)
    count5 = np.convolve(chat.count, np.ones(5), mode="same")
    base5 = rolling_quantile(count5, BASELINE_SECONDS, 0.5)
    total = chat.count.sum()
    strength = np.maximum(chat.highlight_sum, 0.8 * chat.reactions)
    prior = float(strength.sum() / total) if total else 0.0
    h5 = np.convolve(strength, np.ones(5), mode="same")
    mean_h = (h5 + 3.0 * prior) / (count5 + 3.0)
    base_h = rolling_quantile(mean_h, BASELINE_SECONDS, 0.5)
    emotion = np.clip((mean_h - base_h) / np.maximum(1.0 - base_h, 0.05), 0.0, 1.0)
    emo5 = np.stack([np.convolve(row, np.ones(5), mode="same") for row in chat.emotion_sums])
    emotions = np.divide(emo5, count5, out=np.zeros_like(emo5), where=count5 > 0)
    kernel = lag_kernel(lag)
    cats = np.stack([np.convolve(row, np.ones(CHAT_WINDOW), mode="same") for row in chat.category_votes])
    return ChatSignalSet(
        surge=attribute_back(surge.score, kernel),
        emotion=attribute_back(emotion, kernel),
        emotions=np.stack([attribute_back(row, kernel) for row in emotions]),
        categories=np.stack([attribute_back(row, kernel) for row in cats]),
        rate=count5 / 5.0,
        baseline_rate=base5 / 5.0,
        chatters=surge.chatters,
        chatters_baseline=surge.baseline,
        channel_events=surge.channel_events,
        lag=lag,
        learned=frozenset(chat.learned_tokens),
        present=bool(total > 0),
    )


@dataclass(frozen=True)
class ViewerClip:
    """A Twitch clip viewers made of this VOD: a moment someone already found worth keeping."""

    offset: float  # seconds into the VOD where the clip starts
    duration: float
    views: int
    title: str = ""


@dataclass
class ViewerMarks:
    score: np.ndarray  # [0, 1]
    clips: np.ndarray  # viewer clips covering each second
    views: np.ndarray  # the most-viewed covering clip's views
    commands: np.ndarray  # `!clip` requests, attributed back to the moment they ask for
    present: bool


def viewer_marks(
    seconds: int, clips: Sequence[ViewerClip], clip_commands: np.ndarray | None, lag: ChatLag
) -> ViewerMarks:
    """Moments viewers marked themselves, as a score in [0, 1].

    A second inside a viewer clip scores 0.5 + 0.5 * log10(1 + views) / 3 (a clip nobody watched
    still marks the moment; a thousand views make it certain). `!clip` requests are credited back
    to the moment like other chat reactions, summed over the reaction window: one request scores
    0.5, two or more 1.0. The signal is the larger of the two.
    """
    covered = np.zeros(seconds)
    views = np.zeros(seconds)
    for clip in clips:
        a = max(0, int(clip.offset))
        b = min(seconds, max(a + 1, math.ceil(clip.offset + clip.duration)))
        if a >= seconds:
            continue
        covered[a:b] += 1
        views[a:b] = np.maximum(views[a:b], clip.views)
    clip_score = np.where(covered > 0, 0.5 + 0.5 * np.minimum(1.0, np.log10(1.0 + views) / 3.0), 0.0)
    commands = np.zeros(seconds)
    if clip_commands is not None and len(clip_commands):
        c = np.zeros(seconds)
        m = min(seconds, len(clip_commands))
        c[:m] = clip_commands[:m]
        kernel = (lag_kernel(lag) > 0).astype(np.float64)
        padded = np.concatenate([c, np.zeros(len(kernel))])
        commands = (sliding_window_view(padded, len(kernel))[:seconds] * kernel).sum(axis=1)
    score = np.maximum(clip_score, np.minimum(1.0, 0.5 * commands))
    return ViewerMarks(score, covered, views, commands, bool(covered.any() or commands.any()))


def load_viewer_clips(path: Path) -> list[ViewerClip]:
    """The viewer clips file the chat stage writes (a JSON list of clips)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = []
    for item in data.get("clips") or []:
        try:
            out.append(
                ViewerClip(
                    float(item["vod_offset"]), float(item["duration"]), int(item["views"]), str(item.get("title") or "")
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out
