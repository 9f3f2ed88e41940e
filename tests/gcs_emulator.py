"""gcp-storage-emulator on loopback, with its buckets made: the Cloud Storage peer of the tests and
of bench/bench_checkpoints.py (one way to start it and know it is up)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(buckets: Iterable[str], project: str = "test") -> tuple[subprocess.Popen[bytes], str]:
    """Start the emulator (in memory), wait until it answers (20 s at most), create `buckets`;
    returns the process (the caller terminates it) and its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port), "-M", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(base + "/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("gcp-storage-emulator did not start") from None
                time.sleep(0.1)
        for name in buckets:
            req = urllib.request.Request(
                f"{base}/storage/v1/b?project={project}",
                data=json.dumps({"name": name}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(req, timeout=5).read()
    except BaseException:
        proc.terminate()
        proc.wait(10)
        raise
    return proc, base
