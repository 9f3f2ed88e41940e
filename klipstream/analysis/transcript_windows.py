"""The transcript sentiment table: one row per 60 s window of the segments CSV.

Text scores come from a scorer (default or LLM); this module adds the audio intensities and the
window's highlight score and writes `audio_{id}_sentiment.csv` / `.json` in the column order the
existing frontend reads.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from klipstream.analysis.signals import AudioFeatures, loudness_signal
from klipstream.analysis.text_scoring import TextScore
from klipstream.transcript import Window

SENTIMENT_COLUMNS = (
    "start_time",
    "end_time",
    "sentiment_score",
    "excitement",
    "funny",
    "happiness",
    "anger",
    "sadness",
    "neutral",
    "highlight_score",
    "speech_rate",
    "absolute_intensity",
    "relative_intensity",
    "model",
    "inference_time",
    "text",
)

NO_SPEECH_MODEL = "no-speech"
"""`model` of windows without words: nothing was scored; emotions say "nothing present"."""


def intensities(features: AudioFeatures, windows: Sequence[Window]) -> tuple[np.ndarray, np.ndarray]:
    """(absolute, relative) loudness intensity per window, both in [0, 1].

    absolute_intensity: the window's power-mean loudness mapped linearly from -60 dBFS (0, near
    silence) to 0 dBFS (1, full scale).
    relative_intensity: the 90th percentile over the window's seconds of the per-second loudness
    score (signals.loudness_signal: against the trailing 5-minute baseline, in time order), so a
    window with one loud moment stands out without being diluted by the rest of the minute.
    """
    db = features.per_second(features.loudness_dbfs, power_db=True)
    rel, _ = loudness_signal(features)
    absolute = np.zeros(len(windows))
    relative = np.zeros(len(windows))
    for i, w in enumerate(windows):
        a = max(0, int(w.start))
        b = min(len(db), max(a + 1, math.ceil(w.end)))
        if a >= len(db):
            continue
        power = np.nanmean(10.0 ** (db[a:b] / 10.0))
        level = 10.0 * math.log10(power) if power > 0 else -120.0
        absolute[i] = min(1.0, max(0.0, (level + 60.0) / 60.0))
        relative[i] = float(np.percentile(rel[a:b], 90))
    return absolute, relative


def window_highlight(score: TextScore, relative_intensity: float) -> float:
    """A window's highlight score in [0, 1]: 0.7 * the text's reaction strength + 0.3 * relative
    loudness (a convex blend of two [0, 1] values)."""
    return 0.7 * score.highlight + 0.3 * relative_intensity


def build_rows(
    windows: Sequence[Window],
    scores: Sequence[TextScore],
    models: Sequence[str],
    seconds: Sequence[float],
    absolute: np.ndarray,
    relative: np.ndarray,
) -> list[dict[str, Any]]:
    rows = []
    for i, w in enumerate(windows):
        s = scores[i]
        rows.append(
            {
                "start_time": w.start,
                "end_time": w.end,
                "sentiment_score": round(s.sentiment, 4),
                "excitement": round(s.excitement, 4),
                "funny": round(s.funny, 4),
                "happiness": round(s.happiness, 4),
                "anger": round(s.anger, 4),
                "sadness": round(s.sadness, 4),
                "neutral": round(s.neutral, 4),
                "highlight_score": round(window_highlight(s, float(relative[i])), 4),
                "speech_rate": round(w.speech_rate, 4),
                "absolute_intensity": round(float(absolute[i]), 4),
                "relative_intensity": round(float(relative[i]), 4),
                "model": models[i],
                "inference_time": round(seconds[i], 6),
                "text": w.text,
            }
        )
    return rows


def write_sentiment_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SENTIMENT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_sentiment_json(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The same rows as a JSON array of objects (keys in the CSV's column order)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{k: row[k] for k in SENTIMENT_COLUMNS} for row in rows], f, ensure_ascii=False, allow_nan=False)
