"""Cooperative cancellation for analysis code running in worker threads.

Threads cannot be killed; every long loop polls the stage's `cancelled` event through `check`.
"""

from __future__ import annotations

import threading


class Cancelled(Exception):
    """The stage was cancelled; the worker thread stops and its result is discarded."""


def check(cancelled: threading.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise Cancelled()
