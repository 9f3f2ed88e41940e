"""Webhook deliveries to a real local receiver: signatures, retries, 410, timeouts, restarts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from klipstream.config import ConfigError, Settings
from klipstream.integrations.webhooks import WebhookDispatcher, secret_key
from klipstream.jobs.store.sqlite import SQLiteStore
from klipstream.models import Job, JobError, JobOptions, JobStatus
from klipstream.network import PrivateAddressRefused, PublicOnlyResolver

SECRET_A = "whsec_" + base64.b64encode(b"A" * 24).decode()
SECRET_B = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """Answers with scripted statuses (then 200) and verifies both signature schemes itself."""

    def __init__(self, port: int, secrets: list[str]) -> None:
        self.port = port
        self.keys = [base64.b64decode(s.removeprefix("whsec_")) for s in secrets]
        self.script: list[tuple[int, float, dict[str, str]]] = []  # (status, delay, headers)
        self.requests: list[dict[str, Any]] = []
        self.delivered: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        record = {"headers": dict(request.headers), "body": body, "verified": self.verify(request.headers, body)}
        self.requests.append(record)
        status, delay, headers = self.script.pop(0) if self.script else (200, 0.0, {})
        if delay:
            await asyncio.sleep(delay)
        if 200 <= status < 300:
            self.delivered.append(json.loads(body))
        return web.Response(status=status, headers=headers)

    def verify(self, headers: Any, body: bytes) -> bool:
        msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
        if abs(time.time() - int(ts)) > 300:
            return False
        signed = f"{msg_id}.{ts}.".encode() + body
        expected = {base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode() for k in self.keys}
        given = {part.split(",", 1)[1] for part in headers["webhook-signature"].split(" ")}
        legacy = "sha256=" + hmac.new(self.keys[0], body, hashlib.sha256).hexdigest()
        return given == expected and hmac.compare_digest(headers["X-KlipStream-Signature"], legacy)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def receiver():
    r = Receiver(_free_port(), [SECRET_A, SECRET_B])
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "allow_private_urls": True,
        "webhook_secrets": (SECRET_A, SECRET_B),
        "webhook_retry_base_seconds": 0.05,
        "webhook_progress_seconds": 3600.0,
    }
    base.update(kw)
    return Settings.from_env({}, **base)


class Hooks:
    """The dispatcher and the job store it sends from. `job_changed` does what the job service
    does with a change: write its deliveries to the store (the service does it in the change's
    own transaction), then emit it."""

    def __init__(self, dispatcher: WebhookDispatcher, store: SQLiteStore) -> None:
        self.d = dispatcher
        self.store = store
        self._writes: list[asyncio.Future[None]] = []

    def job_changed(self, job: Job, kind: str) -> None:
        if kind == "progress":  # no save of its own: the dispatcher writes it
            self.d.job_changed(job, kind)
            return
        rows = self.d.deliveries(kind, job)  # now: the body is the job as it is now
        self._writes.append(asyncio.ensure_future(self._save_then_emit(rows, job, kind)))

    async def _save_then_emit(self, rows: list[Any], job: Job, kind: str) -> None:
        await self.store.record_deliveries(rows)
        self.d.job_changed(job, kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.d, name)

    async def close(self, timeout: float) -> None:
        await asyncio.gather(*self._writes)
        await self.d.close(timeout)
        await self.store.close()


async def _dispatcher(settings: Settings, http: aiohttp.ClientSession) -> Hooks:
    store = SQLiteStore(settings.database_path)
    await store.open()
    d = WebhookDispatcher(settings, http, store, "test-sender")
    await d.start()
    return Hooks(d, store)


def _job(url: str | None, job_id: str = "job1", **kw: Any) -> Job:
    return Job(job_id=job_id, video_id="123456", url="https://www.twitch.tv/videos/123456", callback_url=url, **kw)


async def until(predicate: Callable[[], Any], within: float = 15.0) -> None:
    """Wait until predicate() (sync or async) is true; fail after `within` seconds."""

    async def holds() -> bool:
        value = predicate()
        return bool(await value) if inspect.isawaitable(value) else bool(value)

    async def poll() -> None:
        while not await holds():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), within)


async def test_events_are_signed_and_delivered_in_order(receiver: Receiver, http, tmp_path: Path):
    d = await _dispatcher(_settings(tmp_path), http)
    job = _job(receiver.url)
    d.job_changed(job, "queued")  # no event for queued
    job.status = JobStatus.RUNNING
    d.job_changed(job, "started")
    d.job_changed(job, "stage_changed")
    d.job_changed(job, "progress")  # not asked for: no event
    job.status = JobStatus.COMPLETED
    job.results = {"audio": "https://x/audio.mp3"}
    d.job_changed(job, "completed")
    await until(lambda: len(receiver.delivered) == 3)
    assert [e["type"] for e in receiver.delivered] == ["job.started", "job.stage_changed", "job.completed"]
    assert all(r["verified"] for r in receiver.requests)
    done = receiver.delivered[-1]
    assert done["data"]["results"] == {"audio": "https://x/audio.mp3"}
    assert done["data"]["status"] == "completed" and done["data"]["job_id"] == "job1"
    assert len(receiver.requests[0]["headers"]["webhook-signature"].split(" ")) == 2
    await until(lambda: not d._in_flight)
    history = await d.deliveries_for("job1")
    assert [h["state"] for h in history] == ["delivered"] * 3
    assert await d.backlog() == 0
    await d.close(5)


async def test_failure_then_success_keeps_the_webhook_id(receiver: Receiver, http, tmp_path: Path):
    receiver.script = [(500, 0, {}), (503, 0, {})]
    d = await _dispatcher(_settings(tmp_path), http)
    d.job_changed(_job(receiver.url, status=JobStatus.RUNNING), "started")
    await until(lambda: len(receiver.delivered) == 1)
    assert len(receiver.requests) == 3
    assert len({r["headers"]["webhook-id"] for r in receiver.requests}) == 1
    await until(lambda: not d._in_flight)
    [history] = await d.deliveries_for("job1")
    assert history["state"] == "delivered"
    assert [a["status"] for a in history["attempts"]] == [500, 503, 200]
    await d.close(5)


async def test_retry_after_is_honoured(receiver: Receiver, http, tmp_path: Path):
    receiver.script = [(429, 0, {"Retry-After": "1"})]
    d = await _dispatcher(_settings(tmp_path), http)
    d.job_changed(_job(receiver.url), "started")
    await until(lambda: len(receiver.delivered) == 1)
    await until(lambda: not d._in_flight)
    [history] = await d.deliveries_for("job1")
    first, second = history["attempts"]
    assert first["status"] == 429 and second["status"] == 200
    assert second["at"] - first["at"] >= 1.0  # scheduled by Retry-After, not by the 50 ms backoff
    await d.close(5)


async def test_slow_receiver_times_out_and_is_retried(receiver: Receiver, http, tmp_path: Path):
    receiver.script = [(200, 2.0, {})]
    d = await _dispatcher(_settings(tmp_path, webhook_timeout_seconds=0.3), http)
    d.job_changed(_job(receiver.url), "started")
    await until(lambda: len(receiver.requests) == 2 and len(receiver.delivered) >= 1)
    await until(lambda: not d._in_flight)
    [history] = await d.deliveries_for("job1")
    assert history["state"] == "delivered"
    assert "no answer within" in history["attempts"][0]["error"]
    await d.close(5)


async def test_gone_stops_deliveries_for_the_job(receiver: Receiver, http, tmp_path: Path):
    receiver.script = [(410, 0, {})]
    d = await _dispatcher(_settings(tmp_path), http)
    job = _job(receiver.url)
    d.job_changed(job, "started")
    d.job_changed(job, "stage_changed")
    await until(lambda: len(receiver.requests) == 1)
    await until(lambda: not d._in_flight)
    job.status = JobStatus.FAILED
    job.error = JobError(error_type="network_error", error_code="x", message="m", suggested_action="s")
    d.job_changed(job, "failed")
    other = _job(receiver.url, job_id="job2")
    d.job_changed(other, "started")  # another job still gets its events
    await until(lambda: len(receiver.delivered) == 1)
    assert receiver.delivered[0]["data"]["job_id"] == "job2"
    assert [h["state"] for h in await d.deliveries_for("job1")] == ["stopped", "stopped"]
    assert len(receiver.requests) == 2
    await d.close(5)


async def test_permanent_refusal_is_not_retried(receiver: Receiver, http, tmp_path: Path):
    receiver.script = [(400, 0, {})]
    d = await _dispatcher(_settings(tmp_path), http)
    d.job_changed(_job(receiver.url), "started")
    await until(lambda: len(receiver.requests) == 1)
    await until(lambda: not d._in_flight)
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1
    [history] = await d.deliveries_for("job1")
    assert history["state"] == "failed" and history["last_status"] == 400
    await d.close(5)


async def test_gives_up_after_max_age(receiver: Receiver, http, tmp_path: Path):
    receiver.script = [(500, 0, {})] * 1000
    d = await _dispatcher(_settings(tmp_path, webhook_max_age_seconds=0.5), http)
    d.job_changed(_job(receiver.url), "started")
    await until(lambda: not d._in_flight and len(receiver.requests) >= 2)

    async def final_state_is(state: str) -> bool:
        return (await d.deliveries_for("job1"))[0]["state"] == state

    await until(lambda: final_state_is("failed"))
    [history] = await d.deliveries_for("job1")
    assert history["state"] == "failed"
    assert "gave up" in history["last_error"]
    assert await d.backlog() == 0
    await d.close(5)


async def test_receiver_down_across_a_restart(http, tmp_path: Path):
    receiver = Receiver(_free_port(), [SECRET_A, SECRET_B])  # not listening yet
    settings = _settings(tmp_path, webhook_retry_base_seconds=0.2)
    d = await _dispatcher(settings, http)
    job = _job(receiver.url, status=JobStatus.COMPLETED)
    d.job_changed(job, "completed")

    async def attempted() -> bool:
        history = await d.deliveries_for("job1")
        return bool(history and history[0]["attempts"])

    await until(attempted)
    assert await d.backlog() == 1
    await d.close(5)

    await receiver.start()
    try:
        d2 = await _dispatcher(settings, http)
        await until(lambda: len(receiver.delivered) == 1)
        assert receiver.delivered[0]["type"] == "job.completed"
        assert receiver.requests[0]["verified"]
        await until(lambda: not d2._in_flight)
        [history] = await d2.deliveries_for("job1")
        assert history["state"] == "delivered"
        assert history["attempts"][0]["status"] is None and "connection failed" in history["attempts"][0]["error"]
        await d2.close(5)
    finally:
        await receiver.stop()


async def test_progress_only_when_asked_and_throttled(receiver: Receiver, http, tmp_path: Path):
    d = await _dispatcher(_settings(tmp_path, webhook_progress_seconds=3600.0), http)
    job = _job(receiver.url, options=JobOptions(webhook_progress=True))
    for pct in (10.0, 20.0, 30.0):
        job.progress.percentage = pct
        d.job_changed(job, "progress")
    await until(lambda: len(receiver.delivered) == 1)
    await asyncio.sleep(0.2)
    assert [e["data"]["progress"]["percentage"] for e in receiver.delivered] == [10.0]
    await d.close(5)


async def test_no_callback_url_records_nothing(http, tmp_path: Path):
    d = await _dispatcher(_settings(tmp_path), http)
    d.job_changed(_job(None), "started")
    await asyncio.sleep(0.1)
    assert await d.backlog() == 0
    assert await d.deliveries_for("job1") == []
    await d.close(5)


async def test_private_callback_is_refused_at_send_time(receiver: Receiver, http, tmp_path: Path):
    d = await _dispatcher(_settings(tmp_path, allow_private_urls=False), http)
    d.job_changed(_job(receiver.url), "started")
    d.job_changed(_job(f"http://localhost:{receiver.port}/hook", job_id="job2"), "started")

    async def both_failed() -> bool:
        return [h["state"] for j in ("job1", "job2") for h in await d.deliveries_for(j)] == ["failed", "failed"]

    await until(both_failed)
    assert receiver.requests == []
    assert "private" in (await d.deliveries_for("job1"))[0]["last_error"]
    await d.close(5)


async def test_resolver_refuses_names_that_resolve_privately():
    resolver = PublicOnlyResolver()
    with pytest.raises(PrivateAddressRefused):
        await resolver.resolve("localhost", 80)
    await resolver.close()


def test_secrets():
    assert secret_key(SECRET_A) == b"A" * 24
    assert secret_key("plain-secret") == b"plain-secret"
    with pytest.raises(ConfigError):
        secret_key("whsec_!!!not-base64")
