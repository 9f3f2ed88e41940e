"""The collector tuning frees what was alive in a cycle at a full collection (issue 13, item 10)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from klipstream.server import tune_gc

    class Request:  # stands for an SSE request, a job task or an exception with its traceback
        pass

    tune_gc()
    frozen_at_start = gc.get_freeze_count()
    alive = Request()
    alive.self = alive  # a reference cycle, alive while the "request" is served
    probe = weakref.ref(alive)
    for _ in range(3):
        gc.collect()  # full collections happen under load
    del alive  # the request ends: the cycle is garbage now
    gc.collect()
    print(probe() is None, gc.get_freeze_count() - frozen_at_start)
    """
)


def test_cycles_alive_at_a_full_collection_are_still_collected_later() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    collected, newly_frozen = result.stdout.split()
    assert collected == "True", "an object in a cycle was frozen by a later collection and leaked"
    assert newly_frozen == "0"
