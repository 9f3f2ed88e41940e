"""yt-dlp behind a few small functions: metadata, address checks, the download child and its errors.

Metadata comes from yt-dlp's Python API in a worker thread (cheap, and the job shows the title at
once). The download runs in a child process (`python -m klipstream.acquisition.media ...` with yt-dlp's
own command-line options) because a Python thread cannot be killed: cancelling a job must stop a
multi-gigabyte transfer within two seconds. The child downloads from the info JSON the metadata
step produced, so the URLs that were checked are the URLs that are fetched.

Private-address protection has two layers: every URL yt-dlp resolved is checked before the
download, and while yt-dlp runs (in the metadata thread and in the child) name resolution itself
refuses private, loopback and link-local answers, which also covers redirects and DNS rebinding.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from klipstream.errors import (
    InternalError,
    InvalidVideoUrl,
    KlipstreamError,
    NetworkError,
    ProcessingTimeout,
    TimeLimitExceeded,
    VideoNotFound,
    VideoUnavailable,
)
from klipstream.models import VideoInfo
from klipstream.network import ensure_public_url, is_public_address
from klipstream.proc import ProcessFailed, child_env, error_line, parse_error_line, run_process

PROGRESS_PREFIX = "KSPROGRESS"
FILE_PREFIX = "KSFILE"
SOCKET_TIMEOUT = 20.0

# Twitch serves an audio-only HLS rendition named Audio_Only; other sites usually have bestaudio.
AUDIO_FORMAT = "Audio_Only/bestaudio/best"


def video_format(height: int) -> str:
    """A single file with video at most `height` pixels high (merging would need ffmpeg)."""
    return f"b[height<={height}]/bv*[height<={height}]/wv*/b"


# --------------------------------------------------------------------------------------------------
# Name resolution that refuses private addresses while yt-dlp runs.
# --------------------------------------------------------------------------------------------------

_original_getaddrinfo = socket.getaddrinfo
_guard = threading.local()
_guard_lock = threading.Lock()
_process_wide = False  # set in the download child, where yt-dlp fetches fragments from its own threads
_process_refused: str | None = None


class _PrivateAddressRefused(socket.gaierror):
    pass


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    results = _original_getaddrinfo(host, *args, **kwargs)
    if _process_wide or getattr(_guard, "active", False):
        for result in results:
            if not is_public_address(str(result[4][0])):
                global _process_refused
                _guard.refused = str(host)
                if _process_wide:
                    _process_refused = str(host)
                raise _PrivateAddressRefused(socket.EAI_NONAME, f"{host} resolves to a private address (refused)")
    return results


def _install_guard() -> None:
    with _guard_lock:
        if socket.getaddrinfo is not _guarded_getaddrinfo:
            socket.getaddrinfo = _guarded_getaddrinfo


@contextlib.contextmanager
def public_addresses_only(enabled: bool = True) -> Iterator[None]:
    """While active in this thread, resolving a name to a non-public address fails."""
    if not enabled:
        yield
        return
    _install_guard()
    _guard.active, _guard.refused = True, None
    try:
        yield
    finally:
        _guard.active = False


def _refused_host() -> str | None:
    return getattr(_guard, "refused", None) or _process_refused


def _private_refusal(host: str) -> InvalidVideoUrl:
    return InvalidVideoUrl(
        f"The media is served from {host}, which resolves to a private or local address; refused.",
        code="private_address",
        suggested_action="Submit a public URL (private addresses are allowed only with KLIPSTREAM_ALLOW_PRIVATE_URLS).",
    )


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaMetadata:
    video: VideoInfo
    info: dict[str, Any]  # yt-dlp's sanitised info dict, handed to the download child
    urls: tuple[str, ...]  # every format, manifest and fragment URL yt-dlp resolved
    has_video: bool  # some format may carry a picture


class _Quiet:
    """yt-dlp logger that keeps warnings for the job instead of printing them."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)

    def error(self, msg: str) -> None:
        pass


