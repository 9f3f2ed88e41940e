"""One public-only policy for every user-supplied URL (issue 13, item 15)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from klipstream.network import is_public_address
from klipstream.stages.chat import CHAT
from tests.test_api_basics import URL, wait_status

PRIVATE_IN_DISGUISE = [
    "64:ff9b::a00:1",  # NAT64 well-known prefix carrying 10.0.0.1
    "64:ff9b::7f00:1",  # ... carrying 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # ... carrying the metadata address 169.254.169.254
    "64:ff9b:1::808:808",  # local-use NAT64 prefix: never public
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
    "::ffff:10.0.0.1",  # IPv4-mapped
    "::a00:1",  # IPv4-compatible (deprecated)
    "::ffff:0:a00:1",  # IPv4-translated (SIIT)
]
PUBLIC = ["8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", PRIVATE_IN_DISGUISE)
def test_addresses_embedding_a_private_ipv4_are_not_public(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_stay_public(address: str) -> None:
    assert is_public_address(address)


@pytest.mark.parametrize("address", ["64:ff9b::7f00:1", "2002:a00:1::1", "::ffff:0:a00:1"])
async def test_submission_refuses_urls_at_such_literals(make_client, make_settings, address: str) -> None:
    client = await make_client(make_settings(allow_private_urls=False), [CHAT])
    for field in ("chat_url", "callback_url"):
        resp = await client.post("/api/v1/analysis", json={"url": URL, field: f"http://[{address}]/x"})
        assert resp.status == 422, (field, address)
        assert (await resp.json())["errors"][0]["field"] == field


class Rebinding:
    """A name whose first answer is public and every later one loopback: the DNS-rebinding attack
    (there is no DNS server here, so the system resolver is stood in for this one name)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, host: str) -> None:
        self.host = host
        self.answers = 0
        self.original = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.host:
            return self.original(host, port, *args, **kwargs)
        self.answers += 1
        # The public answer only ever reaches the check; a connection to it would fail the test.
        address = "93.184.215.14" if self.answers == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 80)))]


async def test_chat_url_rebinding_to_loopback_is_refused(make_client, make_settings, monkeypatch) -> None:
    served: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.json_response({"comments": []})

    app = web.Application()
    app.router.add_get("/chat.json", chat)
    internal = TestServer(app, host="127.0.0.1")
    await internal.start_server()
    try:
        rebinding = Rebinding(monkeypatch, "chat.rebind.example")
        client = await make_client(make_settings(allow_private_urls=False), [CHAT])
        chat_url = f"http://chat.rebind.example:{internal.port}/chat.json"
        resp = await client.post("/api/v1/analysis", json={"url": URL, "chat_url": chat_url})
        assert resp.status == 202
        job = await wait_status(client, (await resp.json())["job_id"], {"failed", "completed"})
        assert served == []  # the internal server was never reached
        assert rebinding.answers >= 2
        assert job["status"] == "failed"
        assert job["error"]["error_type"] == "invalid_video_url" and job["error"]["error_code"] == "private_address"
    finally:
        await internal.close()
