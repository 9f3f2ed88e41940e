"""The chat stage against a local fake of Twitch's GraphQL endpoint and a loopback file server."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from klipstream.acquisition.chat_archive import ChatSpool, ChatVideo, write_artifacts
from klipstream.acquisition.twitch_chat import GqlClient, GqlConfig, split_ranges
from klipstream.chat import ChatMessage, Fragment
from klipstream.errors import ExternalServiceError, InvalidVideoUrl, StageUnavailable
from klipstream.jobs.stage import StageContext
from klipstream.models import VideoInfo
from klipstream.retry import RetryPolicy, parse_retry_after
from klipstream.stages.chat import CHAT
from tests.fake_twitch_gql import FakeChat, RunningFake, serve
from tests.stage_helpers import RecordingSink, make_context

VOD = "https://www.twitch.tv/videos/123456789"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def run_twitch(
    fake: RunningFake, http: aiohttp.ClientSession, workdir: Path, **kwargs: Any
) -> tuple[StageContext, RecordingSink]:
    kwargs.setdefault("twitch_gql_url", fake.url)
    ctx, sink = make_context(CHAT, workdir, http, url=kwargs.pop("url", VOD), **kwargs)
    await CHAT.run(ctx)
    return ctx, sink


def iter_csv(path: Path) -> list[tuple[float, str, str]]:
    """A chat CSV artifact read back as (seconds, username, message)."""
    with open(path, encoding="utf-8", newline="") as stream:
        rows = csv.reader(stream)
        next(rows, None)
        return [(float(r[0]), r[1], r[2]) for r in rows if len(r) >= 3]


THREE_TRIES = RetryPolicy(attempts=3, base_seconds=0.25, cap_seconds=8.0)


def read_json(ctx: StageContext) -> dict[str, Any]:
    return json.loads(ctx.outputs["chat_json"].read_text(encoding="utf-8"))


def assert_complete(ctx: StageContext, chat: FakeChat) -> None:
    """Artifacts hold exactly the fake's chat: every comment once, in offset order, CSV matching JSON."""
    doc = read_json(ctx)
    got = [(c["_id"], c["content_offset_seconds"]) for c in doc["comments"]]
    assert got == chat.expected_messages()
    assert len({cid for cid, _ in got}) == len(got)
    rows = list(iter_csv(ctx.outputs["chat_csv"]))
    assert len(rows) == len(got)
    for row, comment in zip(rows, doc["comments"], strict=True):
        assert row[0] == comment["content_offset_seconds"]
        assert row[1] == (comment["commenter"]["display_name"] or comment["commenter"]["name"])
        assert row[2] == comment["message"]["body"]


def no_spools(workdir: Path) -> bool:
    return not [p for p in workdir.iterdir() if p.name.startswith(".chat_range") or p.name.endswith(".part")]


def no_output(workdir: Path) -> bool:
    """Nothing chat-shaped left behind: no artifacts, spools or partial files."""
    return no_spools(workdir) and not list(workdir.glob("*_chat.*"))


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.reader(stream))


# --- Twitch chat replay ---------------------------------------------------------------------


