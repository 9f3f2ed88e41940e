"""Highlight detection: fuse the signals, pick separated peaks, cut clips at speech pauses, explain.

Pipeline (all on the 1 s grid of signals.py):
1. fuse: score[t] = sum(w_i * s_i[t]) / sum(w_i over present signals), smoothed over 5 s. Every
   s_i is in [0, 1], so the score is in [0, 1]; a missing modality (no chat, no speech) drops out
   of the denominator instead of counting as zero evidence.
2. candidates: local maxima of the score.
3. clip extent: grow from the peak while the score stays above halfway between the stream's
   median score and the peak, then add context before the moment; bounded length.
4. non-maximum suppression: a candidate is dropped when its peak is within `min_separation` of
   a better one or its clip overlaps a better one's, so near-duplicates cannot fill the top N.
5. boundary snapping: clip edges move to the nearest pause between words (never into a word).
6. explanation: each signal's contribution (they add up to the score) and one sentence.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klipstream.analysis.baselines import centered_mean
from klipstream.analysis.lexicon import EMOTIONS
from klipstream.analysis.reactions import CATEGORIES, canonical, classify_message, dominant_category
from klipstream.analysis.signals import ChatSignalSet, SpeechSignals, ViewerMarks, VoiceSignal
from klipstream.chat import ChatMessage
from klipstream.transcript import Segment

WEIGHTS: dict[str, float] = {
    "loudness": 0.15,
    "flux": 0.10,
    "speech": 0.30,
    "voice": 0.20,
    "chat_surge": 0.45,
    "viewer_marks": 0.30,
}
"""Fusion weights. Chat gets the most because viewers reacting is the best evidence of a moment
worth clipping; moments viewers marked themselves (Twitch clips of the VOD, `!clip` requests)
count as much as the streamer's own words; the streamer's voice (prosody: raised level, higher
pitch, wider melody) a little less; audio the least because loud is often just loud (cutscenes,
music). What chat says (its reaction vocabulary, emotions) names the moment's
category and emotion but does not rank it: on real labelled chat, weighting it in made the
ranking worse at every weight tried (docs/decisions.md, "Highlights on real chat")."""


@dataclass
class Timeline:
    """The fused per-second table."""

    seconds: int
    signals: dict[str, np.ndarray]  # present signals only, each [0, 1]
    weights: dict[str, float]  # renormalised over present signals, sum 1
    score: np.ndarray  # [0, 1], smoothed
    emotions: np.ndarray  # (6, n) combined speech + chat emotions for dominant_emotion
    loudness_db_above: np.ndarray  # dB above the trailing median, for explanations
    chat: ChatSignalSet | None = None
    marks: ViewerMarks | None = None
    voice: VoiceSignal | None = None

    def contributions(self, t: int) -> dict[str, float]:
        return {k: self.weights[k] * float(centered_mean(v, 5)[t]) for k, v in self.signals.items()}


def fuse(
    audio: dict[str, np.ndarray],
    loudness_db_above: np.ndarray,
    speech: SpeechSignals | None,
    chat: ChatSignalSet | None,
    weights: dict[str, float] | None = None,
    marks: ViewerMarks | None = None,
    voice: VoiceSignal | None = None,
) -> Timeline:
    weights = dict(weights or WEIGHTS)
    seconds = len(loudness_db_above)
    signals: dict[str, np.ndarray] = {"loudness": audio["loudness"], "flux": audio["flux"]}
    emotion_parts = []
    if speech is not None and speech.present:
        signals["speech"] = speech.speech
        emotion_parts.append(speech.emotions)
    if chat is not None and chat.present:
        signals["chat_surge"] = chat.surge
        emotion_parts.append(chat.emotions)
    if marks is not None and marks.present:
        signals["viewer_marks"] = marks.score[:seconds]
    if voice is not None and voice.present:
        signals["voice"] = voice.score[:seconds]
    present = {k: weights[k] for k in signals}
    total = sum(present.values())
    present = {k: w / total for k, w in present.items()}
    raw = sum(present[k] * np.asarray(v, dtype=np.float64)[:seconds] for k, v in signals.items())
    score = np.clip(centered_mean(np.asarray(raw), 5), 0.0, 1.0)
    emotions = np.mean(emotion_parts, axis=0) if emotion_parts else np.zeros((len(EMOTIONS), seconds))
    return Timeline(
        seconds,
        signals,
        present,
        score,
        emotions,
        loudness_db_above,
        chat if chat and chat.present else None,
        marks if marks is not None and marks.present else None,
        voice if voice is not None and voice.present else None,
    )


@dataclass(frozen=True, slots=True)
class Candidate:
    peak: int  # second of the local maximum
    start: float
    end: float
    score: float


def local_maxima(score: np.ndarray, limit: int = 2000) -> np.ndarray:
    """Indices of local maxima (plateaus give their first sample), best `limit` first."""
    s = np.asarray(score)
    if len(s) == 0:
        return np.array([], dtype=np.int64)
    left = np.concatenate(([-np.inf], s[:-1]))
    right = np.concatenate((s[1:], [-np.inf]))
    idx = np.flatnonzero((s > left) & (s >= right) & (s > 0))
    order = np.argsort(-s[idx], kind="stable")
    return idx[order][:limit]


def clip_extent(
    score: np.ndarray,
    peak: int,
    *,
    floor: float,
    max_before: int = 20,
    max_after: int = 25,
    pre_roll: float = 5.0,
    post_roll: float = 3.0,
    min_length: float = 15.0,
    max_length: float = 60.0,
) -> tuple[float, float]:
    """The stretch around `peak` where the score stays above halfway from `floor` to the peak.

    The pre-roll gives a viewer the seconds of context before the moment a clip needs.
    """
    n = len(score)
    threshold = floor + 0.5 * (score[peak] - floor)
    lo = peak
    while lo > 0 and peak - lo < max_before and score[lo - 1] >= threshold:
        lo -= 1
    hi = peak
    while hi < n - 1 and hi - peak < max_after and score[hi + 1] >= threshold:
        hi += 1
    start, end = lo - pre_roll, hi + 1 + post_roll
    if end - start < min_length:
        pad = (min_length - (end - start)) / 2
        start, end = start - pad, end + pad
    if end - start > max_length:
        start, end = max(start, peak - max_length / 2), min(end, peak + max_length / 2)
    duration = float(n)
    if start < 0:
        end, start = min(duration, end - start), 0.0
    if end > duration:
        start, end = max(0.0, start - (end - duration)), duration
    return float(start), float(end)


def non_max_suppression(candidates: Sequence[Candidate], min_separation: float, limit: int) -> list[Candidate]:
    """Greedy NMS: best first; skip any candidate near (peak distance) or overlapping a kept one."""
    kept: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: -c.score):
        if len(kept) >= limit:
            break
        if any(abs(c.peak - k.peak) < min_separation or (c.start < k.end and k.start < c.end) for k in kept):
            continue
        kept.append(c)
    return kept


def speech_pauses(segments: Sequence[Segment], min_gap: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(word starts, word ends) of all words in time order; pauses are the gaps between them."""
    words = sorted((w.start, w.end) for seg in segments for w in seg.words if w.end >= w.start)
    if not words:
        return np.array([]), np.array([])
    arr = np.array(words, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def snap_to_pauses(
    start: float,
    end: float,
    word_starts: np.ndarray,
    word_ends: np.ndarray,
    *,
    max_shift: float = 4.0,
    min_gap: float = 0.3,
    margin: float = 0.2,
) -> tuple[float, float]:
    """Move clip edges into pauses between words so a clip never starts or ends mid-word.

    The start moves to just before the first word after a pause (gap >= `min_gap`) found within
    `max_shift` seconds earlier (preferred: more context) or later; the end to just after the last
    word before a pause, searching later first. Without a pause in reach an edge that falls inside
    a word moves to that word's boundary; without words nothing moves.
    """
    if len(word_starts) == 0:
        return start, end
    # Pauses: (gap_start, gap_end); include the silence before the first and after the last word.
    gap_starts = np.concatenate(([-math.inf], word_ends))
    gap_ends = np.concatenate((word_starts, [math.inf]))
    pause = (gap_ends - gap_starts) >= min_gap
    gs, ge = gap_starts[pause], gap_ends[pause]

    def snap_start(t: float) -> float:
        # candidate positions: the end of each pause (just before the next word starts)
        pos = ge - margin
        ok = np.isfinite(ge) & (pos >= t - max_shift) & (pos <= t + max_shift)
        if ok.any():
            choices = pos[ok]
            earlier = choices[choices <= t + 1e-9]
            return float(max(0.0, earlier.max() if len(earlier) else choices.min()))
        inside = np.flatnonzero((word_starts < t) & (word_ends > t))
        if not len(inside):
            return t
        i = int(inside[0])
        gap = word_starts[i] - word_ends[i - 1] if i > 0 else margin * 2
        return float(max(0.0, word_starts[i] - min(margin, max(gap, 0.0) / 2)))

    def snap_end(t: float) -> float:
        pos = gs + margin
        ok = np.isfinite(gs) & (pos >= t - max_shift) & (pos <= t + max_shift)
        if ok.any():
            choices = pos[ok]
            later = choices[choices >= t - 1e-9]
            return float(later.min() if len(later) else choices.max())
        inside = np.flatnonzero((word_starts < t) & (word_ends > t))
        if not len(inside):
            return t
        i = int(inside[-1])
        gap = word_starts[i + 1] - word_ends[i] if i + 1 < len(word_starts) else margin * 2
        return float(word_ends[i] + min(margin, max(gap, 0.0) / 2))

    new_start, new_end = snap_start(start), snap_end(end)
    if new_end - new_start < 5.0:  # snapping must not collapse the clip
        return start, end
    return new_start, new_end


@dataclass
class Highlight:
    rank: int
    start_time: float
    end_time: float
    peak_time: float
    score: float
    dominant_emotion: str
    category: str | None  # hype, funny, fail, clutch, wholesome, rage, scary; None without evidence
    category_confidence: float
    contributions: dict[str, float]
    reason: str
    transcript_excerpt: str
    chat_samples: list[str]
    audience_reaction: float | None
    streamer_emotion_intensity: float
    evidence: dict[str, Any] = field(default_factory=dict)  # the measured facts behind the reason
    signals: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "start_time": round(self.start_time, 2),
            "end_time": round(self.end_time, 2),
            "duration": round(self.end_time - self.start_time, 2),
            "peak_time": round(self.peak_time, 2),
            "score": round(self.score, 4),
            "category": self.category,
            "category_confidence": round(self.category_confidence, 4),
            "dominant_emotion": self.dominant_emotion,
            "contributions": {k: round(v, 4) for k, v in self.contributions.items()},
            "signals": {k: round(v, 4) for k, v in self.signals.items()},
            "evidence": self.evidence,
            "reason": self.reason,
            "transcript_excerpt": self.transcript_excerpt,
            "chat_samples": self.chat_samples,
            "audience_reaction": None if self.audience_reaction is None else round(self.audience_reaction, 4),
            "streamer_emotion_intensity": round(self.streamer_emotion_intensity, 4),
        }


