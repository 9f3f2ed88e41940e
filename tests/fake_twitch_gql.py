"""A local stand-in for gql.twitch.tv that speaks Twitch's chat replay wire format.

POST /gql with a JSON operation or a JSON list of operations (answered in kind), each either the
persisted query `VideoCommentsByOffsetOrCursor` (variables `{videoID, contentOffsetSeconds}` or
`{videoID, cursor}`) or a raw `query{video(id:"..."){...lengthSeconds...}}`. Answers carry Twitch's
shape: `data.video.comments.edges[].{cursor, node{id, commenter{id, login, displayName},
contentOffsetSeconds, createdAt, message{fragments[{text, emote}], userBadges, userColor}}}` and
`pageInfo.hasNextPage`, ~60-100 edges a page, with the `Client-Id` header and the persisted-query
hash checked the way Twitch checks them.

The chat is `comments` deterministic messages at seeded random offsets over `duration` seconds
(bursts and quiet seconds, several messages per second, so range boundaries land inside bursts).

Failure injection (FakeChat fields; counters apply to comment requests and count down):
`fail_500`, `throttle_429` (+ `retry_after`), `null_pages`, `null_nodes_every`, `integrity`,
`video_null`, `slow_seconds`, `expose_length`, `clips_fail`. Viewer clips (`clips`) answer the raw
`query{user(login:"..."){clips(first:N,after:"C",criteria:{...}){pageInfo{hasNextPage},edges{cursor,
node{id,title,viewCount,durationSeconds,videoOffsetSeconds,video{id}}}}}}` in pages.

Run standalone for benchmarks (a separate process, so the client is measured alone):
    python tests/fake_twitch_gql.py --comments 100000 --duration 36000
prints `LISTENING <url>` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import json
import random
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

DEFAULT_CLIENT_ID = "kd1unb4b3q4t58fwlpcbzcbnm76a8fp"
DEFAULT_HASH = "b70a3591ff0f4e0313d126c6a1502d79a1c02baebb288227c582044aa76adf6a"
_VIDEO_QUERY = re.compile(r'video\(\s*id\s*:\s*"(\d+)"\s*\)')
_CLIPS_QUERY = re.compile(r'user\(\s*login\s*:\s*"(\w+)"\s*\)\s*\{\s*clips\(first:(\d+)(?:,after:"([^"]*)")?')
_WORDS = ("gg", "lol", "PogChamp", "what a play", "no way", "clip it", "hello chat", "W", "L", "ez")
_STARTED = datetime(2025, 3, 1, 18, 0, tzinfo=UTC)


@dataclass
class FakeChat:
    video_id: str = "123456789"
    comments: int = 1000
    duration: int = 3600
    seed: int = 7
    page_min: int = 60
    page_max: int = 100
    client_id: str = DEFAULT_CLIENT_ID
    comments_hash: str = DEFAULT_HASH
    # --- failure injection ---
    fail_500: int = 0  # the next N comment requests answer HTTP 500
    throttle_429: int = 0  # the next N comment requests answer HTTP 429 with Retry-After
    retry_after: str = "1"
    null_pages: int = 0  # the next N comment requests answer `comments: null`
    null_nodes_every: int = 0  # every k-th comment comes back as `node: null` on every page (it is lost)
    integrity: bool = False  # refuse comment requests with "failed integrity check"
    video_null: bool = False  # the video does not exist
    slow_seconds: float = 0.0  # delay before answering each comment request
    expose_length: bool = True  # answer the video query with lengthSeconds
    # Viewer clips of the channel, most viewed first: {id, title, viewCount, durationSeconds,
    # videoOffsetSeconds, video_id}; clips of other videos are listed too, as Twitch does.
    clips: list[dict[str, Any]] = field(default_factory=list)
    clips_fail: bool = False  # the clips query answers a GraphQL error
    # --- observed ---
    requests: int = 0
    comment_requests: int = 0
    video_requests: int = 0
    clips_requests: int = 0
    inflight: int = 0
    max_inflight: int = 0
    offsets_requested: list[int] = field(default_factory=list)
    lost_ids: set[str] = field(default_factory=set)  # ids hidden behind null nodes

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        # Bursty: a third of the messages cluster around a few hype moments.
        hype = [rng.randrange(self.duration) for _ in range(max(1, self.duration // 600))]
        offsets = []
        for i in range(self.comments):
            if i % 3 == 0:
                offsets.append(min(self.duration - 1, max(0, int(rng.gauss(rng.choice(hype), 20)))))
            else:
                offsets.append(rng.randrange(self.duration))
        self.offsets = sorted(offsets)

    # --- the chat itself ---
    def comment_id(self, i: int) -> str:
        return f"{i:08x}-{self.seed:04x}-4000-8000-{int(self.video_id) % 10**12:012d}"

    def node(self, i: int) -> dict[str, Any]:
        user = (i * 7919) % 503
        words = _WORDS[i % len(_WORDS)]
        fragments: list[dict[str, Any]] = []
        if i % 7 == 3:
            text = f'she said "{words}", then left\nnew line'
        elif i % 11 == 5:
            text = f"{words}, ünïcödé 🎉, commas, and more"
        else:
            text = f"{words} #{i}"
        if i % 5 == 0:
            fragments.append({"emote": None, "text": text + " "})
            fragments.append({"emote": {"id": f"{i}-25", "emoteID": "25", "from": len(text) + 1}, "text": "Kappa"})
        else:
            fragments.append({"emote": None, "text": text})
        badges = [{"id": "c3Vic2NyaWJlcjsxMjs=", "setID": "subscriber", "version": "12"}] if user % 3 == 0 else []
        offset = self.offsets[i]
        return {
            "id": self.comment_id(i),
            "commenter": {"id": str(40000 + user), "login": f"viewer{user}", "displayName": f"Viewer{user}"}
            if user != 13
            else None,  # deleted accounts come back as null commenters
            "contentOffsetSeconds": offset,
            "createdAt": (_STARTED + timedelta(seconds=offset)).isoformat().replace("+00:00", "Z"),
            "message": {
                "fragments": fragments,
                "userBadges": badges,
                "userColor": f"#{(user * 2654435761) % 0xFFFFFF:06X}" if user % 4 else None,
            },
        }

    def expected_messages(self) -> list[tuple[str, int]]:
        """(id, offset) of every comment a correct client ends up with, in order."""
        return [(self.comment_id(i), o) for i, o in enumerate(self.offsets) if self.comment_id(i) not in self.lost_ids]

    def cursor(self, i: int) -> str:
        return base64.b64encode(json.dumps({"id": self.comment_id(i), "hk": i}).encode()).decode()

    def _from_cursor(self, cursor: str) -> int | None:
        try:
            data = json.loads(base64.b64decode(cursor, validate=True))
            i = int(data["hk"])
        except (ValueError, KeyError, TypeError):
            return None
        if not 0 <= i < len(self.offsets) or data.get("id") != self.comment_id(i):
            return None
        return i + 1

    # --- answers ---
    def _video(self, comments: Any) -> dict[str, Any]:
        return {"id": self.video_id, "creator": {"id": "9001", "channel": {"id": "9001"}}, "comments": comments}

    def answer_comments(self, op: dict[str, Any]) -> dict[str, Any]:
        persisted = (op.get("extensions") or {}).get("persistedQuery") or {}
        if persisted.get("version") != 1 or persisted.get("sha256Hash") != self.comments_hash:
            return {"errors": [{"message": "PersistedQueryNotFound"}], "extensions": {}}
        variables = op.get("variables") or {}
        if variables.get("videoID") != self.video_id or self.video_null:
            return {"data": {"video": None}, "extensions": _ext(op)}
        if self.integrity:
            return {
                "errors": [{"message": "failed integrity check", "path": ["video", "comments"]}],
                "data": {"video": self._video(None)},
                "extensions": _ext(op),
            }
        if self.null_pages > 0:
            self.null_pages -= 1
            return {"data": {"video": self._video(None)}, "extensions": _ext(op)}
        has_offset, has_cursor = "contentOffsetSeconds" in variables, variables.get("cursor") is not None
        if has_offset == has_cursor:
            return {"errors": [{"message": "exactly one of cursor or contentOffsetSeconds"}], "data": {"video": None}}
        if has_cursor:
            start = self._from_cursor(str(variables["cursor"]))
            if start is None:
                return {"errors": [{"message": "invalid cursor"}], "data": {"video": self._video(None)}}
        else:
            offset = variables["contentOffsetSeconds"]
            if not isinstance(offset, int) or isinstance(offset, bool):
                return {"errors": [{"message": "contentOffsetSeconds: Int expected"}], "data": {"video": None}}
            self.offsets_requested.append(offset)
            start = bisect.bisect_left(self.offsets, max(0, offset))
        size = self.page_min + (start * 31) % (self.page_max - self.page_min + 1)
        stop = min(len(self.offsets), start + size)
        edges = []
        for i in range(start, stop):
            node: dict[str, Any] | None = self.node(i)
            if self.null_nodes_every and i % self.null_nodes_every == self.null_nodes_every - 1:
                self.lost_ids.add(self.comment_id(i))
                node = None
            edges.append({"cursor": self.cursor(i), "node": node})
        page_info = {"hasNextPage": stop < len(self.offsets), "hasPreviousPage": start > 0}
        comments = {"edges": edges, "pageInfo": page_info}
        return {"data": {"video": self._video(comments)}, "extensions": _ext(op)}

    def answer_clips(self, match: re.Match[str]) -> dict[str, Any]:
        if self.clips_fail:
            return {"errors": [{"message": "service error", "path": ["user", "clips"]}], "data": {"user": None}}
        if match.group(1) != "fakestreamer":
            return {"data": {"user": None}, "extensions": {}}
        first, start = int(match.group(2)), int(match.group(3) or 0)
        page = self.clips[start : start + first]
        edges = [
            {
                "cursor": str(start + i + 1),
                "node": {
                    "id": c["id"],
                    "title": c["title"],
                    "viewCount": c["viewCount"],
                    "durationSeconds": c["durationSeconds"],
                    "videoOffsetSeconds": c["videoOffsetSeconds"],
                    "video": {"id": c["video_id"]},
                },
            }
            for i, c in enumerate(page)
        ]
        info = {"hasNextPage": start + first < len(self.clips)}
        return {"data": {"user": {"clips": {"pageInfo": info, "edges": edges}}}, "extensions": {}}

    def answer_query(self, op: dict[str, Any]) -> dict[str, Any]:
        clips = _CLIPS_QUERY.search(str(op.get("query")))
        if clips:
            return self.answer_clips(clips)
        match = _VIDEO_QUERY.search(str(op.get("query")))
        if not match:
            return {"errors": [{"message": "Cannot query field on type Query", "locations": []}]}
        if match.group(1) != self.video_id or self.video_null:
            return {"data": {"video": None}, "extensions": {}}
        video = {
            "id": self.video_id,
            "title": "Fake stream with chat",
            "lengthSeconds": self.duration if self.expose_length else None,
            "createdAt": _STARTED.isoformat().replace("+00:00", "Z"),
            "owner": {"id": "9001", "login": "fakestreamer", "displayName": "FakeStreamer"},
        }
        return {"data": {"video": video}, "extensions": {}}


def _is_raw_query(op: dict[str, Any]) -> bool:
    return "query" in op and "extensions" not in op


def _ext(op: dict[str, Any]) -> dict[str, Any]:
    return {"durationMilliseconds": 12, "operationName": op.get("operationName"), "requestID": "01FAKE"}


def make_app(chat: FakeChat) -> web.Application:
    async def gql(request: web.Request) -> web.StreamResponse:
        chat.requests += 1
        client_id = request.headers.get("Client-Id")
        if not client_id:
            return _json_error(400, "Bad Request", 'The "Client-ID" header is missing from the request.')
        if client_id != chat.client_id:
            return _json_error(401, "Unauthorized", 'The "Client-ID" header is invalid.')
        try:
            body = await request.json()
        except ValueError:
            return _json_error(400, "Bad Request", "The request body is not valid JSON.")
        ops = body if isinstance(body, list) else [body]
        if not ops or not all(isinstance(op, dict) for op in ops):
            return _json_error(400, "Bad Request", "Invalid GraphQL request.")
        is_comments = any(op.get("operationName") == "VideoCommentsByOffsetOrCursor" for op in ops)
        chat.inflight += 1
        chat.max_inflight = max(chat.max_inflight, chat.inflight)
        try:
            if is_comments:
                chat.comment_requests += 1
                if chat.slow_seconds:
                    await asyncio.sleep(chat.slow_seconds)
                if chat.fail_500 > 0:
                    chat.fail_500 -= 1
                    return web.Response(status=500, text="Internal Server Error")
                if chat.throttle_429 > 0:
                    chat.throttle_429 -= 1
                    return web.json_response(
                        {"error": "Too Many Requests", "status": 429, "message": "rate limited"},
                        status=429,
                        headers={"Retry-After": chat.retry_after},
                    )
            elif any(_CLIPS_QUERY.search(str(op.get("query"))) for op in ops):
                chat.clips_requests += 1
            else:
                chat.video_requests += 1
            answers = [chat.answer_query(op) if _is_raw_query(op) else chat.answer_comments(op) for op in ops]
            return web.json_response(answers if isinstance(body, list) else answers[0])
        finally:
            chat.inflight -= 1

    app = web.Application()
    app.router.add_post("/gql", gql)
    return app


def _json_error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "status": status, "message": message}, status=status)


@dataclass
class RunningFake:
    chat: FakeChat
    url: str


@contextlib.asynccontextmanager
async def serve(chat: FakeChat, port: int = 0) -> AsyncIterator[RunningFake]:
    """Serve `chat` on 127.0.0.1 (an ephemeral port by default) for the duration of the block."""
    runner = web.AppRunner(make_app(chat), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    try:
        yield RunningFake(chat, f"http://{host}:{bound}/gql")
    finally:
        await runner.cleanup()


async def _main(args: argparse.Namespace) -> None:
    chat = FakeChat(comments=args.comments, duration=args.duration, video_id=args.video_id)
    async with serve(chat, args.port) as fake:
        print(f"LISTENING {fake.url}", flush=True)
        started = time.monotonic()
        while True:
            await asyncio.sleep(3600)
            print(f"served {chat.requests} requests in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comments", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=36_000)
    parser.add_argument("--video-id", default="123456789")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    options = parser.parse_args()
    if options.uvloop:
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(options))