def extract_metadata(url: str, *, allow_private: bool) -> MediaMetadata:
    """yt-dlp's extract_info without downloading; blocking, for a worker thread."""
    import yt_dlp

    params = {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "noplaylist": True,
        "skip_download": True,
        "cachedir": False,
        "socket_timeout": SOCKET_TIMEOUT,
        "extractor_retries": 2,
        "logger": _Quiet(),
    }
    with public_addresses_only(not allow_private):
        try:
            with yt_dlp.YoutubeDL(params) as ydl:  # type: ignore[arg-type]
                info = ydl.extract_info(url, download=False)
                info = ydl.sanitize_info(info)
        except Exception as exc:
            refused = _refused_host()
            if refused is not None:
                raise _private_refusal(refused) from None
            raise classify_ytdlp_error(exc) from None
    if not isinstance(info, dict):
        raise InvalidVideoUrl("yt-dlp returned nothing for this URL.", code="not_media")
    if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming", "post_live"):
        raise live_refusal()
    if info.get("_type") in ("playlist", "multi_video"):
        raise InvalidVideoUrl(
            "The URL is a playlist or channel, not a single video.",
            code="playlist_url",
            suggested_action="Submit the link of one VOD.",
        )
    formats = info.get("formats") or [info]
    return MediaMetadata(
        video=video_info(info),
        info=info,
        urls=tuple(resolved_urls(info)),
        has_video=any(f.get("vcodec") != "none" for f in formats),
    )


def live_refusal() -> InvalidVideoUrl:
    return InvalidVideoUrl(
        "This URL is a live stream (or a channel that is live). Only finished VODs are analysed.",
        code="live_stream",
        suggested_action="Wait until the broadcast ends, then submit its VOD (https://www.twitch.tv/videos/<id>).",
    )


def video_info(info: dict[str, Any]) -> VideoInfo:
    duration = info.get("duration")
    published = None
    if isinstance(info.get("timestamp"), int | float):
        published = datetime.fromtimestamp(info["timestamp"], UTC).isoformat()
    elif isinstance(info.get("upload_date"), str) and len(info["upload_date"]) == 8:
        d = info["upload_date"]
        published = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return VideoInfo(
        id=str(info["id"]) if info.get("id") is not None else None,
        title=info.get("title") or None,
        channel=info.get("uploader") or info.get("channel") or info.get("uploader_id") or None,
        channel_login=(info.get("uploader_id") or None)
        if "twitch" in str(info.get("extractor") or "").lower()
        else None,
        duration_seconds=float(duration) if isinstance(duration, int | float) and math.isfinite(duration) else None,
        published_at=published,
        thumbnail_url=info.get("thumbnail") or None,
        extractor=info.get("extractor_key") or info.get("extractor") or None,
    )


def resolved_urls(info: dict[str, Any]) -> Iterator[str]:
    """Every http(s) URL the info dict will make the downloader fetch."""
    seen: set[str] = set()
    for fmt in info.get("formats") or [info]:
        candidates = [fmt.get("url"), fmt.get("manifest_url"), fmt.get("fragment_base_url")]
        base = fmt.get("fragment_base_url")
        for fragment in fmt.get("fragments") or ():
            candidates.append(
                fragment.get("url") or (base + fragment["path"] if base and fragment.get("path") else None)
            )
        for candidate in candidates:
            if isinstance(candidate, str) and candidate.startswith(("http://", "https://")) and candidate not in seen:
                seen.add(candidate)
                yield candidate


async def ensure_public_urls(urls: tuple[str, ...], *, allow_private: bool) -> None:
    """Resolve each distinct host once and refuse the lot if any is private."""
    if allow_private:
        return
    hosts: dict[tuple[str, str, int | None], str] = {}
    for url in urls:
        parts = urlsplit(url)
        hosts.setdefault((parts.scheme, parts.hostname or "", parts.port), url)
    for url in hosts.values():
        try:
            await ensure_public_url(url, allow_private=False)
        except InvalidVideoUrl as exc:
            raise _private_refusal(urlsplit(url).hostname or url) if exc.code == "private_address" else exc from None


# --------------------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------------------

