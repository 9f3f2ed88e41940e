"""Rolling baselines: compare each moment with the stream around it, in time order.

A stream's loudness and chat rate drift for hours (a quiet opening, a loud tournament, a raid).
Normalising against the whole VOD would let one loud hour mute everything else, so every signal
is compared with a trailing window of the stream's own recent past. The first window of the VOD
has no past; it is compared with the first full window instead.

All functions are vectorised over numpy arrays and keep memory bounded for 12 h VODs by computing
the baseline every `step` samples and interpolating between those points.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def rolling_quantile(
    x: np.ndarray, window: int, q: float | tuple[float, ...], *, step: int | None = None
) -> np.ndarray:
    """Trailing rolling quantile(s) of `x` over the previous `window` samples (including the current).

    `q` may be one quantile (result shape like x) or several (result shape (len(q), len(x))).
    Samples before the first full window use the first full window. NaNs are ignored; a window of
    only NaNs gives NaN. Computed every `step` samples (default window // 20) and linearly
    interpolated between, so memory is O(len(x) / step * window).
    """
    x = np.asarray(x, dtype=np.float64)
    qs: list[float] = [float(q)] if isinstance(q, (int, float)) else [float(v) for v in q]
    n = len(x)
    if n == 0:
        empty = np.empty((len(qs), 0))
        return empty[0] if isinstance(q, (int, float)) else empty
    window = max(1, min(int(window), n))
    step = max(1, int(step if step is not None else window // 20))
    ends = np.arange(window - 1, n, step)  # index of the last sample of each evaluated window
    if ends[-1] != n - 1:
        ends = np.append(ends, n - 1)
    views = sliding_window_view(x, window)  # views[i] = x[i : i + window], ends at i + window - 1
    out = np.empty((len(qs), n))
    chunk = max(1, 2_000_000 // window)  # bound the temporary copy nanquantile makes
    values = np.empty((len(qs), len(ends)))
    for lo in range(0, len(ends), chunk):
        rows = views[ends[lo : lo + chunk] - (window - 1)]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows (silence) are legitimate
            values[:, lo : lo + chunk] = np.nanquantile(rows, np.array(qs), axis=1)
    positions = np.arange(n)
    for i in range(len(qs)):
        out[i] = np.interp(positions, ends, values[i])  # before ends[0]: the first full window
    return out[0] if isinstance(q, (int, float)) else out


def centered_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` samples centred on each sample (edges average what exists)."""
    x = np.asarray(x, dtype=np.float64)
    if width <= 1 or len(x) == 0:
        return x.copy()
    kernel = np.ones(int(width))
    num = np.convolve(x, kernel, mode="same")
    den = np.convolve(np.ones(len(x)), kernel, mode="same")
    return num / den


def robust_relative(x: np.ndarray, window: int, *, floor: float, full_scale: float = 3.0) -> np.ndarray:
    """How far `x` rises above its trailing baseline, as a score in [0, 1].

    Scaling: z = (x - median) / max(q84 - median, floor), where median and q84 are the trailing
    rolling 50th and 84th percentiles (q84 - median is one standard deviation for normal data,
    and robust to the peaks we are looking for). The score is clip(z / full_scale, 0, 1): a value
    `full_scale` spreads above the stream's recent typical level scores 1; anything at or below
    the typical level scores 0. `floor` (in x's units) keeps a nearly constant signal from turning
    tiny wiggles into full-scale peaks.
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return x.copy()
    median, q84 = rolling_quantile(x, window, (0.5, 0.84))
    spread = np.maximum(np.nan_to_num(q84 - median, nan=floor), floor)
    z = (x - np.nan_to_num(median, nan=0.0)) / spread
    return np.clip(np.nan_to_num(z / full_scale, nan=0.0), 0.0, 1.0)


def poisson_surge(counts: np.ndarray, baseline: np.ndarray, *, full_scale: float = 6.0) -> np.ndarray:
    """A count's surge over an expected count, as a score in [0, 1].

    Scaling: z = (count - expected) / sqrt(expected + 1), the Poisson standard score with +1 so a
    silent chat does not make one message a sensation; score = clip(z / full_scale, 0, 1). With
    the default full_scale 6, a chat of 1 message per 5 s needs ~14 messages in 5 s for a full
    score, a chat of 100 per 5 s needs ~160: big chats must surge proportionally less, small chats
    more, which matches how viewers perceive "chat exploded".
    """
    counts = np.asarray(counts, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    z = (counts - baseline) / np.sqrt(baseline + 1.0)
    return np.clip(z / full_scale, 0.0, 1.0)