ChatSamples = Callable[[float, float], list[ChatMessage]]
"""The chat messages in [start, end), read from wherever the chat lives."""


def detect(
    timeline: Timeline,
    top_n: int,
    *,
    segments: Sequence[Segment] = (),
    samples: ChatSamples | None = None,
    min_separation: float = 60.0,
) -> list[Highlight]:
    """The top `top_n` highlights of a fused timeline, ranked, snapped and explained."""
    score = timeline.score
    if timeline.seconds == 0 or not score.any():
        return []
    floor = float(np.median(score))
    candidates = []
    for peak in local_maxima(score):
        start, end = clip_extent(score, int(peak), floor=floor)
        candidates.append(Candidate(int(peak), start, end, float(score[peak])))
    chosen = non_max_suppression(candidates, min_separation, top_n)
    word_starts, word_ends = speech_pauses(segments)
    smoothed = {k: centered_mean(v, 5) for k, v in timeline.signals.items()}
    out = []
    for rank, c in enumerate(chosen, start=1):
        start, end = snap_to_pauses(c.start, c.end, word_starts, word_ends)
        values = {k: float(v[c.peak]) for k, v in smoothed.items()}
        raw_contrib = {k: timeline.weights[k] * values[k] for k in values}
        total = sum(raw_contrib.values())
        contributions = {k: (v / total * c.score if total > 0 else 0.0) for k, v in raw_contrib.items()}
        emotion = _dominant_emotion(timeline.emotions, int(start), math.ceil(end))
        excerpt = _excerpt(segments, start, end)
        reaction = _reaction_messages(timeline, samples, c.peak, end)
        chat_texts = _chat_samples(reaction)
        evidence = _evidence(timeline, c.peak, reaction)
        category, confidence = _category(timeline, c.peak, excerpt)
        audience = values.get("chat_surge")
        shares = {"speech": 0.5, "voice": 0.3, "loudness": 0.2}
        present = {k: w for k, w in shares.items() if k in values}
        streamer = sum(w * values[k] for k, w in present.items()) / sum(present.values())
        out.append(
            Highlight(
                rank=rank,
                start_time=start,
                end_time=end,
                peak_time=float(c.peak),
                score=c.score,
                dominant_emotion=emotion,
                category=category,
                category_confidence=confidence,
                contributions=contributions,
                reason=_reason(timeline, c.peak, contributions, evidence, category, excerpt),
                transcript_excerpt=excerpt,
                chat_samples=chat_texts,
                audience_reaction=audience,
                streamer_emotion_intensity=streamer,
                evidence=evidence,
                signals=values,
            )
        )
    return out


