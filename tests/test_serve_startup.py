"""`klipstream serve` that cannot start says why in one line and exits non-zero (issue 13, item 9)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KLIPSTREAM_")}
    environ.update({"KLIPSTREAM_DATA_DIR": str(tmp_path / "data"), "KLIPSTREAM_HOST": "127.0.0.1", **env})
    return subprocess.run(
        [sys.executable, "-m", "klipstream", "serve"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("klipstream: cannot start: ")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.timeout(90)
def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, PORT=str(port), KLIPSTREAM_LOG_LEVEL="warning")
    assert_one_clear_line(result, f"127.0.0.1:{port}", "in use")


@pytest.mark.timeout(90)
def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data directory should be")
    result = serve(tmp_path, KLIPSTREAM_DATA_DIR=str(blocker / "data"), PORT="0")
    assert_one_clear_line(result, str(blocker / "data"), "not writable")


@pytest.mark.timeout(90)
def test_bad_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = serve(tmp_path, KLIPSTREAM_WHISPER_MODEL=str(missing), PORT="0")
    assert_one_clear_line(result, str(missing), "KLIPSTREAM_WHISPER_MODEL")
