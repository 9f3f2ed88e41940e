"""Stage highlights: fuse audio, speech and chat into one timeline and pick the top moments.

Needs only the audio features; transcript, transcript sentiment and chat are used when they
exist, so a VOD without chat (or without speech) still gets highlights.
"""

from __future__ import annotations

import csv
import json
import math
from typing import Any

import numpy as np

from klipstream.acquisition.chat_archive import read_chat_json
from klipstream.analysis.chat_scoring import ChatSignals, filter_messages
from klipstream.analysis.highlights import Highlight, Timeline
from klipstream.analysis.lexicon import EMOTIONS
from klipstream.analysis.pipeline import analyze_chat, build_timeline, find_highlights
from klipstream.analysis.signals import AudioFeatures, FeatureFormatError
from klipstream.chat import ChatMessage
from klipstream.errors import InternalError, InvalidVideoUrl
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from klipstream.transcript import Segment, load_segments

TOP_HIGHLIGHTS_COLUMNS = (
    "rank",
    "start_time",
    "end_time",
    "duration",
    "start_timestamp",
    "end_timestamp",
    "highlight_score",
    "dominant_emotion",
    "audience_reaction",
    "streamer_emotion_intensity",
    "content",
)
INTEGRATED_GRID_SECONDS = 5


def timestamp(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def integrated_table(timeline: Timeline, video_id: str) -> dict[str, Any]:
    """The fused timeline as JSON: one row per 5 s window (means of the per-second values)."""
    g = INTEGRATED_GRID_SECONDS
    n = timeline.seconds
    windows = math.ceil(n / g)

    def blocks(a: np.ndarray) -> np.ndarray:
        padded = np.pad(np.asarray(a, dtype=np.float64)[:n], (0, windows * g - n), constant_values=np.nan)
        return np.nanmean(padded.reshape(windows, g), axis=1)

    score = blocks(timeline.score)
    signals = {k: blocks(v) for k, v in timeline.signals.items()}
    emotions = np.stack([blocks(row) for row in timeline.emotions])
    rows = []
    for w in range(windows):
        row: dict[str, Any] = {
            "start_time": float(w * g),
            "end_time": float(min(n, (w + 1) * g)),
            "highlight_score": round(float(score[w]), 4),
        }
        row.update({k: round(float(v[w]), 4) for k, v in signals.items()})
        row.update({name: round(float(emotions[k, w]), 4) for k, name in enumerate(EMOTIONS)})
        rows.append(row)
    return {
        "video_id": video_id,
        "grid_seconds": g,
        "duration_seconds": n,
        "signals": list(timeline.signals),
        "weights": {k: round(v, 4) for k, v in timeline.weights.items()},
        "scaling": "every signal is in [0, 1]; see klipstream/analysis/signals.py for each one's scaling",
        "windows": rows,
    }


def top_rows(highlights: list[Highlight]) -> list[dict[str, Any]]:
    return [
        {
            "rank": h.rank,
            "start_time": round(h.start_time, 2),
            "end_time": round(h.end_time, 2),
            "duration": round(h.end_time - h.start_time, 2),
            "start_timestamp": timestamp(h.start_time),
            "end_timestamp": timestamp(h.end_time),
            "highlight_score": round(h.score, 4),
            "dominant_emotion": h.dominant_emotion,
            "audience_reaction": "" if h.audience_reaction is None else round(h.audience_reaction, 4),
            "streamer_emotion_intensity": round(h.streamer_emotion_intensity, 4),
            "content": h.transcript_excerpt or "; ".join(h.chat_samples),
        }
        for h in highlights
    ]


def _analyse(ctx: StageContext, top_n: int) -> tuple[Timeline, list[Highlight]]:
    features = AudioFeatures.load(ctx.input("features"))
    transcript = ctx.optional_input("transcript_json")
    segments: list[Segment] = load_segments(transcript) if transcript else []
    sentiment_rows = None
    sentiment = ctx.optional_input("sentiment_json")
    if sentiment:
        with open(sentiment, encoding="utf-8") as f:
            sentiment_rows = json.load(f)
    messages: list[ChatMessage] = []
    chat_signals: ChatSignals | None = None
    chat_json = ctx.optional_input("chat_json")
    signals_path = ctx.optional_input("chat_signals")
    if signals_path:
        chat_signals = ChatSignals.load(signals_path)
        messages = chat_signals.messages
    elif chat_json:
        messages, _ = filter_messages(read_chat_json(chat_json), ctx.settings.bot_accounts)
        chat_signals = analyze_chat(messages, features.duration_seconds, (), cancelled=ctx.cancelled).signals
    timeline = build_timeline(features, segments, chat_signals, sentiment_rows=sentiment_rows, cancelled=ctx.cancelled)
    return timeline, find_highlights(timeline, top_n, segments, messages)


def _write(ctx: StageContext, timeline: Timeline, highlights: list[Highlight]) -> None:
    with open(ctx.output_path("integrated_json"), "w", encoding="utf-8") as f:
        json.dump(integrated_table(timeline, ctx.video_id), f, allow_nan=False)
    with open(ctx.output_path("highlights_json"), "w", encoding="utf-8") as f:
        doc = {
            "video_id": ctx.video_id,
            "signals": list(timeline.signals),
            "highlights": [h.to_dict() for h in highlights],
        }
        json.dump(doc, f, ensure_ascii=False, allow_nan=False)
    with open(ctx.output_path("top_highlights_csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TOP_HIGHLIGHTS_COLUMNS)
        writer.writeheader()
        writer.writerows(top_rows(highlights))


async def run(ctx: StageContext) -> None:
    top_n = ctx.options.top_n or ctx.settings.top_highlights
    ctx.progress(0.0, "fusing audio, speech and chat")
    try:
        timeline, highlights = await ctx.to_thread(_analyse, ctx, top_n)
    except (FeatureFormatError, InvalidVideoUrl) as exc:
        raise InternalError(f"An input of the highlight detection is malformed: {exc}.") from None
    ctx.progress(0.8, "writing highlights")
    await ctx.to_thread(_write, ctx, timeline, highlights)
    for key in ("integrated_json", "highlights_json", "top_highlights_csv"):
        ctx.add_artifact(key)
    ctx.set_highlights([h.to_dict() for h in highlights])
    missing = [
        name for name, ok in (("chat", timeline.chat is not None), ("speech", "speech" in timeline.signals)) if not ok
    ]
    count = len(highlights)
    detail = f"{count} highlight{'' if count == 1 else 's'}"
    if missing:
        detail += f" (without {' and '.join(missing)})"
    ctx.progress(1.0, detail)


HIGHLIGHTS = Stage(
    name="highlights",
    display=DisplayStage.FINDING_HIGHLIGHTS,
    run=run,
    needs=("features",),
    uses=("transcript_json", "sentiment_json", "chat_json", "chat_signals"),
    provides=("integrated_json", "highlights_json", "top_highlights_csv"),
    weight=1.0,
    resource=Resource.CPU,
)