def _dominant_emotion(emotions: np.ndarray, a: int, b: int) -> str:
    """The strongest non-neutral emotion over the clip; "neutral" when none reaches 0.2."""
    b = max(b, a + 1)
    mean = emotions[:5, a:b].mean(axis=1) if emotions.shape[1] >= b else emotions[:5, a:].mean(axis=1)
    if not np.isfinite(mean).all() or mean.max(initial=0.0) < 0.2:
        return "neutral"
    return EMOTIONS[int(np.argmax(mean))]


def _excerpt(segments: Sequence[Segment], start: float, end: float, limit: int = 280) -> str:
    words = [
        w.word.strip()
        for seg in segments
        if seg.end > start and seg.start < end
        for w in seg.words
        if start <= w.start < end
    ]
    if not words:
        words = [seg.text for seg in segments if seg.end > start and seg.start < end]
    text = " ".join(w for w in words if w).strip()
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def _reaction_window(timeline: Timeline, peak: int, end: float) -> tuple[float, float]:
    """Where chat reacts to a moment at `peak`: its lag range after it."""
    lag = timeline.chat.lag if timeline.chat is not None else None
    low, high = (lag.low, lag.high) if lag is not None else (2, 20)
    return peak + low, max(end, peak + high)


def _reaction_messages(timeline: Timeline, samples: ChatSamples | None, peak: int, end: float) -> list[ChatMessage]:
    if samples is None or timeline.chat is None:
        return []
    start, stop = _reaction_window(timeline, peak, end)
    return samples(start, stop)


