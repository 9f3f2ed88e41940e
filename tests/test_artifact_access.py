"""Local artifacts are not public when API keys are on (issue 13, item 16)."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

from klipstream.api.context import TOKENS
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.test_api_basics import URL

KEY = {"Authorization": "Bearer k1"}


async def finished_job(client) -> dict:  # type: ignore[no-untyped-def]
    resp = await client.post("/api/v1/analysis", json={"url": URL}, headers=KEY)
    job_id = (await resp.json())["job_id"]
    for _ in range(500):
        job = await (await client.get(f"/api/v1/analysis/{job_id}", headers=KEY)).json()
        if job["status"] == "completed":
            return job
        await __import__("asyncio").sleep(0.02)
    raise AssertionError("job did not complete")


async def test_artifacts_need_the_key_or_a_signed_link(make_client, make_settings):
    client = await make_client(make_settings(api_keys=("k1",)), simple_pipeline(Recorder()))
    job = await finished_job(client)
    link = job["results"]["highlights_json"]
    parts = urlsplit(link)
    assert parts.path == "/files/2345678901/2345678901_highlights.json"
    assert {"expires", "signature"} <= set(parse_qs(parts.query))
    # the bare path, guessable from the Twitch id, is refused
    assert (await client.get(parts.path)).status == 401
    # the signed link from the results works without a key
    resp = await client.get(link)
    assert resp.status == 200 and "highlights_json" in await resp.text()
    assert "public" not in resp.headers["Cache-Control"]
    # ... the key works without a signature
    assert (await client.get(parts.path, headers=KEY)).status == 200
    # a signature does not carry over to another file, nor survive tampering or expiry
    other = link.replace("2345678901_highlights.json", "audio_2345678901_waveform.json")
    assert (await client.get(other)).status == 401
    assert (await client.get(link.replace("expires=", "expires=9"))).status == 401
    expired = client.app[TOKENS].sign_path(parts.path, now=time.time() - 10 * 24 * 3600)
    assert (await client.get(expired)).status == 401
    # the event stream's terminal event and the legacy answer carry signed links too
    stream = await client.get(f"/api/v1/analysis/{job['job_id']}/stream", headers=KEY)
    assert "signature=" in await stream.text()


async def test_without_api_keys_artifacts_stay_plain_links(make_client, settings):
    client = await make_client(settings, simple_pipeline(Recorder()))
    resp = await client.post("/api/v1/analysis", json={"url": URL})
    job_id = (await resp.json())["job_id"]
    for _ in range(500):
        job = await (await client.get(f"/api/v1/analysis/{job_id}")).json()
        if job["status"] == "completed":
            break
        await __import__("asyncio").sleep(0.02)
    link = job["results"]["highlights_json"]
    assert "?" not in link and (await client.get(link)).status == 200
