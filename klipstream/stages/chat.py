"""The chat stage: the VOD's chat as `{id}_chat.json` and `{id}_chat.csv`.

It needs nothing from the media download, so the runner starts it alongside the download. Where
the chat comes from, in order:

1. `chat_url`: an archive the user supplies (TwitchDownloader JSON, optionally gzipped, or a CSV
   `time,username,message`), fetched over http(s) with the private-address rules checked on every
   redirect, or read from disk when KLIPSTREAM_ALLOW_LOCAL_FILES=true. Anything that is not a chat
   archive fails as `invalid_video_url` with code `invalid_chat_file` (`chat_file_too_large` when
   over KLIPSTREAM_MAX_CHAT_BYTES); a chat URL that cannot be fetched is `invalid_chat_url`,
   `chat_url_not_found` or a retryable network / external-service error.
2. a Twitch VOD: Twitch's chat replay (klipstream/twitch_chat.py). The VOD length splits the work
   into KLIPSTREAM_CHAT_RANGES concurrent ranges; it comes from the job's video info when the
   download stage has already recorded it, else from one GraphQL `video { lengthSeconds }` query
   (what TwitchDownloader asks first); if Twitch will not say, one range walks the whole chat.
   Twitch refusing ends the stage `unavailable`, and the job goes on without chat.
3. anything else: no chat exists, the stage is `unavailable`.

An empty chat is not an error: both artifacts are written (no comments) and the job gets a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiofiles
import aiohttp
from yarl import URL

from klipstream.acquisition.chat_archive import (
    ChatVideo,
    invalid,
    too_large,
    write_artifacts,
)
from klipstream.acquisition.twitch_chat import (
    ChatFetch,
    GqlClient,
    GqlConfig,
    report_progress,
    split_ranges,
)
from klipstream.errors import ExternalServiceError, InvalidVideoUrl, KlipstreamError, NetworkError, StageUnavailable
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from klipstream.network import ensure_public_url, refused_private, twitch_video_id
from klipstream.proc import run_python
from klipstream.retry import parse_retry_after

MAX_REDIRECTS = 5
ARCHIVE_TIMEOUT_SECONDS = 1800.0  # a 200 MB archive converts in well under a minute
_DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=15, sock_read=60)
_REDIRECTS = (301, 302, 303, 307, 308)


async def run(ctx: StageContext) -> None:
    if ctx.chat_url:
        await _from_archive(ctx, ctx.chat_url.strip())
        return
    video_id = twitch_video_id(ctx.url)
    if video_id is None:
        raise StageUnavailable("No chat for non-Twitch sources; pass chat_url to supply a chat archive.")
    await _from_twitch(ctx, video_id)


# --- Twitch chat replay ---------------------------------------------------------------------


async def _from_twitch(ctx: StageContext, video_id: str) -> None:
    settings = ctx.settings
    client = GqlClient(
        ctx.http, GqlConfig(settings.twitch_gql_url, settings.twitch_client_id, settings.twitch_comments_hash)
    )
    known = ctx.video
    duration = known.duration_seconds if known and known.duration_seconds else None
    info = None
    if duration is None:
        ctx.progress(0.0, "asking Twitch for the VOD length")
        info = await client.video(video_id)
        duration = info.length_seconds if info else None
    fetch = ChatFetch(client, video_id, split_ranges(duration, settings.chat_ranges), ctx.workdir, duration)
    # The fetch is the first 97 % of the stage: the viewer-clips lookup reports 0.98 after it, and
    # a late tick of the fetch must not move the progress back.
    ticker = asyncio.create_task(report_progress(fetch, lambda f, detail: ctx.progress(0.97 * f, detail)))
    try:
        result = await fetch.run()
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    if result.count == 0:
        ctx.warn("Twitch returned no chat messages for this VOD; chat analysis will be empty.")
    video = ChatVideo(
        id=ctx.video_id,
        title=(info and info.title) or (known and known.title) or None,
        length_seconds=duration,
        channel=(info and info.channel) or (known and known.channel) or None,
        channel_id=(info and info.channel_id) or result.channel_id,
        created_at=(info and info.created_at) or (known and known.published_at) or None,
    )
    json_path, csv_path = ctx.output_path("chat_json"), ctx.output_path("chat_csv")
    await ctx.to_thread(
        write_artifacts, result.spools, json_path, csv_path, video, source="twitch", cancelled=ctx.cancelled.is_set
    )
    ctx.add_artifact("chat_json", json_path)
    ctx.add_artifact("chat_csv", csv_path)
    login = (info and info.channel_login) or (known and known.channel_login) or None
    await _viewer_clips(ctx, client, video_id, login)
    ctx.progress(1.0, f"{result.count:,} chat messages in {result.requests:,} requests")


async def _viewer_clips(ctx: StageContext, client: GqlClient, video_id: str, login: str | None) -> None:
    """The clips viewers made of this VOD, for the highlights. Best effort: without them the job
    loses one signal, so a refusal or an outage is a warning, not a failure."""
    ctx.progress(0.98, "looking for viewers' clips of this VOD")
    try:
        if login is None:
            info = await client.video(video_id)
            login = info.channel_login if info else None
        clips = await client.clips(login, video_id) if login else []
    except (KlipstreamError, StageUnavailable) as exc:
        ctx.warn(f"Twitch did not list the viewer clips of this VOD ({exc}); highlights use chat alone.")
        return
    path = ctx.output_path("viewer_clips")
    payload = json.dumps({"video_id": ctx.video_id, "clips": clips}, ensure_ascii=False)
    await ctx.to_thread(path.write_text, payload, "utf-8")
    ctx.add_artifact("viewer_clips", path)


# --- user-supplied archives -------------------------------------------------------------------


async def _from_archive(ctx: StageContext, source: str) -> None:
    """Fetch (or find) the archive as a file, then parse, validate and write the artifacts in a child
    process: the parse of a 200 MB document never holds this process's GIL."""
    limit = ctx.settings.max_chat_bytes
    local = _local_path(source)
    ctx.progress(0.0, "fetching chat archive")
    if local is not None:
        if not ctx.settings.allow_local_files:
            raise InvalidVideoUrl(
                "chat_url must be an http(s) URL; local chat files are accepted only when "
                "KLIPSTREAM_ALLOW_LOCAL_FILES=true.",
                code="invalid_chat_url",
            )
        path = await ctx.to_thread(_check_local, local, limit)
    else:
        path = ctx.workdir / "chat_archive.download"
        await _download(ctx, source, limit, path)
    known = ctx.video
    video = ChatVideo(
        id=ctx.video_id,
        title=known.title if known else None,
        length_seconds=known.duration_seconds if known else None,
        channel=known.channel if known else None,
        created_at=known.published_at if known else None,
    )
    json_path, csv_path = ctx.output_path("chat_json"), ctx.output_path("chat_csv")

    def progress(fraction: float, detail: str) -> None:
        ctx.progress(0.1 + 0.9 * fraction, detail)

    result = await run_python(
        "klipstream.acquisition.chat_archive",
        [str(path), str(json_path), str(csv_path), "--known", json.dumps(asdict(video)), "--max-bytes", str(limit)],
        timeout=ARCHIVE_TIMEOUT_SECONDS,
        on_progress=progress,
    )
    if local is None:
        path.unlink(missing_ok=True)
    count = int(result["count"])
    if count == 0:
        ctx.warn("The chat archive has no messages; chat analysis will be empty.")
    ctx.add_artifact("chat_json", json_path)
    ctx.add_artifact("chat_csv", csv_path)
    ctx.progress(1.0, f"{count:,} chat messages from the archive")


