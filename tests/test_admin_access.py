"""Admin routes are off without a token unless loopback access is asked for (issue 13, item 17)."""

from __future__ import annotations

import pytest

from tests.scheduler_stages import Recorder, simple_pipeline

ADMIN_ROUTES = [
    ("GET", "/api/v1/queue/stats"),
    ("POST", "/api/v1/queue/pause"),
    ("POST", "/api/v1/queue/resume"),
    ("POST", "/api/v1/queue/drain"),
    ("GET", "/list_files"),
    ("GET", "/list_output_files"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_admin_routes_are_off_for_loopback_clients_without_a_token(make_client, make_settings, method, path):
    # The test client connects from 127.0.0.1, like every client behind a proxy on the same host.
    client = await make_client(make_settings(admin_loopback=False), simple_pipeline(Recorder()))
    resp = await client.request(method, path)
    assert resp.status == 403
    assert "KLIPSTREAM_ADMIN_TOKEN" in (await resp.json())["detail"]
    assert (await client.get("/health/ready")).status == 200  # nothing was paused or drained


async def test_loopback_access_is_an_explicit_setting(make_client, make_settings):
    client = await make_client(make_settings(admin_loopback=True), simple_pipeline(Recorder()))
    assert (await client.get("/api/v1/queue/stats")).status == 200


async def test_a_token_is_required_once_configured_even_from_loopback(make_client, make_settings):
    client = await make_client(make_settings(admin_token="s3cret", admin_loopback=True), simple_pipeline(Recorder()))
    assert (await client.get("/api/v1/queue/stats")).status == 401
    assert (await client.get("/api/v1/queue/stats", headers={"Authorization": "Bearer s3cret"})).status == 200