def _chat_samples(messages: Sequence[ChatMessage], k: int = 5) -> list[str]:
    """The most repeated messages of the reaction."""
    counts = Counter(m.text.strip() for m in messages if m.text.strip() and m.system is None)
    return [text for text, _ in counts.most_common(k)]


def _evidence(timeline: Timeline, peak: int, reaction: Sequence[ChatMessage]) -> dict[str, Any]:
    """The measured facts a reason may cite."""
    out: dict[str, Any] = {}
    chat = timeline.chat
    if chat is not None:
        lo, hi = peak + chat.lag.low, min(timeline.seconds, peak + chat.lag.high + 1)
        if hi > lo:
            best = lo + int(np.argmax(chat.chatters[lo:hi]))
            out["chatters"] = round(float(chat.chatters[best]))
            out["usual_chatters"] = round(float(chat.chatters_baseline[best]), 1)
            out["chat_lag_seconds"] = best - peak
            if chat.channel_events[lo:hi].any():
                out["during_gift_bomb_or_raid"] = True
        out["chat_lag_source"] = chat.lag.source
        tokens = Counter(
            token for m in reaction for token in {canonical(w) for w in m.text.split()} if token in chat.learned
        )
        if tokens:
            out["reaction_tokens"] = [t for t, _ in tokens.most_common(3)]
    marks = timeline.marks
    if marks is not None:
        window = slice(max(0, peak - 5), min(timeline.seconds, peak + 30))
        clips = int(marks.clips[window].max(initial=0))
        if clips:
            out["viewer_clips"] = clips
            out["viewer_clip_views"] = int(marks.views[window].max(initial=0))
        requests = round(float(marks.commands[peak]))
        if requests:
            out["clip_requests"] = requests
    db = float(timeline.loudness_db_above[peak])
    if db >= 3.0:
        out["loudness_db_above_usual"] = round(db, 1)
    voice = timeline.voice
    if voice is not None:
        window = slice(max(0, peak - 3), min(timeline.seconds, peak + 6))
        pitch = float(voice.pitch_semitones_above[window].max(initial=0.0))
        level = float(voice.level_db_above[window].max(initial=0.0))
        if pitch >= 1.0:
            out["voice_pitch_semitones_above_usual"] = round(pitch, 1)
        if level >= 3.0:
            out["voice_db_above_usual"] = round(level, 1)
    return out


