"""API keys, the admin token, and short-lived signed stream tokens.

Browsers' EventSource cannot send an Authorization header, so when API keys are on, `stream_url`
carries a token that names one job and expires; the stream route accepts it instead of a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time

from aiohttp import web

from klipstream.config import Settings


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches_any(token: str | None, allowed: tuple[str, ...]) -> bool:
    if token is None:
        return False
    # Compare against every key so timing does not tell which key was close.
    return any([hmac.compare_digest(token.encode(), key.encode()) for key in allowed])


def key_owner(request: web.Request, settings: Settings) -> str:
    """Who made the request, for scoping Idempotency-Keys: a hash of its API key ("" without keys).
    Only the hash is stored, never the key."""
    if not settings.api_keys:
        return ""
    token = bearer(request) or ""
    return hashlib.sha256(b"klipstream-key-owner\n" + token.encode()).hexdigest()[:32]


def api_key_ok(request: web.Request, settings: Settings) -> bool:
    return not settings.api_keys or _matches_any(bearer(request), settings.api_keys)


def is_loopback(request: web.Request) -> bool:
    peer = request.remote or ""
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def admin_ok(request: web.Request, settings: Settings) -> bool:
    """Admin routes need the admin token. Without one they are off, unless
    KLIPSTREAM_ADMIN_LOOPBACK turns them on for loopback clients: behind a proxy on the same host
    every client is a loopback client, so that must be an explicit choice."""
    if settings.admin_token:
        return _matches_any(bearer(request), (settings.admin_token,))
    return settings.admin_loopback and is_loopback(request)


class StreamTokens:
    """HMAC-signed `job_id.expiry` tokens; the key lives only in this process (and its replicas'
    API-key set), so tokens are derived from the configured API keys to stay valid across instances.

    The same key signs artifact links (`/files/...?expires=...&signature=...`): with API keys on,
    a result URL works without the key until it expires, like a Cloud Storage signed URL.
    """

    def __init__(self, settings: Settings) -> None:
        seed = "\n".join(settings.api_keys) or secrets.token_hex(32)
        self._key = hashlib.sha256(b"klipstream-stream-token\n" + seed.encode()).digest()
        self._lifetime = settings.stream_token_seconds
        self._file_lifetime = settings.signed_url_seconds

    def sign_path(self, path: str, now: float | None = None) -> str:
        """`path` (an artifact route, percent-encoded as served) with an expiry and a signature."""
        expires = int((now or time.time()) + self._file_lifetime)
        return f"{path}?expires={expires}&signature={self._sign(f'file:{path}.{expires}')}"

    def verify_path(self, path: str, expires: str, signature: str, now: float | None = None) -> bool:
        if not expires.isdigit() or not signature or int(expires) < (now or time.time()):
            return False
        return hmac.compare_digest(signature, self._sign(f"file:{path}.{expires}"))

    def issue(self, job_id: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self._lifetime)
        payload = f"{job_id}.{expires}"
        return f"{expires}.{self._sign(payload)}"

    def verify(self, job_id: str, token: str, now: float | None = None) -> bool:
        expires_text, _, signature = token.partition(".")
        if not expires_text.isdigit() or not signature:
            return False
        if int(expires_text) < (now or time.time()):
            return False
        return hmac.compare_digest(signature, self._sign(f"{job_id}.{expires_text}"))

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode().rstrip("=")


def require_api_key(request: web.Request, settings: Settings) -> None:
    if not api_key_ok(request, settings):
        raise web.HTTPUnauthorized(
            reason="Unauthorized", text="Send Authorization: Bearer <api key>.", headers={"WWW-Authenticate": "Bearer"}
        )


def require_admin(request: web.Request, settings: Settings) -> None:
    if not settings.admin_token and not settings.admin_loopback:
        raise web.HTTPForbidden(
            reason="Forbidden",
            text="Admin routes are off: set KLIPSTREAM_ADMIN_TOKEN, or KLIPSTREAM_ADMIN_LOOPBACK=true to allow "
            "loopback clients without a token.",
        )
    if not admin_ok(request, settings):
        raise web.HTTPUnauthorized(
            reason="Unauthorized",
            text="Admin routes need Authorization: Bearer <admin token>.",
            headers={"WWW-Authenticate": "Bearer"},
        )
