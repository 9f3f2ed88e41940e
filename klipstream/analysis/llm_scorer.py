"""Optional transcript scorer: any OpenAI-compatible chat-completions endpoint.

Enabled by KLIPSTREAM_LLM_BASE_URL (+ KLIPSTREAM_LLM_MODEL, optional KLIPSTREAM_LLM_API_KEY).
Windows are sent in batches as one JSON document, the answer must be JSON that pydantic accepts
(every score in range, one result per id). Requests share the job's aiohttp session, run at most
`concurrency` at a time and are retried with exponential backoff and jitter on 429, 5xx, network
errors, timeouts and malformed answers.

A window whose batch still fails is returned as a failure with a short reason; the caller scores
it with the default scorer and marks the `model` column, so no number is ever invented.

Answers are cached by a hash of (model, prompt version, full text): in memory (LRU) and on disk
(one small JSON file per text under `<data_dir>/cache/llm/`), so a re-run of the same VOD costs
nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klipstream.analysis.lexicon import load_lexicon
from klipstream.analysis.text_scoring import TextScore, intensity_cues
from klipstream.retry import RetryPolicy, parse_retry_after

PROMPT_VERSION = "1"
SYSTEM_PROMPT = (
    "You rate the emotion in transcript excerpts of a live video-game stream. For each item, return "
    "sentiment in [-1, 1] and excitement, funny, happiness, anger, sadness, neutral each in [0, 1] "
    "(how strongly the streamer expresses it; neutral is high when nothing is expressed). Answer with "
    'JSON only: {"results": [{"id": <id>, "sentiment": x, "excitement": x, "funny": x, "happiness": x, '
    '"anger": x, "sadness": x, "neutral": x}, ...]} with one result for every id.'
)


class LLMItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: int
    sentiment: float = Field(ge=-1.0, le=1.0)
    excitement: float = Field(ge=0.0, le=1.0)
    funny: float = Field(ge=0.0, le=1.0)
    happiness: float = Field(ge=0.0, le=1.0)
    anger: float = Field(ge=0.0, le=1.0)
    sadness: float = Field(ge=0.0, le=1.0)
    neutral: float = Field(ge=0.0, le=1.0)


class LLMAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    results: list[LLMItem]


@dataclass(frozen=True, slots=True)
class LLMOutcome:
    """One text's result: a score, or the reason there is none."""

    score: TextScore | None
    error: str | None
    seconds: float  # this text's share of the request time (0 when cached)
    cached: bool = False


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def cache_key(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\n{PROMPT_VERSION}\n{text}".encode()).hexdigest()


def to_text_score(item: LLMItem, text: str) -> TextScore:
    """The model's emotions, plus the typographic intensity and the highlight formula of text_scoring."""
    lexicon = load_lexicon()
    highlight = max(item.excitement, item.funny, item.anger, item.sadness, 0.6 * item.happiness)
    return TextScore(
        sentiment=item.sentiment,
        excitement=item.excitement,
        funny=item.funny,
        happiness=item.happiness,
        anger=item.anger,
        sadness=item.sadness,
        neutral=item.neutral,
        intensity=intensity_cues(text, lexicon.match(text)),
        highlight=highlight,
        emote_count=0,
    )


class LLMScorer:
    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        http: aiohttp.ClientSession,
        api_key: str = "",
        concurrency: int = 4,
        batch_size: int = 8,
        max_attempts: int = 3,
        retry_base_seconds: float = 0.5,
        timeout_seconds: float = 60.0,
        cache_dir: Path | None = None,
        memory_cache_size: int = 4096,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.http = http
        self.api_key = api_key
        self.batch_size = max(1, batch_size)
        self.retry = RetryPolicy(max(1, max_attempts), retry_base_seconds, 30.0, max_retry_after=30.0)
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.cache_dir = cache_dir
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._memory: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._memory_size = memory_cache_size
        self.requests = 0  # HTTP requests sent, for tests and logs

    async def score_many(self, texts: Sequence[str]) -> list[LLMOutcome]:
        """Scores for `texts` in order; empty texts are not sent (callers treat them as no speech)."""
        outcomes: list[LLMOutcome | None] = [None] * len(texts)
        keys = [cache_key(self.model, t) for t in texts]
        disk = await asyncio.to_thread(self._read_disk, [k for k in keys if k not in self._memory])
        todo: list[int] = []
        for i, text in enumerate(texts):
            if not text.strip():
                outcomes[i] = LLMOutcome(None, "empty text", 0.0)
                continue
            hit = self._memory.get(keys[i]) or disk.get(keys[i])
            if hit is not None:
                self._remember(keys[i], hit)
                outcomes[i] = LLMOutcome(to_text_score(LLMItem(id=i, **hit), text), None, 0.0, cached=True)
            else:
                todo.append(i)
        batches = [todo[k : k + self.batch_size] for k in range(0, len(todo), self.batch_size)]
        results = await asyncio.gather(*(self._run_batch([texts[i] for i in b]) for b in batches))
        new_entries: dict[str, dict[str, float]] = {}
        for batch, batch_result in zip(batches, results, strict=True):
            for i, outcome in zip(batch, batch_result, strict=True):
                outcomes[i] = outcome
                if outcome.score is not None:
                    entry = {k: getattr(outcome.score, k) for k in _FIELDS}
                    self._remember(keys[i], entry)
                    new_entries[keys[i]] = entry
        if new_entries:
            await asyncio.to_thread(self._write_disk, new_entries)
        return [o if o is not None else LLMOutcome(None, "not scored", 0.0) for o in outcomes]

    async def _run_batch(self, texts: list[str]) -> list[LLMOutcome]:
        started = time.monotonic()
        reason = "unknown error"
        failures = 0
        while True:
            try:
                async with self._semaphore:
                    items = await self._request(texts)
                share = (time.monotonic() - started) / len(texts)
                return [
                    LLMOutcome(to_text_score(items[i], t), None, share)
                    if i in items
                    else LLMOutcome(None, "missing from answer", share)
                    for i, t in enumerate(texts)
                ]
            except _Fatal as exc:
                reason = exc.reason
                break
            except _Retryable as exc:
                reason = exc.reason
                failures += 1
                if self.retry.exhausted(failures):
                    break
                await asyncio.sleep(self.retry.delay(failures, exc.retry_after))
        share = (time.monotonic() - started) / len(texts)
        return [LLMOutcome(None, reason, share) for _ in texts]

    async def _request(self, texts: list[str]) -> dict[int, LLMItem]:
        payload = {
            "model": self.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": json.dumps({"items": [{"id": i, "text": t} for i, t in enumerate(texts)]})},
            ],
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.requests += 1
        try:
            async with self.http.post(self.url, json=payload, headers=headers, timeout=self.timeout) as resp:
                if resp.status == 429 or resp.status >= 500:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    raise _Retryable(f"http {resp.status}", retry_after)
                if resp.status >= 400:
                    raise _Fatal(f"http {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise _Retryable(f"network: {type(exc).__name__}") from None
        except json.JSONDecodeError:
            raise _Retryable("response is not JSON") from None
        try:
            content = body["choices"][0]["message"]["content"]
            answer = LLMAnswer.model_validate_json(_strip_fences(content))
        except (KeyError, IndexError, TypeError):
            raise _Retryable("unexpected response shape") from None
        except ValidationError:
            raise _Retryable("answer failed validation") from None
        return {item.id: item for item in answer.results if 0 <= item.id < len(texts)}

    # --- cache ---
    def _remember(self, key: str, entry: dict[str, float]) -> None:
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_size:
            self._memory.popitem(last=False)

    def _disk_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _read_disk(self, keys: list[str]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for key in keys:
            path = self._disk_path(key)
            if path is None:
                break
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                LLMItem(id=0, **data)  # a damaged entry is a miss, not a crash
                out[key] = {k: float(data[k]) for k in _FIELDS}
            except (OSError, ValueError, TypeError, KeyError, ValidationError):
                continue
        return out

    def _write_disk(self, entries: dict[str, dict[str, float]]) -> None:
        for key, entry in entries.items():
            path = self._disk_path(key)
            if path is None:
                return
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(entry), encoding="utf-8")
                os.replace(tmp, path)  # atomic: concurrent jobs never read half a file
            except OSError:
                continue  # the cache is an optimisation; a full disk must not fail scoring


_FIELDS = ("sentiment", "excitement", "funny", "happiness", "anger", "sadness", "neutral")


def _strip_fences(content: Any) -> str:
    """Some servers wrap JSON in ``` fences even in JSON mode."""
    text = str(content).strip()
    if text.startswith("```"):
        text = text.strip("`")
        if text.startswith("json"):
            text = text[4:]
    return text.strip()
