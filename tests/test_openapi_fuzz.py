"""Schemathesis against the served /openapi.json: no operation answers 5xx, whatever the input.

The app runs on a real loopback port in a thread with its own event loop, because schemathesis
sends its requests synchronously from the test thread. Jobs it submits run the quick test stages.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from klipstream.api.context import OPENAPI
from klipstream.config import Settings
from klipstream.server import create_app
from tests.scheduler_stages import Recorder, simple_pipeline

EXAMPLES_PER_OPERATION = 40


class ThreadServer:
    """The app on 127.0.0.1 in a background thread, so synchronous clients can call it."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, access_log=None)
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("fuzz") / "data"
    config = Settings.from_env(
        {},
        data_dir=data,
        allow_private_urls=True,
        log_format="text",
        log_level="error",
        retry_base_seconds=0.05,
        max_queued_jobs=100_000,
        admin_loopback=True,  # the fuzzer calls the admin routes from loopback
    )
    server = ThreadServer(create_app(config, stages=simple_pipeline(Recorder())))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # loopback only, never through a proxy
        yield s


def generated_document() -> dict[str, Any]:
    """The document the app serves at /openapi.json (built at app creation, no server needed).

    Loaded eagerly because schemathesis' lazy `from_fixture` loader does not work with pytest 9;
    `test_served_document_is_the_generated_one` ties it to what the server actually serves.
    """
    config = Settings.from_env({}, data_dir=Path("unused"))
    return create_app(config, stages=simple_pipeline(Recorder()))[OPENAPI]


schema = schemathesis.openapi.from_dict(generated_document())


@pytest.fixture(autouse=True)
def undrained(base_url: str, session: requests.Session) -> None:
    """Fuzzing `/queue/drain` legitimately makes later submissions answer 503; start each
    operation from a serving queue so the verdict does not depend on the test order."""
    session.post(f"{base_url}/api/v1/queue/resume", timeout=10).raise_for_status()


def test_served_document_is_the_generated_one(api_schema: Any) -> None:
    assert api_schema.raw_schema == schema.raw_schema


def test_document_is_valid_openapi_31(api_schema: Any) -> None:
    raw = api_schema.raw_schema
    assert raw["openapi"].startswith("3.1")
    api_schema.validate()  # raises on a document that is not valid OpenAPI
    fuzzed = {op.ok().label for op in api_schema.get_all_operations()}
    declared = {f"{method.upper()} {path}" for path, item in raw["paths"].items() for method in item}
    # schemathesis leaves out the document's own route; everything else must be fuzzable
    assert fuzzed == declared - {"GET /openapi.json"}


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, session: requests.Session, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, session=session, checks=[not_a_server_error], timeout=10)
