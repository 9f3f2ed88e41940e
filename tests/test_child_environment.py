"""Child processes never see the service's secrets (issue 13, item 18)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from klipstream.config import Settings
from klipstream.proc import run_process
from klipstream.transcription.pool import Transcriber

SECRETS = {
    "KLIPSTREAM_API_KEYS": "api-key-1,api-key-2",
    "KLIPSTREAM_ADMIN_TOKEN": "admin-token",
    "KLIPSTREAM_WEBHOOK_SECRET": "whsec_c2VjcmV0c2VjcmV0",
    "KLIPSTREAM_LLM_API_KEY": "llm-key",
    "KLIPSTREAM_CONVEX_SECRET": "convex-secret",
}
PRINT_ENV = "import os, json; print(json.dumps(dict(os.environ)))"


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


async def test_server_start_removes_secrets_before_workers_spawn(secret_env, make_client, make_settings):
    settings = Settings.from_env(
        os.environ, data_dir=make_settings().data_dir, log_format="text", allow_private_urls=True
    )
    assert settings.api_keys == ("api-key-1", "api-key-2")  # the settings hold them
    client = await make_client(settings, [])
    for name in SECRETS:
        assert name not in os.environ, name
    # The real transcription workers, spawned after start: their initial environment is clean.
    transcriber = Transcriber(make_settings())
    try:
        await transcriber.start()
        pids = transcriber.pids()
        assert pids
        for pid in pids:
            env = environ_of(pid)
            assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
            assert not [v for v in env.values() if "api-key-1" in v or "admin-token" in v]
    finally:
        await transcriber.close()
    assert (await client.get("/api/v1/jobs", headers={"Authorization": "Bearer api-key-1"})).status == 200


async def test_download_children_get_a_minimal_environment(secret_env, monkeypatch):
    monkeypatch.setenv("SOME_CLOUD_TOKEN", "not-for-children")
    lines = await run_process([sys.executable, "-c", PRINT_ENV], timeout=30)
    env = __import__("json").loads(lines[-1])
    assert not set(SECRETS) & set(env) and "SOME_CLOUD_TOKEN" not in env
    assert env.get("PATH") == os.environ["PATH"]
