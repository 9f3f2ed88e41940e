"""The HTTP contract of the job API: validation, dedup, idempotency, limits, auth, metadata routes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from klipstream.models import SubmitResponse
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_api_basics import URL, wait_status


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(make_client, settings, recorder):
    return await make_client(settings, simple_pipeline(recorder, download=True))


async def problem_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["status"] == status and body["title"]
    assert "Traceback" not in str(body)
    return body


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        ({"url": 5}, 422, "url"),
        ({}, 422, "url"),
        ({"url": URL, "surprise": 1}, 422, "surprise"),
        ({"url": URL, "priority": "asap"}, 422, "priority"),
        ({"url": URL, "options": {"force": "maybe"}}, 422, "options.force"),
        ({"url": URL, "options": {"turbo": True}}, 422, "options.turbo"),
        ({"url": "ftp://example.com/v.mp4"}, 422, "url"),
        ({"url": "https://user:pw@example.com/v.mp4"}, 422, "url"),
        ({"url": "https://example.com/" + "a" * 3000}, 422, "url"),
        ({"url": "not a url"}, 422, "url"),
        ({"url": URL, "callback_url": "gopher://x"}, 422, "callback_url"),
        ({"url": URL, "chat_url": "file:///etc/passwd"}, 422, "chat_url"),
    ],
)
async def test_bad_submissions_get_422_with_field(client, payload, status, field):
    body = await problem_of(await client.post("/api/v1/analysis", json=payload), status)
    assert any(e["field"] == field for e in body["errors"]), body


async def test_malformed_json_is_400(client):
    resp = await client.post("/api/v1/analysis", data=b'{"url": ', headers={"Content-Type": "application/json"})
    await problem_of(resp, 400)


async def test_body_over_limit_is_413(client):
    resp = await client.post("/api/v1/analysis", data=b"x" * 100_000, headers={"Content-Type": "application/json"})
    await problem_of(resp, 413)


async def test_private_addresses_refused_unless_allowed(make_client, make_settings, recorder):
    client = await make_client(make_settings(allow_private_urls=False), simple_pipeline(recorder))
    for url in (
        "http://127.0.0.1/v.mp4",
        "http://10.1.2.3/v.mp4",
        "http://[::1]/a",
        "http://169.254.169.254/x",
        "http://localhost:8080/v",
        "http://metadata.google.internal/",
    ):
        body = await problem_of(await client.post("/api/v1/analysis", json={"url": url}), 422)
        assert "private" in body["detail"]
    resp = await client.post("/api/v1/analysis", json={"url": URL, "callback_url": "http://192.168.1.5/hook"})
    await problem_of(resp, 422)


async def test_unknown_job_is_404(client):
    for method, path in (
        ("GET", "/api/v1/analysis/nope"),
        ("GET", "/api/v1/analysis/nope/status"),
        ("DELETE", "/api/v1/analysis/nope"),
        ("POST", "/api/v1/analysis/nope/retry"),
        ("GET", "/api/v1/analysis/nope/stream"),
    ):
        await problem_of(await client.request(method, path), 404)


async def test_same_video_is_deduplicated_unless_forced(client, recorder):
    first = await client.post("/api/v1/analysis", json={"url": URL})
    assert first.status == 202
    first_body = await first.json()
    again = await client.post("/api/v1/analysis", json={"url": "https://m.twitch.tv/videos/2345678901?t=5s"})
    assert again.status == 200
    again_body = await again.json()
    assert again_body["deduplicated"] is True and again_body["job_id"] == first_body["job_id"]
    forced = await client.post("/api/v1/analysis", json={"url": URL, "options": {"force": True}})
    assert forced.status == 202
    assert (await forced.json())["job_id"] != first_body["job_id"]
    recorder.gate("download").set()


async def test_idempotency_key_replays_and_conflicts(client, recorder):
    headers = {"Idempotency-Key": "abc-123"}
    first = await client.post("/api/v1/analysis", json={"url": URL}, headers=headers)
    assert first.status == 202
    replay = await client.post("/api/v1/analysis", json={"url": URL}, headers=headers)
    assert replay.status == 200
    assert (await replay.json())["job_id"] == (await first.json())["job_id"]
    conflict = await client.post("/api/v1/analysis", json={"url": URL + "9"}, headers=headers)
    await problem_of(conflict, 422)
    recorder.gate("download").set()


async def test_concurrent_idempotent_requests_create_one_job(client, recorder):
    headers = {"Idempotency-Key": "race"}
    responses = await asyncio.gather(
        *[
            client.post("/api/v1/analysis", json={"url": URL, "options": {"force": True}}, headers=headers)
            for _ in range(10)
        ]
    )
    ids = {(await r.json())["job_id"] for r in responses}
    assert len(ids) == 1
    assert sorted(r.status for r in responses) == [200] * 9 + [202]
    recorder.gate("download").set()


async def test_queue_full_is_429_with_retry_after(make_client, make_settings, recorder):
    client = await make_client(
        make_settings(max_queued_jobs=2, max_running_jobs=1), simple_pipeline(recorder, download=True)
    )
    statuses = []
    for i in range(5):
        resp = await client.post("/api/v1/analysis", json={"url": f"https://example.com/{i}.mp4"})
        statuses.append(resp.status)
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) > 0
            await problem_of(resp, 429)
        await asyncio.sleep(0.05)  # let the worker take the first one
    assert statuses == [202, 202, 202, 429, 429]
    recorder.gate("download").set()


async def test_status_has_etag_and_304(client, recorder):
    await client.post("/api/v1/queue/pause")  # a queued job does not change between the two polls
    job = await (await client.post("/api/v1/analysis", json={"url": URL})).json()
    first = await client.get(f"/api/v1/analysis/{job['job_id']}/status")
    etag = first.headers["ETag"]
    body = await first.json()
    assert set(body) >= {"job_id", "status", "progress", "updated_at"}
    same = await client.get(f"/api/v1/analysis/{job['job_id']}/status", headers={"If-None-Match": etag})
    assert same.status == 304
    await client.post("/api/v1/queue/resume")
    recorder.gate("download").set()
    await wait_status(client, job["job_id"], {"completed"})
    changed = await client.get(f"/api/v1/analysis/{job['job_id']}/status", headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag


async def test_job_document_shape(client, recorder):
    job = await (await client.post("/api/v1/analysis", json={"url": URL, "priority": "high"})).json()
    recorder.gate("download").set()
    doc = await wait_status(client, job["job_id"], {"completed"})
    for key in (
        "job_id",
        "video_id",
        "status",
        "progress",
        "stages",
        "results",
        "error",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
        "attempts",
        "priority",
    ):
        assert key in doc
    assert doc["priority"] == "high" and doc["attempts"] == 1 and doc["error"] is None
    stage = doc["stages"][0]
    assert set(stage) >= {"name", "status", "progress", "started_at", "finished_at"}
    assert doc["progress"]["stages_completed"] == doc["progress"]["total_stages"] == 5


async def test_new_job_reads_back_as_it_was_answered(client):
    """A new job is kept as the JSON it was stored as until something reads it; the first read
    must show exactly what the 202 promised."""
    payload = {
        "url": URL,
        "priority": "urgent",
        "chat_url": "https://example.com/chat.json",
        "callback_url": "https://example.com/hook",
        "options": {"top_n": 3, "language": "en"},
    }
    await client.post("/api/v1/queue/pause")
    resp = await client.post("/api/v1/analysis", json=payload)
    assert resp.status == 202
    answer = await resp.json()
    SubmitResponse.model_validate(answer)  # the documented response model
    assert answer["status"] == "queued" and answer["queue_position"] == 1 and answer["deduplicated"] is False
    assert answer["progress"]["current_stage"] == "Queued" and answer["progress"]["total_stages"] == 5
    doc = await (await client.get(f"/api/v1/analysis/{answer['job_id']}")).json()
    for key in ("job_id", "video_id", "status", "progress", "status_url", "stream_url", "queue_position"):
        assert doc[key] == answer[key], key
    assert doc["created_at"].rstrip("Z") == answer["created_at"].rstrip("Z")
    assert doc["priority"] == "urgent" and doc["chat_url"] == payload["chat_url"]
    assert doc["callback_url"] == payload["callback_url"]
    assert doc["options"]["top_n"] == 3 and doc["options"]["language"] == "en" and doc["options"]["force"] is False
    assert [s["status"] for s in doc["stages"]] == ["pending"] * 5


async def test_queue_position_of_a_new_job_counts_its_priority(client):
    await client.post("/api/v1/queue/pause")
    for video in ("1000001", "1000002"):
        resp = await client.post("/api/v1/analysis", json={"url": f"https://www.twitch.tv/videos/{video}"})
        assert resp.status == 202
    urgent = await client.post("/api/v1/analysis", json={"url": URL, "priority": "urgent"})
    answer = await urgent.json()
    assert answer["queue_position"] == 1  # ahead of the two normal jobs, not behind them
    status = await (await client.get(f"/api/v1/analysis/{answer['job_id']}/status")).json()
    assert status["queue_position"] == 1


async def test_list_jobs_newest_first_with_cursor(client, recorder):
    ids = []
    for i in range(5):
        resp = await client.post("/api/v1/analysis", json={"url": f"https://example.com/{i}.mp4"})
        ids.append((await resp.json())["job_id"])
    page = await (await client.get("/api/v1/jobs?limit=2")).json()
    assert [j["job_id"] for j in page["jobs"]] == ids[::-1][:2]
    page2 = await (await client.get(f"/api/v1/jobs?limit=2&cursor={page['next_cursor']}")).json()
    assert [j["job_id"] for j in page2["jobs"]] == ids[::-1][2:4]
    queued = await (await client.get("/api/v1/jobs?status=queued")).json()
    assert all(j["status"] == "queued" for j in queued["jobs"])
    await problem_of(await client.get("/api/v1/jobs?status=bogus"), 422)
    await problem_of(await client.get("/api/v1/jobs?limit=0"), 422)
    await problem_of(await client.get("/api/v1/jobs?limit=abc"), 422)
    recorder.gate("download").set()


async def test_health_and_readiness(client):
    live = await client.get("/health")
    assert live.status == 200 and (await live.json())["state"] in ("ready", "busy")
    ready = await client.get("/health/ready")
    assert ready.status == 200
    assert (await ready.json())["detail"] == {"store": True, "workers": True}


async def test_admin_routes_need_token(make_client, make_settings, recorder):
    client = await make_client(make_settings(admin_token="s3cret"), simple_pipeline(recorder))
    await problem_of(await client.get("/api/v1/queue/stats"), 401)
    await problem_of(await client.get("/api/v1/queue/stats", headers={"Authorization": "Bearer nope"}), 401)
    auth = {"Authorization": "Bearer s3cret"}
    stats = await (await client.get("/api/v1/queue/stats", headers=auth)).json()
    for key in (
        "queued",
        "running",
        "resources",
        "oldest_queued_age_seconds",
        "last_hour",
        "stage_durations",
        "paused",
    ):
        assert key in stats
    assert (await (await client.post("/api/v1/queue/pause", headers=auth)).json())["paused"] is True
    assert (await (await client.get("/api/v1/queue/stats", headers=auth)).json())["paused"] is True
    assert (await (await client.post("/api/v1/queue/resume", headers=auth)).json())["paused"] is False


async def test_admin_routes_open_to_loopback_without_token(client):
    assert (await client.get("/api/v1/queue/stats")).status == 200


async def test_drain_turns_readiness_off_and_refuses_jobs(client):
    assert (await client.post("/api/v1/queue/drain")).status == 200
    assert (await client.get("/health/ready")).status == 503
    resp = await client.post("/api/v1/analysis", json={"url": URL})
    assert resp.status == 503 and resp.headers["Retry-After"]
    await client.post("/api/v1/queue/resume")
    assert (await client.get("/health/ready")).status == 200


async def test_paused_queue_holds_jobs(client, recorder):
    recorder.gate("download").set()
    await client.post("/api/v1/queue/pause")
    job = await (await client.post("/api/v1/analysis", json={"url": URL})).json()
    await asyncio.sleep(0.2)
    assert (await (await client.get(f"/api/v1/analysis/{job['job_id']}")).json())["status"] == "queued"
    await client.post("/api/v1/queue/resume")
    await wait_status(client, job["job_id"], {"completed"})


async def test_api_keys_guard_job_routes_and_stream_token(make_client, make_settings, recorder):
    client = await make_client(make_settings(api_keys=("k1", "k2")), simple_pipeline(recorder))
    await problem_of(await client.post("/api/v1/analysis", json={"url": URL}), 401)
    resp = await client.post("/api/v1/analysis", json={"url": URL}, headers={"Authorization": "Bearer k2"})
    assert resp.status == 202
    job = await resp.json()
    await problem_of(await client.get(f"/api/v1/analysis/{job['job_id']}"), 401)
    assert "token=" in job["stream_url"]
    path = job["stream_url"]
    stream = await client.get(path)  # no header: the signed token is enough
    assert stream.status == 200 and stream.content_type == "text/event-stream"
    stream.close()
    forged = path.rsplit("token=", 1)[0] + "token=9999999999.AAAA"
    await problem_of(await client.get(forged), 401)


async def metrics_text(client: Any) -> str:
    return await (await client.get("/metrics")).text()


async def test_metrics_are_prometheus_exposition(client, recorder):
    recorder.gate("download").set()
    job = await (await client.post("/api/v1/analysis", json={"url": URL})).json()
    assert (await client.post("/api/v1/analysis", json={"url": URL})).status == 200  # a duplicate
    await wait_status(client, job["job_id"], {"completed"})
    async with asyncio.timeout(5):  # the job shows completed a moment before its event is counted
        while 'klipstream_jobs_finished_total{status="completed"} 1.0' not in (text := await metrics_text(client)):
            await asyncio.sleep(0.02)
    for name in (
        'klipstream_jobs_submitted_total{priority="normal"} 1.0',
        'klipstream_jobs_finished_total{status="completed"} 1.0',
        "klipstream_queue_depth",
        "klipstream_running_jobs",
        "klipstream_stage_duration_seconds_bucket",
        "klipstream_sse_subscribers",
        "klipstream_event_loop_lag_seconds_bucket",
    ):
        assert name in text, name


async def test_openapi_document_is_generated_and_valid(client):
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "/api/v1/analysis" in doc["paths"] and "post" in doc["paths"]["/api/v1/analysis"]
    assert "SubmitRequest" in doc["components"]["schemas"]
    from openapi_spec_validator import validate

    validate(doc)


async def test_cors_preflight_and_headers(client):
    resp = await client.options(
        "/api/v1/analysis", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers


async def test_cors_explicit_origins_allow_credentials(make_client, make_settings, recorder):
    client = await make_client(make_settings(cors_origins=("https://app.example",)), simple_pipeline(recorder))
    ok = await client.get("/health", headers={"Origin": "https://app.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"
    other = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    missing = await client.get("/api/v1/analysis/nope", headers={"Origin": "https://app.example"})
    assert missing.status == 404 and missing.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_cors_headers_reach_event_streams(client, recorder):
    job = await (await client.post("/api/v1/analysis", json={"url": URL})).json()
    stream = await client.get(f"/api/v1/analysis/{job['job_id']}/stream", headers={"Origin": "https://app.example"})
    assert stream.headers["Access-Control-Allow-Origin"] == "*"
    stream.close()
    recorder.gate("download").set()
