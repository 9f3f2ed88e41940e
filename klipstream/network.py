"""URL rules: which URLs a job may fetch, and the video id a URL names.

Submission only checks syntax and literal addresses (no DNS in the request path); fetchers call
`ensure_public_url` at fetch time, which resolves the host and checks every address, so a name
that resolves (or re-resolves) to a private address is still refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from klipstream.errors import InvalidVideoUrl

if TYPE_CHECKING:
    from klipstream.config import Settings
    from klipstream.models import SubmitRequest

MAX_URL_LENGTH = 2048
_TWITCH_HOSTS = {"twitch.tv", "www.twitch.tv", "m.twitch.tv", "player.twitch.tv", "clips.twitch.tv"}
_TWITCH_VIDEO = re.compile(r"^/(?:[^/]+/)?(?:videos?|v)/(\d{5,15})/?$")
# twitch.tv/<channel> (and /<channel>/live): the live broadcast, never a finished VOD.
_TWITCH_CHANNEL = re.compile(r"^/(?!videos?/?$)[A-Za-z0-9_]{2,25}(?:/live)?/?$")
# Metadata services that clouds expose at non-private-looking addresses.
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


def is_public_address(address: str) -> bool:
    """True when `address` is a global unicast address (not private, loopback, link-local...)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url_syntax(url: str, *, allow_private: bool, what: str = "url") -> str:
    """Validate an http(s) URL without any network I/O; return it stripped."""
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidVideoUrl(f"{what} is longer than {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidVideoUrl(f"{what} is not a valid URL: {exc}.") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidVideoUrl(f"{what} must use http or https, not {parts.scheme or 'no scheme'!r}.")
    hostname = parts.hostname  # each of these properties parses the netloc again
    if not hostname:
        raise InvalidVideoUrl(f"{what} has no host.")
    if "@" in parts.netloc:
        raise InvalidVideoUrl(f"{what} must not carry credentials.")
    if port == 0:
        raise InvalidVideoUrl(f"{what} has an invalid port.")
    if not allow_private:
        host = hostname.rstrip(".").lower()
        if host in _METADATA_HOSTS or host == "localhost" or host.endswith(".localhost"):
            raise InvalidVideoUrl(f"{what} points at a private or local address.", code="private_address")
        if _is_ip_literal(host) and not is_public_address(host):
            raise InvalidVideoUrl(f"{what} points at a private or local address.", code="private_address")
    return url


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def ensure_public_url(url: str, *, allow_private: bool) -> None:
    """At fetch time: resolve the host and refuse if any address is not public."""
    check_url_syntax(url, allow_private=allow_private)
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 10)
    except (OSError, TimeoutError):
        from klipstream.errors import NetworkError

        raise NetworkError(f"Could not resolve host {host!r}.", code="dns_failure") from None
    for info in infos:
        if not is_public_address(str(info[4][0])):
            raise InvalidVideoUrl(f"{host} resolves to a private or local address.", code="private_address")


def twitch_video_id(url: str) -> str | None:
    """The numeric VOD id of a twitch.tv/videos/<id> URL (any of its host and query forms)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if host not in _TWITCH_HOSTS:
        return None
    match = _TWITCH_VIDEO.match(parts.path)
    if match:
        return match.group(1)
    if host == "player.twitch.tv":
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        video = query.get("video", "").lstrip("v")
        if video.isdigit():
            return video
    return None


def is_twitch_live_url(url: str) -> bool:
    """A Twitch channel or player-channel URL: what it plays is the live broadcast."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if host == "player.twitch.tv":
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        return "channel" in query and not query.get("video")
    return host in _TWITCH_HOSTS and host != "clips.twitch.tv" and bool(_TWITCH_CHANNEL.match(parts.path))


def video_id_for(url: str) -> str:
    """Twitch id for Twitch VODs; otherwise a stable id derived from the normalised URL."""
    twitch = twitch_video_id(url)
    if twitch:
        return twitch
    parts = urlsplit(url.strip())
    normalised = f"{parts.scheme.lower()}://{(parts.netloc or '').lower()}{parts.path}?{parts.query}"
    if not parts.scheme:  # a local file path
        normalised = url.strip()
    return "u" + hashlib.sha256(normalised.encode()).hexdigest()[:15]


def validate_urls(body: SubmitRequest, settings: Settings) -> None:
    """Syntax and literal addresses only: no DNS in the request path (fetchers check again)."""
    allow_private = settings.allow_private_urls
    url = body.url.strip()
    is_local = settings.allow_local_files and (url.startswith("/") or url.startswith("file://"))
    if not is_local:
        check_url_syntax(url, allow_private=allow_private, what="url")
        if is_twitch_live_url(url):
            raise InvalidVideoUrl(
                "url is a Twitch channel: it plays the live broadcast. Only finished VODs are analysed; "
                "submit a VOD link (https://www.twitch.tv/videos/<id>).",
                code="live_stream",
            )
    if body.chat_url:
        chat_local = settings.allow_local_files and body.chat_url.startswith("/")
        if not chat_local:
            check_url_syntax(body.chat_url, allow_private=allow_private, what="chat_url")
    if body.callback_url:
        check_url_syntax(body.callback_url, allow_private=allow_private, what="callback_url")