def _local_path(source: str) -> Path | None:
    """A filesystem path when `source` is not an http(s) URL (a bare path or file://)."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme == "":
        return Path(source).expanduser()
    raise InvalidVideoUrl(f"chat_url must use http or https, not {parts.scheme!r}.", code="invalid_chat_url")


def _check_local(path: Path, limit: int) -> Path:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise InvalidVideoUrl(f"chat file {path} does not exist.", code="chat_url_not_found") from None
    except PermissionError:
        raise InvalidVideoUrl(f"chat file {path} is not readable.", code="invalid_chat_url") from None
    if not path.is_file():
        raise invalid(f"chat file {path} is not a regular file.")
    if size > limit:
        raise too_large(limit)
    if not os.access(path, os.R_OK):
        raise InvalidVideoUrl(f"chat file {path} is not readable.", code="invalid_chat_url")
    return path


async def _download(ctx: StageContext, url: str, limit: int, path: Path) -> None:
    """GET the archive into `path` (never more than `limit` bytes) through the public-only client
    (klipstream.network), following redirects by hand: every hop is checked first, and each
    connection goes only to an address the client's resolver checked, so a name re-resolving to a
    private address (DNS rebinding) is refused."""
    allow_private = ctx.settings.allow_private_urls
    for _ in range(MAX_REDIRECTS + 1):
        await ensure_public_url(url, allow_private=allow_private)
        try:
            async with ctx.user_http.get(
                url,
                allow_redirects=False,
                timeout=_DOWNLOAD_TIMEOUT,
                headers={"Accept": "application/json, text/csv;q=0.9, */*;q=0.5"},
            ) as response:
                status = response.status
                if status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise InvalidVideoUrl(f"chat_url redirected (HTTP {status}) without a Location.")
                    url = str(response.url.join(URL(location)))
                    continue
                _check_status(status, response.headers.get("Retry-After"))
                if response.content_length is not None and response.content_length > limit:
                    raise too_large(limit)
                size = 0
                async with aiofiles.open(path, "wb") as out:
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        size += len(chunk)
                        if size > limit:
                            raise too_large(limit)
                        await out.write(chunk)
                return
        except (aiohttp.ClientError, TimeoutError) as exc:
            if refused_private(exc):
                raise InvalidVideoUrl(
                    f"chat_url's host {urlsplit(url).hostname} resolves to a private or local address.",
                    code="private_address",
                ) from None
            raise NetworkError(
                f"Could not download chat_url ({type(exc).__name__}).", code="chat_url_unreachable"
            ) from None
    raise InvalidVideoUrl(f"chat_url redirected more than {MAX_REDIRECTS} times.", code="invalid_chat_url")


def _check_status(status: int, retry_after: str | None) -> None:
    if status == 200:
        return
    if status in (404, 410):
        raise InvalidVideoUrl(f"chat_url answered HTTP {status}: the file is not there.", code="chat_url_not_found")
    if status in (408, 429) or status >= 500:
        raise ExternalServiceError(
            f"The chat_url host answered HTTP {status}.",
            code=f"http_{status}",
            retry_after=parse_retry_after(retry_after),
        )
    raise InvalidVideoUrl(f"chat_url answered HTTP {status} instead of a chat archive.", code="invalid_chat_url")


CHAT = Stage(
    name="chat",
    display=DisplayStage.FETCHING_CHAT,
    run=run,
    needs=(),
    provides=("chat_json", "chat_csv", "viewer_clips"),
    weight=1.0,
    resource=Resource.NETWORK,
)
