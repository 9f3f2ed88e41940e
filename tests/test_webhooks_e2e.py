"""A job's callback_url receives signed events end to end, through the real API and a real receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_api_basics import URL, wait_status

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


async def test_callback_receives_signed_lifecycle_events(make_client, make_settings):
    received: list[tuple[dict, dict]] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        key = base64.b64decode(SECRET.removeprefix("whsec_"))
        signed = f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        assert f"v1,{expected}" in request.headers["webhook-signature"].split(" ")
        legacy = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
        assert request.headers["X-KlipStream-Signature"] == legacy
        received.append((dict(request.headers), json.loads(body)))
        return web.Response(status=204)

    receiver_app = web.Application()
    receiver_app.router.add_post("/hook", receive)
    receiver = TestServer(receiver_app, host="127.0.0.1")
    await receiver.start_server()
    try:
        client = await make_client(make_settings(webhook_secrets=(SECRET,)), simple_pipeline(Recorder()))
        callback = f"http://127.0.0.1:{receiver.port}/hook"
        resp = await client.post("/api/v1/analysis", json={"url": URL, "callback_url": callback})
        job_id = (await resp.json())["job_id"]
        await wait_status(client, job_id, {"completed"})
        async with asyncio.timeout(10):
            while not any(b["type"] == "job.completed" for _, b in received):
                await asyncio.sleep(0.05)
        types = [b["type"] for _, b in received]
        assert types[0] == "job.started" and types[-1] == "job.completed"
        assert "job.stage_changed" in types
        final = received[-1][1]
        assert final["data"]["job_id"] == job_id and "highlights_json" in final["data"]["results"]
        job = await (await client.get(f"/api/v1/analysis/{job_id}")).json()
        deliveries = job["webhook_deliveries"]
        assert deliveries and {d["type"] for d in deliveries} >= {"job.started", "job.completed"}
    finally:
        await receiver.close()
