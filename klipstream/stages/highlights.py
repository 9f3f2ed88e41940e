"""Stage highlights: fuse audio, speech, chat and viewers' own clips into one timeline and pick the
top moments.

Needs only the audio features; transcript, transcript sentiment, chat and viewer clips are used
when they exist, so a VOD without chat (or without speech) still gets highlights. The work runs in
a child process (`python -m klipstream.stages.highlights`): it reads whole transcript and
sentiment documents, which would otherwise hold this process's GIL.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from klipstream.acquisition.chat_archive import iter_chat, iter_chat_file, read_messages_at
from klipstream.analysis.chat_scoring import ChatSignals
from klipstream.analysis.highlights import ChatSamples, Highlight, Timeline
from klipstream.analysis.lexicon import EMOTIONS
from klipstream.analysis.pipeline import analyze_chat, build_timeline, find_highlights
from klipstream.analysis.signals import AudioFeatures, FeatureFormatError, load_viewer_clips
from klipstream.chat import ChatMessage
from klipstream.errors import InternalError, InvalidVideoUrl
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from klipstream.proc import child_main, report, run_python
from klipstream.transcript import Segment, TranscriptFormatError, load_segments

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


def _analyse(args: argparse.Namespace) -> tuple[Timeline, list[Highlight]]:
    features = AudioFeatures.load(args.features)
    segments: list[Segment] = load_segments(args.transcript) if args.transcript else []
    sentiment_rows = None
    if args.sentiment:
        with open(args.sentiment, encoding="utf-8") as f:
            sentiment_rows = json.load(f)
    chat: ChatSignals | None = None
    if args.chat_signals:
        chat = ChatSignals.load(args.chat_signals)
    elif args.chat_json:  # the chat exists but was not analysed (a resumed job of an older version)
        path = args.chat_json
        chat = analyze_chat(lambda: iter_chat_file(path), features.duration_seconds, args.bots.split(",")).signals
    report(0.4, "fusing audio, speech and chat")
    clips = load_viewer_clips(args.viewer_clips) if args.viewer_clips else []
    timeline = build_timeline(features, segments, chat, sentiment_rows=sentiment_rows, viewer_clips=clips)
    samples = _chat_reader(args.chat_json, chat) if args.chat_json and chat is not None else None
    return timeline, find_highlights(timeline, args.top_n, segments, samples)


def _chat_reader(path: Path, chat: ChatSignals) -> ChatSamples:
    """Chat messages in [start, stop), read from the artifact at the byte offset of `start`."""

    def read(start: float, stop: float) -> list[ChatMessage]:
        second = max(0, int(start))
        if second < len(chat.offsets) and chat.offsets[second] >= 0:
            found = read_messages_at(path, int(chat.offsets[second]), stop)
        else:  # an archive not written one comment per line: stream it
            found = [m for m in iter_chat(path) if start <= m.time < stop]
        return [m for m in found if m.time >= start]

    return read


def _write(args: argparse.Namespace, timeline: Timeline, highlights: list[Highlight]) -> None:
    with open(args.integrated, "w", encoding="utf-8") as f:
        json.dump(integrated_table(timeline, args.video_id), f, allow_nan=False)
    with open(args.highlights, "w", encoding="utf-8") as f:
        doc = {
            "video_id": args.video_id,
            "signals": list(timeline.signals),
            "chat_lag": None if timeline.chat is None else asdict(timeline.chat.lag),
            "highlights": [h.to_dict() for h in highlights],
        }
        json.dump(doc, f, ensure_ascii=False, allow_nan=False)
    with open(args.top_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TOP_HIGHLIGHTS_COLUMNS)
        writer.writeheader()
        writer.writerows(top_rows(highlights))


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="highlights")
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--transcript", type=Path)
    parser.add_argument("--sentiment", type=Path)
    parser.add_argument("--chat-json", type=Path)
    parser.add_argument("--chat-signals", type=Path)
    parser.add_argument("--viewer-clips", type=Path)
    parser.add_argument("--bots", default="")
    parser.add_argument("--top-n", type=int, required=True)
    parser.add_argument("--video-id", required=True)
    parser.add_argument("--integrated", type=Path, required=True)
    parser.add_argument("--highlights", type=Path, required=True)
    parser.add_argument("--top-csv", type=Path, required=True)
    args = parser.parse_args(argv)
    report(0.05, "reading the inputs")
    try:
        timeline, highlights = _analyse(args)
    except (FeatureFormatError, TranscriptFormatError, InvalidVideoUrl, ValueError, KeyError) as exc:
        raise InternalError(f"An input of the highlight detection is malformed: {exc}.") from None
    report(0.8, "writing highlights")
    _write(args, timeline, highlights)
    missing = [
        name for name, ok in (("chat", timeline.chat is not None), ("speech", "speech" in timeline.signals)) if not ok
    ]
    result = {"highlights": [h.to_dict() for h in highlights], "missing": missing}
    print(json.dumps({"result": result}, ensure_ascii=False), flush=True)


async def run(ctx: StageContext) -> None:
    top_n = ctx.options.top_n or ctx.settings.top_highlights
    ctx.progress(0.0, "fusing audio, speech and chat")
    args = [
        "--features",
        str(ctx.input("features")),
        "--bots",
        ",".join(ctx.settings.bot_accounts),
        "--top-n",
        str(top_n),
        "--video-id",
        ctx.video_id,
        "--integrated",
        str(ctx.output_path("integrated_json")),
        "--highlights",
        str(ctx.output_path("highlights_json")),
        "--top-csv",
        str(ctx.output_path("top_highlights_csv")),
    ]
    for flag, key in (
        ("--transcript", "transcript_json"),
        ("--sentiment", "sentiment_json"),
        ("--chat-json", "chat_json"),
        ("--chat-signals", "chat_signals"),
        ("--viewer-clips", "viewer_clips"),
    ):
        path = ctx.optional_input(key)
        if path is not None:
            args += [flag, str(path)]
    result = await run_python(__name__, args, timeout=ctx.settings.stage_timeout_seconds, on_progress=ctx.progress)
    for key in ("integrated_json", "highlights_json", "top_highlights_csv"):
        ctx.add_artifact(key)
    highlights = result["highlights"]
    ctx.set_highlights(highlights)
    count = len(highlights)
    detail = f"{count} highlight{'' if count == 1 else 's'}"
    if result["missing"]:
        detail += f" (without {' and '.join(result['missing'])})"
    ctx.progress(1.0, detail)


HIGHLIGHTS = Stage(
    name="highlights",
    display=DisplayStage.FINDING_HIGHLIGHTS,
    run=run,
    needs=("features",),
    uses=("transcript_json", "sentiment_json", "chat_json", "chat_signals", "viewer_clips"),
    provides=("integrated_json", "highlights_json", "top_highlights_csv"),
    weight=1.0,
    resource=Resource.CPU,
)


if __name__ == "__main__":
    child_main(_child, sys.argv[1:])
