"""A real server process: `kill -9` mid-job loses nothing; SIGTERM drains within Cloud Run's budget."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One `klipstream serve` of the test pipeline (tests/serve_test_pipeline.py) under `root`:
    data directory, stage marker logs and its own log file; `env` is added to this environment."""

    def __init__(self, root: Path, *, name: str = "server", env: dict[str, str] | None = None) -> None:
        self.name = name
        self.data_dir = root / "data"
        self.markers = root / "markers"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"{name}.log"

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.serve_test_pipeline", str(self.data_dir), str(self.port), str(self.markers)],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        async with http.get(f"{self.base}/health/ready") as resp:
                            if resp.status == 200:
                                return
                    except aiohttp.ClientError:
                        pass
                    assert self.proc.poll() is None, self.log.read_text()
                    await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stage_log(self, stage: str) -> list[str]:
        path = self.markers / f"{stage}.log"
        return path.read_text().split("\n")[:-1] if path.exists() else []


@pytest.fixture
async def server(tmp_path: Path):
    proc = ServerProcess(tmp_path)
    yield proc
    proc.stop()


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        return await resp.json()


async def wait_for(http: aiohttp.ClientSession, url: str, predicate: Any, timeout: float = 20) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            body = await get_json(http, url)
            if predicate(body):
                return body
            await asyncio.sleep(0.05)


async def test_kill_9_mid_job_then_restart_completes_without_losing_work(server: ServerProcess):
    await server.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.base}/api/v1/analysis", json={"url": "https://example.com/a.mp4"}) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["job_id"]
        async with http.post(
            f"{server.base}/api/v1/analysis", json={"url": "https://example.com/b.mp4", "priority": "low"}
        ) as resp:
            queued_id = (await resp.json())["job_id"]
        job_url = f"{server.base}/api/v1/analysis/{job_id}"
        await wait_for(http, job_url, lambda j: j["stages"][1]["status"] == "running")
        first_pid = server.proc.pid
        os.kill(first_pid, signal.SIGKILL)
        server.proc.wait()
        await server.start()
        job = await wait_for(http, job_url, lambda j: j["status"] in ("completed", "failed"), timeout=30)
        assert job["status"] == "completed"
        other = await wait_for(
            http,
            f"{server.base}/api/v1/analysis/{queued_id}",
            lambda j: j["status"] in ("completed", "failed"),
            timeout=30,
        )
        assert other["status"] == "completed"
    # the download finished before the kill and was not run again; audio restarted in the new process
    assert server.stage_log("download").count(f"end {first_pid}") == 1
    assert [line for line in server.stage_log("download") if str(first_pid) not in line] == [
        f"start {server.proc.pid}",
        f"end {server.proc.pid}",  # the second job's download
    ]
    assert f"start {first_pid}" in server.stage_log("audio")
    assert f"end {server.proc.pid}" in server.stage_log("audio")


async def test_sigterm_drains_within_budget_and_requeues(server: ServerProcess):
    await server.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.base}/api/v1/analysis", json={"url": "https://example.com/a.mp4"}) as resp:
            job_id = (await resp.json())["job_id"]
        job_url = f"{server.base}/api/v1/analysis/{job_id}"
        await wait_for(http, job_url, lambda j: j["stages"][1]["status"] == "running")
        stream = await http.get(f"{job_url}/stream")
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        text = ""
        async with asyncio.timeout(8):
            async for line in stream.content:
                text += line.decode()
                if "event: reconnect" in text:
                    break
        assert "event: reconnect" in text
        returncode = await asyncio.to_thread(server.proc.wait, 10)
        elapsed = time.monotonic() - started
        assert returncode == 0 and elapsed < 8.0, (returncode, elapsed, server.log.read_text()[-2000:])
        stream.close()
        await server.start()
        job = await wait_for(http, job_url, lambda j: j["status"] in ("completed", "failed"), timeout=30)
        assert job["status"] == "completed"
        assert job["attempts"] == 2


async def test_sigterm_refuses_new_work_while_draining(server: ServerProcess, monkeypatch):
    monkeypatch.setenv("TEST_STEP_SECONDS", "0.5")  # long enough that the drain overlaps a request
    await server.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.base}/api/v1/analysis", json={"url": "https://example.com/a.mp4"}) as resp:
            job_id = (await resp.json())["job_id"]
        await wait_for(http, f"{server.base}/api/v1/analysis/{job_id}", lambda j: j["status"] == "running")
        server.proc.send_signal(signal.SIGTERM)
        statuses = set()
        async with asyncio.timeout(8):
            while server.proc.poll() is None:
                try:
                    async with http.get(f"{server.base}/health/ready") as ready:
                        statuses.add(("ready", ready.status))
                    async with http.post(
                        f"{server.base}/api/v1/analysis", json={"url": "https://example.com/new.mp4"}
                    ) as resp:
                        statuses.add(("submit", resp.status))
                except aiohttp.ClientError:
                    break
                await asyncio.sleep(0.01)
        assert server.proc.wait(10) == 0
        assert ("submit", 202) not in statuses