# yt-dlp reports some refusals only as text (ExtractorError(expected=True) without an HTTP cause,
# e.g. Twitch's "Video 123 does not exist"); these phrases sort those few.
_NOT_FOUND_PHRASES = ("does not exist", "not found", "has been removed", "was deleted", "no longer available")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps: yt-dlp nests causes in .exc_info and .cause."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        exc_info = getattr(current, "exc_info", None)
        wrapped = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None
        cause = getattr(current, "cause", None)
        todo.extend(
            [
                wrapped if isinstance(wrapped, BaseException) else None,
                cause if isinstance(cause, BaseException) else None,
                current.__cause__,
                current.__context__,
            ]
        )


def classify_ytdlp_error(exc: BaseException) -> KlipstreamError:
    """Map a yt-dlp failure to a classified error, by exception type first."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError
    from yt_dlp.utils import ExtractorError, GeoRestrictedError, UnsupportedError

    chain = list(_chain(exc))
    for item in chain:
        if isinstance(item, KlipstreamError):
            return item
        if isinstance(item, _PrivateAddressRefused):
            return _private_refusal(_refused_host() or "the media host")
    for item in chain:
        if isinstance(item, GeoRestrictedError):
            return VideoUnavailable(
                "The video is not available from this server's location (geo-restricted).",
                code="geo_restricted",
                suggested_action="Use a VOD that is available worldwide.",
            )
        if isinstance(item, UnsupportedError):
            return InvalidVideoUrl(
                "The URL is a web page without any video KlipStream can download.",
                code="unsupported_url",
            )
    for item in chain:
        if isinstance(item, HTTPError):
            status = item.status
            if status in (404, 410):
                return VideoNotFound(f"The media URL answered HTTP {status}: it does not exist.", code=f"http_{status}")
            if status in (401, 403, 451):
                return VideoUnavailable(
                    f"The site refused access to the video (HTTP {status}); it may be subscriber-only or private.",
                    code=f"http_{status}",
                )
            if status == 429 or status >= 500:
                return NetworkError(f"The video site answered HTTP {status}; try again later.", code=f"http_{status}")
            return InvalidVideoUrl(f"The video site refused the request (HTTP {status}).", code=f"http_{status}")
    for item in chain:
        if isinstance(item, TransportError | ConnectionError | TimeoutError | socket.gaierror):
            return NetworkError(f"Could not reach the video site: {_short(item)}.", code="transport_error")
    for item in chain:
        if isinstance(item, ExtractorError) and item.expected:
            text = _short(item)
            if any(phrase in text.lower() for phrase in _NOT_FOUND_PHRASES):
                return VideoNotFound(f"The site says: {text}.", code="not_found")
            return VideoUnavailable(f"The site refused the video: {text}.", code="extractor_refused")
    return NetworkError(f"Downloading the video failed: {_short(exc)}.", code="download_failed")


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig_msg", None) or exc).strip()
    text = text.removeprefix("ERROR: ").splitlines()[0] if text else type(exc).__name__
    return text[:300].rstrip(".")


# --------------------------------------------------------------------------------------------------
# Download child
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadProgress:
    downloaded_bytes: int
    total_bytes: int | None  # exact or estimated
    speed: float | None  # bytes per second
    fragment_index: int | None
    fragment_count: int | None
    finished: bool

    @property
    def fraction(self) -> float | None:
        if self.finished:
            return 1.0
        if self.total_bytes:
            return min(1.0, self.downloaded_bytes / self.total_bytes)
        if self.fragment_count and self.fragment_index is not None:
            return min(1.0, self.fragment_index / self.fragment_count)
        return None


_PROGRESS_TEMPLATE = PROGRESS_PREFIX + (
    " %(progress.status)s %(progress.downloaded_bytes)s %(progress.total_bytes)s"
    " %(progress.total_bytes_estimate)s %(progress.speed)s %(progress.fragment_index)s %(progress.fragment_count)s"
)


def parse_progress(line: str) -> DownloadProgress | None:
    """One --progress-template line; fields yt-dlp does not know print as NA."""
    parts = line.split()
    if len(parts) != 8 or parts[0] != PROGRESS_PREFIX:
        return None

    def number(text: str) -> float | None:
        try:
            value = float(text)
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    downloaded = number(parts[2])
    total = number(parts[3]) or number(parts[4])
    index, count = number(parts[6]), number(parts[7])
    return DownloadProgress(
        downloaded_bytes=int(downloaded or 0),
        total_bytes=int(total) if total else None,
        speed=number(parts[5]),
        fragment_index=int(index) if index is not None else None,
        fragment_count=int(count) if count else None,
        finished=parts[1] == "finished",
    )


def download_args(
    info_json: Path, output_stem: Path, format_spec: str, *, fragments: int, public_only: bool
) -> list[str]:
    """The child's command line: our wrapper, then plain yt-dlp options."""
    args = [sys.executable, "-m", "klipstream.acquisition.media"]
    if public_only:
        args.append("--public-only")
    return [
        *args,
        "--load-info-json",
        str(info_json),
        "--format",
        format_spec,
        "--output",
        f"{output_stem}.%(ext)s",
        "--concurrent-fragments",
        str(fragments),
        "--retries",
        "10",
        "--fragment-retries",
        "10",
        "--retry-sleep",
        "http,fragment:exp=1:8",
        "--abort-on-error",  # the CLI default only reports download errors; the child must fail
        "--abort-on-unavailable-fragments",  # a skipped fragment would silently shift every timestamp
        "--socket-timeout",
        str(int(SOCKET_TIMEOUT)),
        "--continue",
        "--no-playlist",
        "--no-cache-dir",
        "--no-mtime",
        "--fixup",
        "never",  # fixups need ffmpeg; PyAV reads the raw MPEG-TS just as well
        "--no-warnings",
        "--newline",
        "--progress",
        "--progress-template",
        f"download:{_PROGRESS_TEMPLATE}",
    ]


