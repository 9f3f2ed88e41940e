"""Measured stage durations, for ETAs and the operators' p50/p95.

Stages that scale with the media (download, decoding, transcription) are predicted from seconds of
work per second of media; the rest from plain seconds. Nothing here is a constant guess: with no
measurements yet the ETA is unknown (null), not invented.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque


class StageTimings:
    def __init__(self, keep: int = 200) -> None:
        self._runs: dict[str, deque[tuple[float, float | None]]] = defaultdict(lambda: deque(maxlen=keep))
        self.version = 0  # changes with every measurement, so estimates derived from them can be cached

    def add(self, stage: str, seconds: float, media_seconds: float | None) -> None:
        self._runs[stage].append((seconds, media_seconds))
        self.version += 1

    def estimate(self, stage: str, media_seconds: float | None) -> float | None:
        runs = self._runs.get(stage)
        if not runs:
            return None
        if media_seconds:
            per_media = [s / m for s, m in runs if m]
            if per_media:
                return statistics.median(per_media) * media_seconds
        return statistics.median(s for s, _ in runs)

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, runs in self._runs.items():
            seconds = sorted(s for s, _ in runs)
            if seconds:
                out[stage] = {
                    "count": float(len(seconds)),
                    "p50": _quantile(seconds, 0.50),
                    "p95": _quantile(seconds, 0.95),
                }
        return out


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return round(sorted_values[index], 3)
