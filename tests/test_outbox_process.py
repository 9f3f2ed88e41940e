"""The outbox in the job store, with real `klipstream serve` processes (issue 14): a `kill -9` right
after a job completes loses neither its `job.completed` webhook nor its Convex update, on SQLite
(after a restart) and on PostgreSQL (sent by another instance); a retry keeps the webhook-id; two
instances on one database never send the same delivery at the same time.

The receiver is a real aiohttp server in this process; tests/fake_convex.py speaks Convex's HTTP
API. The server kills itself at the worst moment (tests/serve_test_pipeline.py,
TEST_KILL_ON_EVENT): right after the `completed` event was stored and announced, before any other
coroutine runs, so before anything could be sent or written after the fact.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fake_convex import FakeConvex
from tests.test_process_lifecycle import ServerProcess, wait_for

TWITCH_VOD = "https://www.twitch.tv/videos/2400000001"
CONVEX_SECRET = "s3cret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Request:
    webhook_id: str
    event: str
    job_id: str
    created: str  # the event's `timestamp`: when the job change happened
    started: float
    ended: float = 0.0
    status: int = 0


@dataclass
class Receiver:
    """Records every request; answers 503 to the first `fail_first` requests of `fail_event`, and
    takes `delay` seconds per request. A request that arrives while another with the same
    webhook-id is still being answered is a concurrent duplicate (two senders at once)."""

    delay: float = 0.0
    fail_event: str = ""
    fail_first: int = 0
    requests: list[Request] = field(default_factory=list)
    open_ids: Counter[str] = field(default_factory=Counter)
    open_pairs: Counter[str] = field(default_factory=Counter)
    concurrent_duplicates: list[str] = field(default_factory=list)
    overlapping_jobs: list[str] = field(default_factory=list)  # two events of one job in flight at once
    port: int = field(default_factory=free_port)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        record = Request(
            request.headers["webhook-id"], body["type"], body["data"]["job_id"], body["timestamp"], time.monotonic()
        )
        self.requests.append(record)
        if self.open_ids[record.webhook_id]:
            self.concurrent_duplicates.append(record.webhook_id)
        if self.open_pairs[record.job_id]:
            self.overlapping_jobs.append(record.job_id)
        self.open_ids[record.webhook_id] += 1
        self.open_pairs[record.job_id] += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            failing = record.event == self.fail_event and self.fail_first > 0
            if failing:
                self.fail_first -= 1
            record.status = 503 if failing else 204
            return web.Response(status=record.status)
        finally:
            record.ended = time.monotonic()
            self.open_ids[record.webhook_id] -= 1
            self.open_pairs[record.job_id] -= 1

    def delivered(self, event: str) -> list[Request]:
        return [r for r in self.requests if r.event == event and 200 <= r.status < 300]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receiver():
    made: list[Receiver] = []

    async def start(**kw: Any) -> Receiver:
        r = Receiver(**kw)
        await r.start()
        made.append(r)
        return r

    yield start
    for r in made:
        await r.stop()


@pytest.fixture
async def convex():
    fake = FakeConvex(secret=CONVEX_SECRET)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def processes():
    made: list[ServerProcess] = []

    def make(root: Path, name: str, env: dict[str, str]) -> ServerProcess:
        root.mkdir(parents=True, exist_ok=True)
        proc = ServerProcess(root, name=name, env=env)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


def server_env(convex: FakeConvex, database_url: str | None, name: str) -> dict[str, str]:
    env = {
        "CONVEX_URL": convex.url,
        "KLIPSTREAM_CONVEX_SECRET": CONVEX_SECRET,
        "KLIPSTREAM_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "KLIPSTREAM_OUTBOX_POLL_SECONDS": "0.2",
        "KLIPSTREAM_INSTANCE_ID": name,
        # A killed sender's claims (a delivery it was sending when killed) expire after this.
        "KLIPSTREAM_OUTBOX_CLAIM_SECONDS": "3",
        "KLIPSTREAM_WEBHOOK_TIMEOUT_SECONDS": "2",
    }
    if database_url:
        env.update(
            {
                "KLIPSTREAM_DATABASE_URL": database_url,
                "KLIPSTREAM_LEASE_SECONDS": "2",
                "KLIPSTREAM_HEARTBEAT_SECONDS": "0.5",
                "KLIPSTREAM_CLAIM_POLL_SECONDS": "0.2",
            }
        )
    return env


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_kill_9_right_after_completion_loses_neither_webhook_nor_convex_update(
    backend: str, tmp_path: Path, receiver, convex: FakeConvex, processes, request: pytest.FixtureRequest
):
    database_url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    hooks = await receiver(fail_event="job.completed", fail_first=1)  # its first attempt fails: a retry
    first = processes(tmp_path, "a", {**server_env(convex, database_url, "a"), "TEST_KILL_ON_EVENT": "completed"})
    await first.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{first.base}/api/v1/analysis", json={"url": TWITCH_VOD, "callback_url": hooks.url}
        ) as resp:
            assert resp.status == 202, await resp.text()
            job_id = (await resp.json())["job_id"]
        assert first.proc is not None
        assert await asyncio.wait_for(asyncio.to_thread(first.proc.wait), 30) == -9  # killed itself on completion
        assert hooks.delivered("job.completed") == []
        assert (convex.row("2400000001") or {}).get("status") != "Completed"
        # SQLite: the same process restarted on its data directory. PostgreSQL: another instance.
        root = tmp_path if backend == "sqlite" else tmp_path / "b"
        second = processes(root, "b" if backend == "postgres" else "a", server_env(convex, database_url, "b"))
        await second.start()
        job = await wait_for(http, f"{second.base}/api/v1/analysis/{job_id}", lambda j: j["status"] != "running")
        assert job["status"] == "completed"
        async with asyncio.timeout(30):
            while not hooks.delivered("job.completed") or (convex.row("2400000001") or {}).get("status") != "Completed":
                await asyncio.sleep(0.05)
    completed = [r for r in hooks.requests if r.event == "job.completed"]
    assert [r.status for r in completed] == [503, 204]  # retried after the failure...
    assert len({r.webhook_id for r in completed}) == 1  # ...with the same webhook-id
    assert next(r.event for r in hooks.requests if r.status == 204) == "job.started"  # in order, none lost
    row = convex.row("2400000001")
    assert row is not None and row["jobId"] == job_id and row["progressPercentage"] == 100


async def test_two_instances_never_send_one_delivery_at_once(
    tmp_path: Path, receiver, convex: FakeConvex, processes, postgres_url: str
):
    """A slow receiver, two instances sending from one outbox: no delivery is sent by both at once,
    a job's events never overlap (each receiver of a job gets them one at a time, in order), and
    both instances send."""
    hooks = await receiver(delay=0.4)
    env = {
        "TEST_STEP_SECONDS": "0.03",
        "KLIPSTREAM_OUTBOX_CLAIM_SECONDS": "20",
        "KLIPSTREAM_WEBHOOK_TIMEOUT_SECONDS": "5",
    }
    a = processes(tmp_path / "a", "a", {**server_env(convex, postgres_url, "a"), **env})
    b = processes(tmp_path / "b", "b", {**server_env(convex, postgres_url, "b"), **env})
    await asyncio.gather(a.start(), b.start())
    jobs = []
    async with aiohttp.ClientSession() as http:
        for n in range(6):
            body = {"url": f"https://example.com/{n}.mp4", "callback_url": hooks.url}
            async with http.post(f"{(a, b)[n % 2].base}/api/v1/analysis", json=body) as resp:
                assert resp.status == 202, await resp.text()
                jobs.append((await resp.json())["job_id"])
        async with asyncio.timeout(90):
            while len({r.job_id for r in hooks.delivered("job.completed")}) < len(jobs):
                await asyncio.sleep(0.1)
        history = await wait_for(http, f"{b.base}/api/v1/analysis/{jobs[0]}", lambda j: True)
    assert hooks.concurrent_duplicates == []
    assert hooks.overlapping_jobs == []
    by_id = Counter(r.webhook_id for r in hooks.requests)
    assert max(by_id.values()) == 1  # nothing was sent twice at all
    for job_id in jobs:
        received = [r for r in hooks.requests if r.job_id == job_id]
        assert received[0].event == "job.started" and received[-1].event == "job.completed", received
        assert [r.created for r in received] == sorted(r.created for r in received)  # in the order they happened
    sent_by = {p.name: len(re.findall(r"webhook job\.\S+ msg_\w+ for job", p.log.read_text())) for p in (a, b)}
    assert all(sent_by.values()), sent_by
    assert all(d["state"] == "delivered" for d in history["webhook_deliveries"])
