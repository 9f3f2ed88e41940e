"""Retry timing shared by every outbound client: full-jitter backoff and Retry-After parsing."""

from __future__ import annotations

import email.utils
import random
from datetime import UTC, datetime


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """uniform(0, min(cap, base * 2**attempt)): spreads the retries of many clients apart."""
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
