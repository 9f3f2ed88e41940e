"""Shared fixtures: settings in a temporary data directory and a server app with chosen stages."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from klipstream.config import Settings
from klipstream.jobs.stage import Stage
from klipstream.server import create_app
from tests.pg_server import PostgresServer

# Chromium and other children must not inherit a proxy that points off this machine.
for _name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    os.environ.pop(_name, None)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides.setdefault("allow_private_urls", True)
        overrides.setdefault("admin_loopback", True)  # tests reach the admin routes from loopback
        overrides.setdefault("retry_base_seconds", 0.05)
        overrides.setdefault("log_format", "text")
        return Settings.from_env({}, **overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def make_client(aiohttp_client: Any) -> Callable[..., Any]:
    async def make(settings: Settings, stages: list[Stage] | None = None) -> TestClient:
        return await aiohttp_client(create_app(settings, stages=stages))

    return make


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run (tests/pg_server.py); no mock."""
    server = PostgresServer.create().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)
