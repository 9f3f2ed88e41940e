"""The one network policy for user-supplied URLs, and the video id a URL names.

Which addresses count as public is decided here only (`is_public_address`), for every fetch of a
URL a user supplied: media (yt-dlp's name resolution, in the metadata thread and the download
child), chat archives and webhook callbacks. The LLM base URL, Convex and Cloud Storage are
operator settings and are not subject to it.

Submission checks syntax and literal addresses (no DNS in the request path). At fetch time the
HTTP clients connect through `user_url_session`, whose resolver refuses an answer with any
non-public address: the address checked is the address connected to, on every redirect hop, so a
name that re-resolves to a private address between a check and the connection (DNS rebinding) is
refused too. `ensure_public_url` is the early check that gives the clear message first.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

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


_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: IPv4 in the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local-use NAT64, never global
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d (RFC 2765)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, which is where its packets really go: mapped,
    compatible and translated forms, NAT64 (64:ff9b::/96), 6to4 (2002::/16) and Teredo (the
    client address)."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.append(ip.teredo[1])
    if ip in _NAT64_WELL_KNOWN or ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public_address(address: str) -> bool:
    """True when `address` is a global unicast address (not private, loopback, link-local...),
    and, for IPv6 forms that carry an IPv4 address, when that one is too."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        inner = embedded_ipv4(ip)
        if inner:
            return all(_global(v4) for v4 in inner) and (ip.ipv4_mapped is not None or not ip.is_multicast)
    return _global(ip)


def _global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast and not ip.is_unspecified


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


class PrivateAddressRefused(OSError):
    """A host of a user-supplied URL resolved to a private, loopback, link-local or metadata
    address (or one that embeds such an IPv4 address): no connection was made."""


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's threaded resolver, then refuses the whole answer if any address is
    not public. The connector connects only to addresses this returned, so the address checked is
    the address connected to."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            if not is_public_address(answer["host"]):
                raise PrivateAddressRefused(f"{host} resolves to a non-public address")
        return answers

    async def close(self) -> None:
        await self._inner.close()


def user_url_session(*, allow_private: bool, **session_options: Any) -> aiohttp.ClientSession:
    """The HTTP client for every user-supplied URL (chat archives, webhook callbacks). With
    KLIPSTREAM_ALLOW_PRIVATE_URLS (tests, a private deployment) it resolves normally."""
    resolver: AbstractResolver = aiohttp.ThreadedResolver() if allow_private else PublicOnlyResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=100)
    return aiohttp.ClientSession(connector=connector, **session_options)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (current.__cause__, current.__context__, getattr(current, "os_error", None)):
            if isinstance(linked, BaseException):
                todo.append(linked)


def refused_private(exc: BaseException) -> bool:
    """Whether a client error was the public-only resolver refusing a private address."""
    return any(isinstance(item, PrivateAddressRefused) for item in _chain(exc))


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