async def test_four_ranges_fetch_every_comment_once_in_order(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=3000, duration=4 * 3600, slow_seconds=0.02)
    async with serve(chat) as fake:
        ctx, sink = await run_twitch(fake, http, tmp_path, chat_ranges=4)
    assert_complete(ctx, chat)
    assert sorted(chat.offsets_requested) == [0, 3600, 7200, 10800]  # one offset-addressed chain per range
    assert chat.max_inflight >= 2  # the ranges really ran side by side
    assert chat.video_requests == 1  # the length came from Twitch, not from the job
    doc = read_json(ctx)
    assert doc["video"]["length"] == 4 * 3600 and doc["video"]["id"] == "123456789"
    assert doc["streamer"] == {"name": "FakeStreamer", "id": "9001"}
    fractions = [f for _, f, _ in sink.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sink.warnings == []
    assert no_spools(tmp_path)


async def test_viewer_clips_of_the_vod_are_kept(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    def clip(n: int, video: str, offset: float, views: int) -> dict[str, Any]:
        return {"id": f"Clip{n}", "title": f"clip {n}", "viewCount": views, "durationSeconds": 30.0,
                "videoOffsetSeconds": offset, "video_id": video}  # fmt: skip

    clips = [clip(i, "123456789" if i % 3 else "555", 10.0 * i, 1000 - i) for i in range(150)]  # two pages
    chat = FakeChat(comments=200, duration=3600, clips=clips)
    async with serve(chat) as fake:
        ctx, sink = await run_twitch(fake, http, tmp_path)
    doc = json.loads(ctx.outputs["viewer_clips"].read_text(encoding="utf-8"))
    assert len(doc["clips"]) == 100 and chat.clips_requests == 2  # the other video's clips are dropped
    first = doc["clips"][0]
    assert first == {"id": "Clip1", "title": "clip 1", "vod_offset": 10.0, "duration": 30.0, "views": 999}
    assert sink.warnings == []


async def test_viewer_clips_failure_is_a_warning(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=200, duration=600, clips_fail=True)
    async with serve(chat) as fake:
        ctx, sink = await run_twitch(fake, http, tmp_path)
    assert "chat_json" in ctx.outputs and "viewer_clips" not in ctx.outputs
    assert any("viewer clips" in w for w in sink.warnings)


async def test_artifact_shapes_are_twitchdownloader_and_csv_quoted(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=200, duration=600)
    async with serve(chat) as fake:
        ctx, _ = await run_twitch(fake, http, tmp_path)
    doc = read_json(ctx)
    emote = next(c for c in doc["comments"] if any(f["emoticon"] for f in c["message"]["fragments"]))
    assert emote["message"]["fragments"][-1] == {"text": "Kappa", "emoticon": {"emoticon_id": "25"}}
    assert emote["message"]["body"].endswith(" Kappa")
    badged = next(c for c in doc["comments"] if c["message"]["user_badges"])
    assert badged["message"]["user_badges"] == [{"_id": "subscriber", "version": "12"}]
    first = doc["comments"][0]
    assert set(first["commenter"]) == {"display_name", "_id", "name"}
    assert first["content_id"] == "123456789" and first["channel_id"] == "9001"
    # Messages with quotes, commas and newlines survive the CSV round trip through a standard reader.
    rows = csv_rows(ctx.outputs["chat_csv"])
    assert rows[0] == ["time", "username", "message"]
    tricky = [r for r in rows[1:] if "\n" in r[2] and '"' in r[2]]
    assert tricky and tricky[0][2].startswith("she said")
    assert [r[2] for r in rows[1:]] == [c["message"]["body"] for c in doc["comments"]]


async def test_known_duration_skips_the_length_query(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=800, duration=1200)
    async with serve(chat) as fake:
        video = VideoInfo(id="123456789", title="From yt-dlp", duration_seconds=1200.0, channel_login="fakestreamer")
        ctx, _ = await run_twitch(fake, http, tmp_path, video=video, chat_ranges=3)
    assert chat.video_requests == 0 and chat.clips_requests == 1
    assert sorted(chat.offsets_requested) == [0, 400, 800]
    assert_complete(ctx, chat)
    assert read_json(ctx)["video"]["title"] == "From yt-dlp"


async def test_unknown_length_walks_one_chain(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=700, duration=3000, expose_length=False)
    async with serve(chat) as fake:
        ctx, sink = await run_twitch(fake, http, tmp_path)
    assert chat.offsets_requested == [0]
    assert_complete(ctx, chat)
    assert sink.progress[-1][1] == 1.0


async def test_transient_500_and_429_are_retried(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=1500, duration=7200, fail_500=4, throttle_429=2, retry_after="1")
    async with serve(chat) as fake:
        ctx, _ = await run_twitch(fake, http, tmp_path)
    assert chat.fail_500 == 0 and chat.throttle_429 == 0  # the failures really happened
    assert_complete(ctx, chat)


async def test_null_pages_and_null_nodes_are_tolerated(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=1200, duration=3600, null_pages=3, null_nodes_every=17)
    async with serve(chat) as fake:
        ctx, _ = await run_twitch(fake, http, tmp_path)
    assert chat.null_pages == 0 and chat.lost_ids
    assert_complete(ctx, chat)  # everything except the nodes Twitch nulled


async def test_integrity_refusal_makes_the_stage_unavailable(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=500, duration=3600, integrity=True)
    async with serve(chat) as fake:
        with pytest.raises(StageUnavailable, match="integrity") as info:
            await run_twitch(fake, http, tmp_path)
    assert "chat_url" in str(info.value)
    assert chat.comment_requests <= 4  # a refusal is not retried
    assert no_output(tmp_path)


@pytest.mark.parametrize(
    ("settings", "fake_kwargs", "match"),
    [
        ({"twitch_comments_hash": "0" * 64}, {}, "KLIPSTREAM_TWITCH_COMMENTS_HASH"),
        ({"twitch_client_id": "wrong"}, {}, "HTTP 401"),
        ({}, {"video_null": True}, "no video 123456789"),
    ],
    ids=["persisted-query-not-found", "bad-client-id", "deleted-video"],
)
async def test_twitch_refusals_are_unavailable(
    http: aiohttp.ClientSession, tmp_path: Path, settings: dict[str, Any], fake_kwargs: dict[str, Any], match: str
) -> None:
    chat = FakeChat(comments=100, duration=600, **fake_kwargs)
    async with serve(chat) as fake:
        with pytest.raises(StageUnavailable, match=match):
            await run_twitch(fake, http, tmp_path, **settings)


async def test_persistent_failures_become_a_retryable_classified_error(http: aiohttp.ClientSession) -> None:
    chat = FakeChat(comments=100, duration=600, fail_500=1000)
    async with serve(chat) as fake:
        client = GqlClient(
            http,
            GqlConfig(fake.url, chat.client_id, chat.comments_hash),
            RetryPolicy(attempts=3, base_seconds=0.25, cap_seconds=8.0),
        )
        with pytest.raises(ExternalServiceError, match="HTTP 500") as info:
            await client.comments("123456789", offset=0)
    assert info.value.retryable and info.value.code == "twitch_chat_failed"
    assert chat.comment_requests == 3


async def test_unreachable_endpoint_is_a_network_error(http: aiohttp.ClientSession) -> None:
    from klipstream.errors import NetworkError

    async with serve(FakeChat(comments=1)) as fake:
        dead = fake.url  # the server is gone once the block exits
    client = GqlClient(http, GqlConfig(dead, "x", "y"), RetryPolicy(attempts=2, base_seconds=0.01, cap_seconds=0.01))
    with pytest.raises(NetworkError):
        await client.comments("123456789", offset=0)


async def test_empty_twitch_chat_gives_empty_artifacts_and_a_warning(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    chat = FakeChat(comments=0, duration=600)
    async with serve(chat) as fake:
        ctx, sink = await run_twitch(fake, http, tmp_path)
    assert read_json(ctx)["comments"] == []
    assert list(iter_csv(ctx.outputs["chat_csv"])) == []
    assert ctx.outputs["chat_csv"].read_text() == "time,username,message\n"
    assert any("no chat messages" in w for w in sink.warnings)


async def test_cancel_stops_fetching_and_leaves_no_spools(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    chat = FakeChat(comments=5000, duration=7200, slow_seconds=0.2)
    async with serve(chat) as fake:
        ctx, _ = make_context(CHAT, tmp_path, http, url=VOD, twitch_gql_url=fake.url)
        task = asyncio.create_task(CHAT.run(ctx))
        for _ in range(200):  # bounded wait until every range has a request in flight
            if chat.comment_requests >= 4:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
    assert no_output(tmp_path)


async def test_non_twitch_url_without_chat_url_is_unavailable(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    ctx, _ = make_context(CHAT, tmp_path, http, url="https://example.com/video.mp4")
    with pytest.raises(StageUnavailable, match="pass chat_url"):
        await CHAT.run(ctx)


def test_split_ranges_cover_the_vod_disjointly() -> None:
    ranges = split_ranges(10_001.0, 4)
    assert [r.start for r in ranges] == [0, 2500, 5000, 7500]
    assert [r.end for r in ranges[:-1]] == [2500, 5000, 7500] and ranges[-1].end == math.inf
    assert len(split_ranges(90.0, 4)) == 1  # too short to be worth splitting
    assert split_ranges(None, 4)[0].end == math.inf


def test_spool_merge_keeps_awkward_text_exact_and_sorts_a_disordered_range(tmp_path: Path) -> None:
    bodies = ["a\rb", 'q"uo\r\nte', "c\u2028d\x85e", "x,\ny", "plain"]
    offsets = [0.0, 2.0, 1.0, 3.0, 4.0]  # range 0 arrives out of order; range 1 is in order
    spools = [ChatSpool(tmp_path, f"range{i}", "v") for i in range(2)]
    for i, (body, offset) in enumerate(zip(bodies, offsets, strict=True)):
        message = ChatMessage(offset, "login", body, display_name='D"n', id=str(i), fragments=(Fragment(body),))
        spools[0 if i < 3 else 1].add(message, None)
    assert [s.ordered for s in spools] == [False, True]
    write_artifacts(spools, tmp_path / "v_chat.json", tmp_path / "v_chat.csv", ChatVideo("v"), source="twitch")
    order = [0, 2, 1, 3, 4]
    expected = [(offsets[i], 'D"n', bodies[i]) for i in order]
    assert list(iter_csv(tmp_path / "v_chat.csv")) == expected
    doc = json.loads((tmp_path / "v_chat.json").read_text(encoding="utf-8"))
    assert [c["message"]["body"] for c in doc["comments"]] == [bodies[i] for i in order]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v_chat.csv", "v_chat.json"]


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: retry now
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- chat archives ----------------------------------------------------------------------------

TD_ARCHIVE: dict[str, Any] = {
    "FileInfo": {"Version": {"Major": 1, "Minor": 4, "Patch": 0}},
    "streamer": {"name": "SomeStreamer", "id": 555},
    "video": {"title": "Big stream", "id": "987654321", "created_at": "2024-01-01T00:00:00Z", "start": 0, "end": 90.0},
    "comments": [
        {
            "_id": "b",
            "created_at": "2024-01-01T00:00:12Z",
            "content_offset_seconds": 12.5,
            "commenter": {"display_name": "Alice ", "_id": "1", "name": "alice", "logo": "x"},
            "message": {
                "body": 'hi, "chat" Kappa',
                "bits_spent": 0,
                "fragments": [
                    {"text": 'hi, "chat" ', "emoticon": None},
                    {"text": "Kappa", "emoticon": {"emoticon_id": "25"}},
                ],
                "user_badges": [{"_id": "moderator", "version": "1"}],
                "user_color": "#FF0000",
                "emoticons": [{"_id": "25", "begin": 11, "end": 16}],
            },
        },
        {
            "_id": "a",
            "content_offset_seconds": 3,
            "commenter": {"display_name": "Bob", "_id": "2", "name": "bob"},
            "message": {"body": "first\nline two", "fragments": [{"text": "first\nline two", "emoticon": None}]},
        },
    ],
    "embeddedData": None,
}
CSV_ARCHIVE = 'time,username,message\n3,Bob,"first\nline two"\n12.5,Alice,"hi, ""chat"" Kappa"\n0:01:05,Carol,later\n'


@pytest.fixture
async def files() -> AsyncIterator[str]:
    """A loopback static server with good and bad chat archives."""
    bodies: dict[str, tuple[bytes, str]] = {
        "/chat.json": (json.dumps(TD_ARCHIVE).encode(), "application/json"),
        "/chat.json.gz": (gzip.compress(json.dumps(TD_ARCHIVE).encode()), "application/gzip"),
        "/chat.csv": (CSV_ARCHIVE.encode(), "text/csv"),
        "/empty.json": (b'{"comments": []}', "application/json"),
        "/wrong-shape.json": (b'{"data": {"messages": [1, 2, 3]}}', "application/json"),
        "/bad-offset.json": (
            b'{"comments": [{"content_offset_seconds": "soon", "message": {"body": "x"}}]}',
            "text/plain",
        ),
        "/garbage.bin": (bytes(range(256)) * 8, "application/octet-stream"),
        "/page.html": (b"<!doctype html><html><body>Not chat</body></html>", "text/html"),
        "/wrong-header.csv": (b"when,who,what\n1,a,b\n", "text/csv"),
        "/broken.json": (b'{"comments": [', "application/json"),
        "/big.json": (b'{"comments": [' + b" " * 5000 + b"]}", "application/json"),
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/redirect":
            raise web.HTTPFound("/chat.json")
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        if request.path == "/big-chunked":  # no Content-Length: the limit must hold while streaming
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(20):
                await response.write(b" " * 1000)
            await response.write_eof()
            return response
        if request.path not in bodies:
            raise web.HTTPNotFound()
        body, content_type = bodies[request.path]
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def run_archive(
    http: aiohttp.ClientSession, workdir: Path, chat_url: str, **settings: Any
) -> tuple[StageContext, RecordingSink]:
    ctx, sink = make_context(CHAT, workdir, http, chat_url=chat_url, **settings)
    await CHAT.run(ctx)
    return ctx, sink


@pytest.mark.parametrize("path", ["/chat.json", "/chat.json.gz", "/redirect"])
async def test_twitchdownloader_json_over_http(
    http: aiohttp.ClientSession, tmp_path: Path, files: str, path: str
) -> None:
    ctx, sink = await run_archive(http, tmp_path, files + path)
    doc = read_json(ctx)
    assert [c["_id"] for c in doc["comments"]] == ["a", "b"]  # ordered by offset
    alice = doc["comments"][1]
    assert alice["content_offset_seconds"] == 12.5
    assert alice["commenter"] == {"display_name": "Alice", "_id": "1", "name": "alice"}
    assert alice["message"]["fragments"][1]["emoticon"] == {"emoticon_id": "25"}
    assert alice["message"]["user_badges"] == [{"_id": "moderator", "version": "1"}]
    assert doc["video"]["title"] == "Big stream" and doc["video"]["length"] == 90.0
    assert doc["streamer"] == {"name": "SomeStreamer", "id": "555"}
    assert list(iter_csv(ctx.outputs["chat_csv"])) == [
        (3.0, "Bob", "first\nline two"),
        (12.5, "Alice", 'hi, "chat" Kappa'),
    ]
    assert sink.warnings == []


async def test_csv_archive_over_http(http: aiohttp.ClientSession, tmp_path: Path, files: str) -> None:
    ctx, _ = await run_archive(http, tmp_path, files + "/chat.csv")
    assert list(iter_csv(ctx.outputs["chat_csv"])) == [
        (3.0, "Bob", "first\nline two"),
        (12.5, "Alice", 'hi, "chat" Kappa'),
        (65.0, "Carol", "later"),
    ]
    assert [c["commenter"]["display_name"] for c in read_json(ctx)["comments"]] == ["Bob", "Alice", "Carol"]


async def test_local_archives_need_allow_local_files(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    archive = tmp_path / "in" / "chat.csv"
    archive.parent.mkdir()
    archive.write_text(CSV_ARCHIVE, encoding="utf-8")
    with pytest.raises(InvalidVideoUrl, match="KLIPSTREAM_ALLOW_LOCAL_FILES") as info:
        await run_archive(http, tmp_path / "job1", str(archive))
    assert info.value.code == "invalid_chat_url"
    ctx, _ = await run_archive(http, tmp_path / "job2", str(archive), allow_local_files=True)
    assert len(list(iter_csv(ctx.outputs["chat_csv"]))) == 3
    ctx, _ = await run_archive(http, tmp_path / "job3", archive.as_uri(), allow_local_files=True)
    assert len(read_json(ctx)["comments"]) == 3


@pytest.mark.parametrize(
    ("path", "code", "match"),
    [
        ("/wrong-shape.json", "invalid_chat_file", "no `comments` list"),
        ("/bad-offset.json", "invalid_chat_file", r"comments\[0\].content_offset_seconds"),
        ("/broken.json", "invalid_chat_file", "not valid JSON"),
        ("/garbage.bin", "invalid_chat_file", "binary"),
        ("/page.html", "invalid_chat_file", "HTML"),
        ("/wrong-header.csv", "invalid_chat_file", "time,username,message"),
        ("/big.json", "chat_file_too_large", "limit"),
        ("/big-chunked", "chat_file_too_large", "limit"),
        ("/missing.json", "chat_url_not_found", "404"),
        ("/loop", "invalid_chat_url", "redirected more than"),
    ],
)
async def test_bad_archives_are_classified(
    http: aiohttp.ClientSession, tmp_path: Path, files: str, path: str, code: str, match: str
) -> None:
    with pytest.raises(InvalidVideoUrl, match=match) as info:
        await run_archive(http, tmp_path, files + path, max_chat_bytes=4096)
    assert info.value.code == code
    assert no_output(tmp_path)


async def test_oversize_local_file_is_refused_before_reading(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b'{"comments": []}' + b" " * 10_000)
    with pytest.raises(InvalidVideoUrl) as info:
        await run_archive(http, tmp_path / "job", str(big), allow_local_files=True, max_chat_bytes=4096)
    assert info.value.code == "chat_file_too_large"


async def test_private_chat_url_is_refused(http: aiohttp.ClientSession, tmp_path: Path, files: str) -> None:
    with pytest.raises(InvalidVideoUrl) as info:
        await run_archive(http, tmp_path, files + "/chat.json", allow_private_urls=False)
    assert info.value.code == "private_address"


async def test_empty_archive_is_valid_with_a_warning(http: aiohttp.ClientSession, tmp_path: Path, files: str) -> None:
    ctx, sink = await run_archive(http, tmp_path, files + "/empty.json")
    assert read_json(ctx)["comments"] == []
    assert ctx.outputs["chat_csv"].read_text() == "time,username,message\n"
    assert any("no messages" in w for w in sink.warnings)
