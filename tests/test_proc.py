"""Killable child processes: cancelling one leaves nothing of its process group running."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from klipstream.proc import run_process

# The child starts a grandchild that ignores SIGTERM, then exits on SIGTERM itself: the leader is
# reaped at once while the grandchild would keep running (as ffmpeg under a clips worker can).
CHILD = """
import subprocess, sys, time
GRANDCHILD = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
)
subprocess.Popen([sys.executable, "-c", GRANDCHILD, sys.argv[1]])
print("started", flush=True)
time.sleep(60)
"""


async def test_cancel_kills_grandchildren_that_outlive_the_child(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    started = asyncio.Event()
    task = asyncio.create_task(
        run_process([sys.executable, "-c", CHILD, str(pid_file)], on_line=lambda _: started.set(), timeout=60)
    )
    async with asyncio.timeout(10):
        await started.wait()
        while not pid_file.exists() or not pid_file.read_text().strip():
            await asyncio.sleep(0.02)
    grandchild = int(pid_file.read_text())
    begun = time.monotonic()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert time.monotonic() - begun < 3.0
    assert not running(grandchild)


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_group_alive_sees_only_live_members() -> None:
    from klipstream.proc import group_alive

    assert not group_alive(2**22 + 12345)  # no such group
    assert group_alive(os.getpgrp())
