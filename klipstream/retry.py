"""The one retry policy of every outbound client and of stage retries: full-jitter backoff that
honours Retry-After, and Retry-After parsing.

Full jitter (uniform between 0 and the exponential ceiling) spreads the retries of many clients
and parallel requests apart instead of synchronising them into waves.
"""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int | None  # tries in all, the first included; None: until the caller stops
    base_seconds: float
    cap_seconds: float
    max_retry_after: float = 60.0  # a server's Retry-After above this is clamped, not obeyed blindly

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1 for the first)."""
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_retry_after)
        return full_jitter(max(0, failures - 1), self.base_seconds, self.cap_seconds)

    def exhausted(self, failures: int) -> bool:
        """True when `failures` tries have failed and no more are allowed."""
        return self.attempts is not None and failures >= self.attempts


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(cap, base * 2**attempt))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
