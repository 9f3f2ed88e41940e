"""Twitch chat replay over Twitch's GraphQL endpoint, the way TwitchDownloader fetches it.

Twitch serves a VOD's chat through the web client's persisted query `VideoCommentsByOffsetOrCursor`:
the first page is addressed by `contentOffsetSeconds`, every following page by the `cursor` of the
previous page's last edge, until `pageInfo.hasNextPage` is false. One cursor chain is strictly
sequential, so the VOD is split into time ranges that each start their own chain by offset and run
concurrently on the one shared aiohttp session; a range stops as soon as its chain passes the
range's end. Ranges are disjoint, so ordering the output is concatenation, not a sort.

Comments are spooled to per-range files as they arrive (already encoded in the artifact format),
so memory holds only the ids used for de-duplication and a few bytes per message for the merge,
whatever the size of the chat.

Twitch refusing (integrity check, unknown persisted query, 4xx, no such video) raises
`ChatRefused`, a StageUnavailable: the chat stage ends `unavailable` and the job goes on.
Transient failures (5xx, 429, network, null pages) are retried with exponential backoff and full
jitter, honouring Retry-After; when they persist the error is classified and retryable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from klipstream.acquisition.chat_archive import ChatSpool, ChatVideo, cheered_bits, system_event
from klipstream.chat import Badge, ChatMessage, Fragment
from klipstream.errors import ExternalServiceError, KlipstreamError, NetworkError, StageUnavailable
from klipstream.retry import RetryPolicy, parse_retry_after

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

COMMENTS_OPERATION = "VideoCommentsByOffsetOrCursor"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # one page is ~50 KB; anything near this is not Twitch
_TRANSIENT_GQL_ERRORS = ("service timeout", "service error", "service unavailable", "rate limit", "timeout")


class ChatRefused(StageUnavailable):
    """Twitch will not give this chat to us; the message says what the user can do instead."""


class _Transient(Exception):
    """One attempt failed in a way a later attempt may not."""

    def __init__(self, what: str, *, retry_after: float | None = None, network: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after
        self.network = network


@dataclass(frozen=True)
class GqlConfig:
    url: str
    client_id: str
    comments_hash: str


GQL_RETRY = RetryPolicy(attempts=8, base_seconds=0.25, cap_seconds=8.0)
VIDEO_RETRY = RetryPolicy(attempts=3, base_seconds=0.25, cap_seconds=8.0)  # the length is optional
CLIP_PAGES = 10  # pages of 100 clips read per channel
GQL_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10, sock_read=20)


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[ChatMessage]
    last_cursor: str | None
    has_next: bool
    channel_id: str | None


@dataclass(frozen=True, slots=True)
class ChatRange:
    index: int
    start: int  # whole seconds: Twitch only accepts integer offsets
    end: float  # exclusive; math.inf for the last range


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body, refusing (ValueError) to hold more than `limit` bytes in memory."""
    length = response.content_length
    if length is not None and length > limit:
        raise ValueError(f"response of {length} bytes exceeds {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"response exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def split_ranges(duration: float | None, count: int, *, min_seconds: float = 60.0) -> list[ChatRange]:
    """Disjoint [start, end) ranges covering the VOD; the last is open-ended.

    Open-ended because comments can sit slightly past the reported length, and one range when the
    length is unknown. Very short VODs get fewer ranges: a range costs at least one request.
    """
    if not duration or duration <= 0:
        return [ChatRange(0, 0, math.inf)]
    count = max(1, min(count, int(duration // min_seconds) or 1))
    bounds = [int(duration * i / count) for i in range(count)]
    return [ChatRange(i, bounds[i], bounds[i + 1] if i + 1 < count else math.inf) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Response shape
# ---------------------------------------------------------------------------------------------


def _s(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def node_to_message(node: Any) -> ChatMessage | None:
    """One GQL comment node as a ChatMessage; None for nodes Twitch nulled or damaged."""
    if not isinstance(node, dict):
        return None
    offset = node.get("contentOffsetSeconds")
    comment_id = _s(node.get("id"))
    if comment_id is None or isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset < 0:
        return None
    message = _obj(node.get("message"))
    fragments = []
    for frag in message.get("fragments") or ():
        if isinstance(frag, dict) and isinstance(frag.get("text"), str):
            emote = frag.get("emote")
            emote_id = _s(emote.get("emoteID")) if isinstance(emote, dict) else None
            fragments.append(Fragment(frag["text"], emote_id))
    badges = tuple(
        Badge(_s(b.get("setID")) or "", _s(b.get("version")) or "")
        for b in message.get("userBadges") or ()
        if isinstance(b, dict) and (b.get("setID") or b.get("version"))
    )
    # A deleted account leaves commenter null; the message still counts as chat activity.
    commenter = _obj(node.get("commenter"))
    display_name = (_s(commenter.get("displayName")) or "").strip()
    login = (_s(commenter.get("login")) or display_name).lower()
    text = "".join(f.text for f in fragments)
    bits = cheered_bits(text)
    return ChatMessage(
        time=float(offset),
        user=login,
        text=text,
        display_name=display_name,
        id=comment_id,
        user_id=_s(commenter.get("id")) or "",
        fragments=tuple(fragments),
        badges=badges,
        color=_s(message.get("userColor")),
        created_at=_s(node.get("createdAt")),
        system=system_event(login, text, None, bits),
        bits=bits,
    )


def _errors(payload: dict[str, Any]) -> list[str]:
    """GraphQL-level errors; refusals raise at once, transient ones raise _Transient."""
    raw = payload.get("errors")
    if not raw:
        return []
    messages = [str(e.get("message", "")) if isinstance(e, dict) else str(e) for e in raw]
    joined = " | ".join(messages).lower()
    if "integrity" in joined:
        raise ChatRefused(
            "Twitch refused the chat replay request (failed integrity check): it now demands a browser "
            "integrity token for this client. Supply the chat with chat_url (a TwitchDownloader JSON or a "
            "time,username,message CSV), or set KLIPSTREAM_TWITCH_CLIENT_ID to a client Twitch still accepts."
        )
    if "persistedquerynotfound" in joined:
        raise ChatRefused(
            "Twitch no longer knows the chat replay query (PersistedQueryNotFound). Update "
            "KLIPSTREAM_TWITCH_COMMENTS_HASH to the current VideoCommentsByOffsetOrCursor hash, or supply the "
            "chat with chat_url."
        )
    if any(marker in joined for marker in _TRANSIENT_GQL_ERRORS):
        raise _Transient(f"GraphQL error: {messages[0][:200]}")
    return messages


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class GqlClient:
    """Sends single GraphQL operations to Twitch with retries; one per chat fetch."""

    def __init__(self, session: aiohttp.ClientSession, config: GqlConfig, policy: RetryPolicy | None = None) -> None:
        self.session = session
        self.config = config
        self.policy = policy or GQL_RETRY
        self.requests = 0
        self.retries = 0

    async def _post_once(self, operation: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        headers = {"Client-Id": self.config.client_id, "Accept": "application/json"}
        async with self.session.post(
            self.config.url, json=[operation], headers=headers, timeout=GQL_TIMEOUT, allow_redirects=False
        ) as response:
            status = response.status
            if status == 429 or status == 408 or status >= 500:
                raise _Transient(f"HTTP {status}", retry_after=parse_retry_after(response.headers.get("Retry-After")))
            if status >= 300:
                detail = ""
                with contextlib.suppress(Exception):
                    detail = (await read_body(response, 2048)).decode("utf-8", "replace").strip()[:200]
                raise ChatRefused(
                    f"Twitch refused the chat replay request (HTTP {status}{': ' + detail if detail else ''}). "
                    "Check KLIPSTREAM_TWITCH_CLIENT_ID, or supply the chat with chat_url."
                )
            try:
                body = await read_body(response, MAX_RESPONSE_BYTES)
            except ValueError as exc:
                raise ExternalServiceError(
                    f"Twitch's chat endpoint sent an oversized response ({exc}).", code="twitch_chat_bad_response"
                ) from None
        try:
            payload = json.loads(body)
        except ValueError:
            raise _Transient("response is not JSON") from None
        if isinstance(payload, list):
            payload = payload[0] if payload else None
        if not isinstance(payload, dict):
            raise _Transient("response is not a GraphQL result")
        return payload

    async def retrying(self, attempt: Callable[[], Awaitable[T]], what: str, policy: RetryPolicy | None = None) -> T:
        """Run `attempt` until it succeeds, refuses, or the policy's attempts are spent."""
        policy = policy or self.policy
        last: _Transient | None = None
        failures = 0
        while True:
            try:
                return await attempt()
            except _Transient as exc:
                last = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = _Transient(type(exc).__name__, network=True)
            failures += 1
            if policy.exhausted(failures):
                break
            self.retries += 1
            await asyncio.sleep(policy.delay(failures, last.retry_after))
        message = f"Twitch chat replay failed {failures} times while fetching {what} (last: {last.what})."
        if last.network:
            raise NetworkError(message, code="twitch_chat_unreachable")
        raise ExternalServiceError(message, code="twitch_chat_failed", retry_after=last.retry_after)

    async def video(self, video_id: str) -> ChatVideo | None:
        """The VOD's title, length and channel (what TwitchDownloader asks first), or None if Twitch won't say.

        Raises ChatRefused when Twitch answers that the video does not exist.
        """
        if not video_id.isdigit():
            raise ValueError("Twitch video ids are numeric")
        query = f'query{{video(id:"{video_id}"){{id,title,lengthSeconds,createdAt,owner{{id,login,displayName}}}}}}'

        async def attempt() -> tuple[dict[str, Any], list[str]]:
            payload = await self._post_once({"query": query, "variables": {}})
            return payload, _errors(payload)

        try:
            payload, messages = await self.retrying(attempt, "the video length", VIDEO_RETRY)
        except (ChatRefused, ExternalServiceError, NetworkError):
            return None  # the comments query decides whether chat is available at all
        data = payload.get("data")
        video = data.get("video") if isinstance(data, dict) else None
        if video is None and not messages and isinstance(data, dict) and "video" in data:
            raise ChatRefused(
                f"Twitch has no video {video_id} (deleted, expired or private), so there is no chat replay."
            )
        if not isinstance(video, dict):
            return None
        owner = _obj(video.get("owner"))
        length = video.get("lengthSeconds")
        if isinstance(length, bool) or not isinstance(length, (int, float)) or length <= 0:
            length = None
        return ChatVideo(
            id=video_id,
            title=_s(video.get("title")),
            length_seconds=float(length) if length is not None else None,
            channel=_s(owner.get("displayName")) or _s(owner.get("login")),
            channel_id=_s(owner.get("id")),
            created_at=_s(video.get("createdAt")),
            channel_login=_s(owner.get("login")),
        )

    async def clips(self, login: str, video_id: str, *, max_pages: int = CLIP_PAGES) -> list[dict[str, Any]]:
        """Clips viewers made of this VOD: the channel's clips, most viewed first, kept when they
        come from `video_id`. Twitch lists clips per channel, not per video, so this reads up to
        `max_pages` pages of 100 (the clips that matter are the watched ones, on the first pages).
        """
        if not re.fullmatch(r"[A-Za-z0-9_]{1,25}", login):
            return []
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(max_pages):
            after = f',after:"{cursor}"' if cursor else ""
            query = (
                f'query{{user(login:"{login}"){{clips(first:100{after},criteria:{{period:ALL_TIME,sort:VIEWS_DESC}})'
                "{pageInfo{hasNextPage},edges{cursor,node{id,title,viewCount,durationSeconds,videoOffsetSeconds,"
                "video{id}}}}}}"
            )

            async def attempt(query: str = query) -> dict[str, Any]:
                payload = await self._post_once({"query": query, "variables": {}})
                _errors(payload)
                return payload

            payload = await self.retrying(attempt, "the VOD's clips", VIDEO_RETRY)
            user = _obj(_obj(payload.get("data")).get("user"))
            clips = _obj(user.get("clips"))
            edges = clips.get("edges") or []
            for edge in edges:
                node = _obj(_obj(edge).get("node"))
                if _s(_obj(node.get("video")).get("id")) != video_id:
                    continue
                offset, duration, views = (
                    node.get("videoOffsetSeconds"),
                    node.get("durationSeconds"),
                    node.get("viewCount"),
                )
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (offset, duration, views)):
                    continue
                found.append(
                    {
                        "id": _s(node.get("id")) or "",
                        "title": _s(node.get("title")) or "",
                        "vod_offset": float(offset),
                        "duration": float(duration),
                        "views": int(views),
                    }
                )
            cursor = _s(_obj(edges[-1]).get("cursor")) if edges else None
            if not _obj(clips.get("pageInfo")).get("hasNextPage") or not cursor:
                break
        found.sort(key=lambda c: c["vod_offset"])
        return found

    async def comments(self, video_id: str, *, offset: int | None = None, cursor: str | None = None) -> Page:
        """One page of comments; by offset for the first page of a chain, by cursor afterwards."""
        variables: dict[str, Any] = {"videoID": video_id}
        if cursor is None:
            variables["contentOffsetSeconds"] = int(offset or 0)
        else:
            variables["cursor"] = cursor
        operation = {
            "operationName": COMMENTS_OPERATION,
            "variables": variables,
            "extensions": {"persistedQuery": {"version": 1, "sha256Hash": self.config.comments_hash}},
        }

        async def attempt() -> Page:
            payload = await self._post_once(operation)
            messages = _errors(payload)
            data = payload.get("data")
            video = data.get("video") if isinstance(data, dict) else None
            if not isinstance(video, dict):
                if messages:
                    raise ChatRefused(f"Twitch refused the chat replay request: {messages[0][:200]}.")
                raise ChatRefused(
                    f"Twitch has no video {video_id} (deleted, expired or subscriber-only), so there is no chat "
                    "replay. Supply the chat with chat_url if you have an archive."
                )
            comments = video.get("comments")
            if not isinstance(comments, dict) or not isinstance(comments.get("edges"), list):
                if messages:
                    raise ChatRefused(f"Twitch refused the chat replay request: {messages[0][:200]}.")
                raise _Transient("null page")  # Twitch sometimes answers comments: null; asking again works
            return _page(video, comments)

        where = f"cursor page of video {video_id}" if cursor else f"offset {variables.get('contentOffsetSeconds')}"
        return await self.retrying(attempt, where)


def _page(video: dict[str, Any], comments: dict[str, Any]) -> Page:
    out: list[ChatMessage] = []
    last_cursor: str | None = None
    for edge in comments["edges"]:
        if not isinstance(edge, dict):
            continue
        cursor = _s(edge.get("cursor"))
        if cursor:
            last_cursor = cursor
        message = node_to_message(edge.get("node"))
        if message is not None:
            out.append(message)
    info = _obj(comments.get("pageInfo"))
    creator = _obj(video.get("creator"))
    return Page(out, last_cursor, bool(info.get("hasNextPage")), _s(creator.get("id")))


# ---------------------------------------------------------------------------------------------
# Spooling and fetching ranges
# ---------------------------------------------------------------------------------------------


@dataclass
class RangeState:
    range: ChatRange
    reached: float = 0.0  # highest offset this range has seen
    done: bool = False
    pages: int = 0


@dataclass
class FetchResult:
    spools: list[ChatSpool]
    count: int
    channel_id: str | None
    requests: int
    retries: int


class ChatFetch:
    """Fetches every range of one VOD concurrently into spools; `fraction()` is the progress."""

    def __init__(
        self, client: GqlClient, video_id: str, ranges: list[ChatRange], spool_dir: Path, duration: float | None
    ) -> None:
        self.client = client
        self.video_id = video_id
        self.states = [RangeState(r, reached=float(r.start)) for r in ranges]
        self.spool_dir = spool_dir
        self.duration = duration
        self.seen: set[str] = set()
        self.channel_id: str | None = None

    @property
    def count(self) -> int:
        return len(self.seen)

    def fraction(self) -> float:
        """Share of the VOD's offsets whose comments are fetched; 0 until done when the length is unknown."""
        if not self.duration:
            return 1.0 if all(s.done for s in self.states) else 0.0
        covered = 0.0
        for state in self.states:
            end = min(state.range.end, self.duration)
            span = max(0.0, end - state.range.start)
            covered += span if state.done else min(span, max(0.0, state.reached - state.range.start))
        return min(1.0, covered / self.duration)

    async def run(self) -> FetchResult:
        spools = [ChatSpool(self.spool_dir, f"chat_range_{s.range.index}", self.video_id) for s in self.states]
        try:
            async with asyncio.TaskGroup() as group:
                for state, spool in zip(self.states, spools, strict=True):
                    group.create_task(self._fetch_range(state, spool))
        except BaseException as exc:
            for spool in spools:
                spool.remove()
            primary = _first(exc, ChatRefused) or _first(exc, KlipstreamError)
            if primary is not None and primary is not exc:
                raise primary from None
            raise
        for spool in spools:
            spool.close()
        return FetchResult(spools, self.count, self.channel_id, self.client.requests, self.client.retries)

    async def _fetch_range(self, state: RangeState, spool: ChatSpool) -> None:
        rng = state.range
        cursor: str | None = None
        while True:
            page = await self.client.comments(self.video_id, offset=rng.start, cursor=cursor)
            state.pages += 1
            if page.channel_id and not self.channel_id:
                self.channel_id = page.channel_id
            passed_end = False
            for message in page.messages:
                if message.time < rng.start:
                    continue  # Twitch's first page may start a little before the requested offset
                if message.time >= rng.end:
                    passed_end = True
                    break
                state.reached = max(state.reached, message.time)
                if message.id in self.seen:
                    continue
                self.seen.add(message.id)
                spool.add(message, page.channel_id or self.channel_id)
            if passed_end or not page.has_next or not page.last_cursor or page.last_cursor == cursor:
                break
            cursor = page.last_cursor
            await asyncio.sleep(0)  # fairness between ranges when the peer answers instantly
        state.done = True


def _first(exc: BaseException, kind: type[E]) -> E | None:
    """The first `kind` inside a TaskGroup's exception group: the range failure that explains the rest."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first(inner, kind)
            if found is not None:
                return found
    return None


async def report_progress(fetch: ChatFetch, report: Callable[[float, str], None], interval: float = 0.5) -> None:
    """Report progress every `interval` seconds until cancelled (the stage cancels it when done)."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        report(fetch.fraction(), f"{fetch.count:,} chat messages ({elapsed:.0f} s)")
        await asyncio.sleep(interval)