def _category(timeline: Timeline, peak: int, excerpt: str) -> tuple[str | None, float]:
    """The category the moment's reaction votes for: chat's votes in its reaction window, plus the
    streamer's own words in the clip (counted like a chatter's)."""
    votes = np.zeros(len(CATEGORIES))
    if timeline.chat is not None:
        votes += timeline.chat.categories[:, peak]
    if excerpt:
        for category in classify_message(excerpt, 0).categories:
            votes[CATEGORIES.index(category)] += 1.0
    category, confidence = dominant_category(votes)
    return (category.value if category is not None else None), confidence


def _reason(
    timeline: Timeline,
    peak: int,
    contributions: dict[str, float],
    evidence: dict[str, Any],
    category: str | None,
    excerpt: str,
) -> str:
    """One sentence naming the signals that carried the pick, with their evidence."""
    ranked = sorted(contributions.items(), key=lambda kv: -kv[1])
    total = sum(contributions.values()) or 1.0
    parts: list[str] = []
    for name, value in ranked:
        if value < 0.15 * total and parts:
            break
        if name == "chat_surge" and "chatters" in evidence:
            usual = evidence["usual_chatters"]
            ratio = evidence["chatters"] / usual if usual > 0 else math.inf
            part = f"{evidence['chatters']} people wrote in chat within half a minute" + (
                f" ({ratio:.1f}x the usual {usual:.0f})" if math.isfinite(ratio) else " after a quiet stretch"
            )
            if evidence.get("reaction_tokens"):
                part += ", reacting with " + ", ".join(evidence["reaction_tokens"])
            parts.append(part)
        elif name == "viewer_marks":
            if "viewer_clips" in evidence:
                views = evidence.get("viewer_clip_views", 0)
                parts.append(f"viewers clipped it ({views:,} views)")
            if "clip_requests" in evidence:
                parts.append(f"{evidence['clip_requests']} viewers asked for a clip")
        elif name == "voice" and (
            "voice_pitch_semitones_above_usual" in evidence or "voice_db_above_usual" in evidence
        ):
            bits = []
            if "voice_pitch_semitones_above_usual" in evidence:
                bits.append(f"rose {evidence['voice_pitch_semitones_above_usual']:.0f} semitones")
            if "voice_db_above_usual" in evidence:
                bits.append(f"got {evidence['voice_db_above_usual']:.0f} dB louder")
            parts.append("the streamer's voice " + " and ".join(bits))
        elif name == "speech":
            words = f' ("{excerpt[:60].rstrip()}…")' if excerpt else ""
            parts.append(f"the streamer reacted{words}")
        elif name == "loudness" and "loudness_db_above_usual" in evidence:
            parts.append(f"the audio was {evidence['loudness_db_above_usual']:.0f} dB above the stream's usual level")
        elif name == "flux":
            parts.append("there was a burst of sudden sound")
        if len(parts) >= 3:
            break
    if not parts:
        return "Picked as the strongest remaining peak of the combined signals."
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return "Picked because " + body + "."