async def run_download(
    args: list[str],
    *,
    on_progress: Callable[[DownloadProgress], None],
    time_limit: float,
) -> Path:
    """Run the download child; return the file it wrote. Raises classified errors."""
    written: list[str] = []
    error: list[KlipstreamError] = []

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):
            progress = parse_progress(line)
            if progress is not None:
                on_progress(progress)
        elif line.startswith(FILE_PREFIX + " "):
            written.append(line[len(FILE_PREFIX) + 1 :])
        elif (parsed := parse_error_line(line, NetworkError)) is not None:
            error.append(parsed)

    env = child_env(PYTHONUNBUFFERED="1")
    try:
        await run_process(args, on_line=on_line, timeout=time_limit, env=env)
    except ProcessingTimeout:
        # The whole budget is gone; yt-dlp already retried stalled fragments inside it.
        raise TimeLimitExceeded(
            f"The download did not finish within {time_limit:.0f} s.", code="download_timeout"
        ) from None
    except ProcessFailed as exc:
        if error:
            raise error[-1] from None
        tail = " | ".join(line for line in exc.tail[-3:] if line.strip())
        raise NetworkError(f"The download stopped (exit code {exc.returncode}): {tail[:400]}") from None
    if not written:
        raise InternalError("yt-dlp finished without reporting the file it wrote.")
    return Path(written[-1])


def _child_main(argv: list[str]) -> int:
    """Entry of the download child: yt-dlp's options, typed errors out as one JSON line."""
    global _process_wide
    import yt_dlp

    if argv and argv[0] == "--public-only":
        argv = argv[1:]
        _install_guard()
        _process_wide = True
    try:
        parsed = yt_dlp.parse_options(argv)
        info_path = parsed.options.load_info_filename
        with open(info_path, encoding="utf-8") as fh:
            loaded = json.load(fh)
        with yt_dlp.YoutubeDL(parsed.ydl_opts) as ydl:
            ydl.add_post_hook(lambda path: print(f"{FILE_PREFIX} {path}", flush=True))
            info = ydl.sanitize_info(loaded)
            ydl.process_ie_result(info, download=True)
    except Exception as exc:
        refused = _refused_host()
        classified = _private_refusal(refused) if refused else classify_ytdlp_error(exc)
        print(error_line(classified), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
