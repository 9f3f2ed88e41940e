"""The optional LLM scorer against a local fake of an OpenAI-compatible chat-completions server."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from klipstream.analysis.llm_scorer import LLMScorer
from klipstream.stages.transcript_analysis import TRANSCRIPT_ANALYSIS
from tests import synthetic
from tests.stage_helpers import make_context


class FakeLLM:
    """Speaks the chat-completions wire format; can fail, throttle and answer garbage on request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int | str] = []  # HTTP statuses or "garbage" / "out-of-range"
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.fail_texts: set[str] = set()  # a batch containing one of these answers 500, always

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"body": body, "auth": request.headers.get("Authorization")})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            action = self.fail_next.pop(0) if self.fail_next else None
            items = json.loads(body["messages"][1]["content"])["items"]
            if any(item["text"] in self.fail_texts for item in items):
                action = 500
            if isinstance(action, int):
                return web.json_response({"error": {"message": "boom"}}, status=action, headers={"Retry-After": "0"})
            results = []
            for item in items:
                excited = "!" in item["text"]
                results.append(
                    {
                        "id": item["id"],
                        "sentiment": 0.5,
                        "excitement": 2.0 if action == "out-of-range" else (0.9 if excited else 0.1),
                        "funny": 0.0,
                        "happiness": 0.4,
                        "anger": 0.0,
                        "sadness": 0.0,
                        "neutral": 0.1 if excited else 0.8,
                    }
                )
            content = "not json at all" if action == "garbage" else json.dumps({"results": results})
            return web.json_response(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                }
            )
        finally:
            self.in_flight -= 1


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeLLM, str]:
    llm = FakeLLM()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", llm.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return llm, str(server.make_url("/v1"))


def _scorer(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> LLMScorer:
    kwargs.setdefault("retry_base_seconds", 0.01)
    return LLMScorer(base_url=url, model="fake-model", http=http, api_key="k", **kwargs)


async def test_scores_batches_and_caches(fake: tuple[FakeLLM, str], tmp_path: Path) -> None:
    llm, url = fake
    texts = [f"window {i}{'!' if i % 2 else ''}" for i in range(10)]
    async with aiohttp.ClientSession() as http:
        scorer = _scorer(http, url, batch_size=4, cache_dir=tmp_path)
        out = await scorer.score_many(texts)
        assert len(llm.requests) == 3  # 10 texts in batches of 4
        assert llm.requests[0]["auth"] == "Bearer k"
        assert llm.requests[0]["body"]["model"] == "fake-model"
        assert all(o.score is not None and o.error is None for o in out)
        assert out[1].score.excitement == 0.9 and out[0].score.excitement == 0.1  # type: ignore[union-attr]
        # Same texts again: memory cache, no request.
        again = await scorer.score_many(texts)
        assert len(llm.requests) == 3 and all(o.cached for o in again)
        # A new scorer (new process) finds them on disk.
        fresh = _scorer(http, url, cache_dir=tmp_path)
        from_disk = await fresh.score_many(texts)
        assert fresh.requests == 0 and [o.score for o in from_disk] == [o.score for o in out]


async def test_retries_then_succeeds(fake: tuple[FakeLLM, str]) -> None:
    llm, url = fake
    llm.fail_next = [503, 429, "garbage"]
    async with aiohttp.ClientSession() as http:
        out = await _scorer(http, url, max_attempts=4).score_many(["hello!"])
    assert out[0].score is not None and len(llm.requests) == 4


async def test_failure_is_reported_not_invented(fake: tuple[FakeLLM, str]) -> None:
    llm, url = fake
    llm.fail_next = ["out-of-range"] * 3 + [400]
    async with aiohttp.ClientSession() as http:
        out = await _scorer(http, url, max_attempts=3).score_many(["a", "b"])
        assert all(o.score is None and o.error == "answer failed validation" for o in out)
        bad_request = await _scorer(http, url, max_attempts=3).score_many(["c"])
    assert bad_request[0].error == "http 400"
    assert len(llm.requests) == 4  # 400 is not retried


async def test_concurrency_is_bounded(fake: tuple[FakeLLM, str]) -> None:
    llm, url = fake
    llm.delay = 0.05
    async with aiohttp.ClientSession() as http:
        await _scorer(http, url, batch_size=1, concurrency=2).score_many([f"t{i}" for i in range(8)])
    assert len(llm.requests) == 8 and llm.max_in_flight == 2


async def test_stage_falls_back_per_window(fake: tuple[FakeLLM, str], tmp_path: Path) -> None:
    llm, url = fake
    stream = synthetic.generate(seed=5, duration=600.0)
    files = stream.write(tmp_path / "in")
    windows = list(csv.DictReader(files["segments_csv"].read_text().splitlines()))
    llm.fail_texts = {next(w["text"] for w in windows if w["text"])}  # its batch fails on every attempt
    async with aiohttp.ClientSession() as http:
        ctx, sink = make_context(
            TRANSCRIPT_ANALYSIS,
            tmp_path / "job",
            http,
            inputs=files,
            llm_base_url=url,
            llm_model="fake-model",
        )
        await TRANSCRIPT_ANALYSIS.run(ctx)
    models = [row["model"] for row in csv.DictReader(ctx.outputs["sentiment_csv"].read_text().splitlines())]
    assert "fake-model" in models
    fallback = [m for m in models if m.startswith("vader-lexicon-1 (fallback:")]
    assert fallback and all("http 500" in m for m in fallback)
    assert sink.warnings and "built-in scorer" in sink.warnings[0]
