"""`klipstream submit/status/watch/cancel/jobs` against a live server on a random loopback port.

The command runs in a worker thread (it starts its own event loop, as it does from a shell) while
the server runs on the test's loop. The stream follower's reconnect logic is checked against a
small peer that speaks the text/event-stream wire format and drops connections on purpose.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from klipstream import cli
from klipstream.cli import remote
from klipstream.server import create_app
from klipstream.sse import SseParser
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_cli import demo_pipeline, make_wav


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KLIPSTREAM_API_KEY", "KLIPSTREAM_SERVER", "PORT"):
        monkeypatch.delenv(name, raising=False)


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def start(aiohttp_server: Any, settings: Any, stages: list[Any]) -> str:
    server = await aiohttp_server(create_app(settings, stages=stages))
    return f"http://127.0.0.1:{server.port}"


async def test_submit_then_watch_shows_progress_highlights_and_urls(aiohttp_server, make_settings, tmp_path, capsys):
    base = await start(aiohttp_server, make_settings(allow_local_files=True), demo_pipeline())
    source = make_wav(tmp_path / "stream.wav")
    assert await run_cli("submit", str(source), "--server", base) == 0
    captured = capsys.readouterr()
    job_id = captured.out.strip()
    assert len(job_id) == 24 and f"klipstream watch {job_id}" in captured.err
    assert await run_cli("watch", job_id, "--server", base) == 0
    captured = capsys.readouterr()
    assert "Highlights" in captured.out and "00:00:02–00:00:03" in captured.out
    assert f"{base}/files/" in captured.out  # artifact URLs are absolute
    for stage in ("fetch", "decode", "transcript", "moments"):
        assert stage in captured.err
    assert await run_cli("status", job_id, "--server", base, "--json") == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "completed" and job["highlights"]
    assert await run_cli("jobs", "--server", base) == 0
    assert job_id in capsys.readouterr().out


async def test_submit_watch_json_and_dedup(aiohttp_server, make_settings, capsys):
    recorder = Recorder()
    base = await start(aiohttp_server, make_settings(), simple_pipeline(recorder, download=True))
    url = "https://www.twitch.tv/videos/123456"
    assert await run_cli("submit", url, "--server", base, "--json", "--priority", "high") == 0
    first = json.loads(capsys.readouterr().out)
    assert first["status"] == "queued" and first["video_id"] == "123456"
    assert await run_cli("submit", url, "--server", base) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == first["job_id"] and "existing job" in captured.err
    watcher = asyncio.create_task(run_cli("watch", first["job_id"], "--server", base, "--json"))
    await asyncio.sleep(0.5)
    recorder.gate("download").set()
    assert await asyncio.wait_for(watcher, 20) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["status"] == "completed" and "highlights_json" in final["results"]


async def test_cancel_and_failed_exit_codes(aiohttp_server, make_settings, capsys):
    recorder = Recorder()
    base = await start(aiohttp_server, make_settings(), simple_pipeline(recorder, download=True))
    assert await run_cli("submit", "https://www.twitch.tv/videos/42", "--server", base) == 0
    job_id = capsys.readouterr().out.strip()
    watcher = asyncio.create_task(run_cli("watch", job_id, "--server", base))
    await asyncio.sleep(0.3)
    assert await run_cli("cancel", job_id, "--server", base) == 0
    assert await asyncio.wait_for(watcher, 20) == cli.EXIT_JOB_FAILED
    out = capsys.readouterr().out
    assert f"{job_id}: cancelled" in out  # from `cancel`
    assert f"job {job_id}  cancelled" in out  # from `watch`
    assert await run_cli("status", job_id, "--server", base) == cli.EXIT_JOB_FAILED


async def test_api_keys_and_one_line_errors(aiohttp_server, make_settings, tmp_path, capsys, monkeypatch):
    settings = make_settings(api_keys=("secret-key",), allow_local_files=True)
    base = await start(aiohttp_server, settings, demo_pipeline())
    source = make_wav(tmp_path / "stream.wav")
    assert await run_cli("submit", str(source), "--server", base) == cli.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 401" in err and "--api-key" in err
    monkeypatch.setenv("KLIPSTREAM_API_KEY", "secret-key")
    assert await run_cli("submit", str(source), "--server", base, "--watch") == 0  # stream uses the key too
    assert "Highlights" in capsys.readouterr().out
    assert await run_cli("status", "000000000000aaaaaaaaaaaa", "--server", base) == cli.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert err.startswith("klipstream: Job not found (HTTP 404)") and err.count("\n") == 1
    assert await run_cli("submit", "ftp://x.example/v", "--server", base) == cli.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "HTTP 422" in err and "[url:" in err and "Traceback" not in err


async def test_unreachable_server_is_one_line(capsys):
    assert await run_cli("status", "abc", "--server", "http://127.0.0.1:9") == cli.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the server" in err and "Traceback" not in err
    assert await run_cli("jobs", "--server", "localhost:8080") == cli.EXIT_USAGE


# --- the stream follower against a peer that drops connections ---
def sse(event_id: int, event: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def test_watch_reconnects_with_last_event_id(aiohttp_server, capsys):
    seen_ids: list[str | None] = []
    big = "x" * 100_000  # longer than aiohttp's 64 KiB line limit
    job = {
        "job_id": "j1",
        "status": "running",
        "stream_url": "/stream",
        "stages": [{"name": "fetch", "display": "Downloading", "status": "running", "progress": 0.2}],
        "progress": {"percentage": 10.0, "current_stage": "Downloading"},
    }
    done = {
        **job,
        "status": "completed",
        "highlights": [
            {"rank": 1, "start_time": 61, "end_time": 75.5, "score": 0.9, "dominant_emotion": "funny", "reason": big}
        ],
        "results": {},
    }

    async def get_job(request: web.Request) -> web.Response:
        return web.json_response(job)

    async def stream(request: web.Request) -> web.StreamResponse:
        seen_ids.append(request.headers.get("Last-Event-ID"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        attempt = len(seen_ids)
        if attempt == 1:
            await response.write(b"retry: 50\n\n: heartbeat\n\n" + sse(1, "snapshot", job))
            await response.write(
                sse(
                    2,
                    "progress",
                    {
                        "status": "running",
                        "progress": {"percentage": 30.0},
                        "stages": [{"name": "fetch", "progress": 0.6}],
                    },
                )
            )
            await response.write(b'id: 3\nevent: stage\ndata: {"half')  # cut mid-event
            request.transport.close()
        elif attempt == 2:
            await response.write(sse(3, "reconnect", {"reason": "server shutting down", "retry_ms": 20}))
        else:
            await response.write(sse(4, "completed", done))
        return response

    app = web.Application()
    app.router.add_get("/api/v1/analysis/j1", get_job)
    app.router.add_get("/stream", stream)
    server = await aiohttp_server(app)
    assert await run_cli("watch", "j1", "--server", f"http://127.0.0.1:{server.port}") == 0
    assert seen_ids == [None, "2", "3"]
    out = capsys.readouterr().out
    assert "00:01:01–00:01:16" in out and "funny" in out


def test_sse_parser_follows_the_wire_rules() -> None:
    parser = SseParser()
    events = parser.feed(b': ping\r\nretry: 1500\r\nid: 7\r\nevent: progress\r\ndata: {"a":\r\ndata: 1}\r\n\r\n')
    assert [(e.event, e.data, e.id, e.retry) for e in events] == [("progress", '{"a":\n1}', "7", 1500)]
    assert parser.feed(b"data: plain") == []
    assert [(e.event, e.data, e.id) for e in parser.feed(b"\n\n")] == [("message", "plain", "7")]
    assert parser.feed(b"event: lonely\n\n") == []  # no data: nothing is dispatched


def test_remote_server_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9999")
    assert remote.default_server() == "http://127.0.0.1:9999"
    monkeypatch.setenv("KLIPSTREAM_SERVER", "https://ks.example")
    assert remote.default_server() == "https://ks.example"
