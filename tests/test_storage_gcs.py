"""GcsStorage against a real GCS emulator (gcp-storage-emulator) on loopback, with the real client.

A small aiohttp proxy sits in front of the emulator when a test needs the network to misbehave:
it answers 503, drops connections after the emulator has persisted a chunk, or corrupts the
checksum in a response.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import pytest
from aiohttp import web

from klipstream.artifacts import spec
from klipstream.config import Settings
from klipstream.errors import StorageError
from klipstream.integrations.storage import GcsStorage, StoredObject, create_storage
from klipstream.retry import RetryPolicy
from tests.gcs_emulator import start_emulator

VIDEO = "2400000001"
BUCKETS = ("klipstream-vods-raw", "klipstream-transcripts", "klipstream-chatlogs", "klipstream-analysis", "one")
FAST = RetryPolicy(attempts=5, base_seconds=0.01, cap_seconds=0.05)


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    proc, base = start_emulator(BUCKETS)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    session = aiohttp.ClientSession()
    yield session
    await session.close()


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings.from_env({}, data_dir=tmp_path, storage="gcs", **kw)


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    # Distinct content per position so a chunk written at the wrong offset changes the MD5.
    block = hashlib.sha256(name.encode()).digest() * 32768  # 1 MiB
    with path.open("wb") as f:
        left = size
        i = 0
        while left:
            piece = (i.to_bytes(8, "big") + block)[: min(left, len(block))]
            f.write(piece)
            left -= len(piece)
            i += 1
    return path


def _md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


async def _download(base: str, bucket: str, name: str) -> bytes:
    async with aiohttp.ClientSession() as s:
        url = f"{base}/download/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media"
        async with s.get(url) as resp:
            assert resp.status == 200
            return await resp.read()


class FaultyProxy:
    """Forwards to the emulator, misbehaving for requests a rule picks (each rule fires its count)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[tuple[Callable[[web.Request], bool], str, int]] = []
        self.seen: list[str] = []
        self.fired: collections.Counter[str] = collections.Counter()

    def add(self, match: Callable[[web.Request], bool], action: str, times: int) -> None:
        self.rules.append((match, action, times))

    def _action(self, request: web.Request) -> str | None:
        for i, (match, action, times) in enumerate(self.rules):
            if times and match(request):
                self.rules[i] = (match, action, times - 1)
                self.fired[action] += 1
                return action
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(f"{request.method} {request.headers.get('Content-Range', '')}")
        action = self._action(request)
        if action == "503":
            return web.Response(status=503, text="backend unavailable", headers={"Retry-After": "0"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers, allow_redirects=False
            ) as up:
                payload = await up.read()
                status = up.status
                out_headers = {
                    k: v
                    for k, v in up.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date")
                }
        if action == "drop":  # the emulator has the bytes; the client never hears back
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("dropped by test proxy")
        if action == "corrupt_md5" and status == 200:
            doc = json.loads(payload)
            doc["md5Hash"] = base64.b64encode(b"\0" * 16).decode()
            payload = json.dumps(doc).encode()
        return web.Response(status=status, body=payload, headers=out_headers)


@pytest.fixture
async def proxy(emulator: str, monkeypatch: pytest.MonkeyPatch) -> FaultyProxy:
    faulty = FaultyProxy(emulator)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", faulty.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield faulty
    await runner.cleanup()


def _is_chunk(request: web.Request) -> bool:
    return request.method == "PUT" and not request.headers.get("Content-Range", "").startswith("bytes */")


async def test_small_json_artifact_is_uploaded_with_checksum(proxy: FaultyProxy, http, tmp_path: Path, emulator: str):
    settings = _settings(tmp_path)
    path = tmp_path / "audio_x_waveform.json"
    path.write_text(json.dumps([round(i / 1000, 3) for i in range(1000)]))
    storage = create_storage(settings, http)
    assert isinstance(storage, GcsStorage)
    stored = await storage.put(VIDEO, spec("waveform"), path)
    name = f"{VIDEO}/audio_{VIDEO}_waveform.json"
    assert stored == StoredObject(
        uri=f"gs://klipstream-vods-raw/{name}",
        url=f"gs://klipstream-vods-raw/{name}",
        size=path.stat().st_size,
        md5_base64=_md5(path),
    )
    assert await _download(emulator, "klipstream-vods-raw", name) == path.read_bytes()
    await storage.close()


async def test_multi_mb_upload_goes_in_resumable_chunks(proxy: FaultyProxy, http, tmp_path: Path, emulator: str):
    settings = _settings(tmp_path)
    path = _file(tmp_path, "video.mp4", 12 * 1024 * 1024 + 12345)
    storage = GcsStorage(settings, http, chunk_size=4 * 1024 * 1024)
    stored = await storage.put(VIDEO, spec("video"), path)
    assert stored.size == path.stat().st_size
    assert stored.md5_base64 == _md5(path)
    chunk_puts = [s for s in proxy.seen if s.startswith("PUT bytes ") and "*/" not in s]
    assert len(chunk_puts) == 4  # 3 x 4 MiB + the tail
    assert await _download(emulator, "klipstream-vods-raw", f"{VIDEO}/video_{VIDEO}.mp4") == path.read_bytes()


async def test_transient_failures_are_retried_and_resumed(proxy: FaultyProxy, http, tmp_path: Path, emulator: str):
    proxy.add(lambda r: r.method == "POST", "503", 2)  # session start fails twice
    proxy.add(_is_chunk, "drop", 1)  # first chunk persisted, answer lost
    proxy.add(_is_chunk, "503", 2)
    settings = _settings(tmp_path)
    path = _file(tmp_path, "audio.mp3", 9 * 1024 * 1024)
    storage = GcsStorage(settings, http, chunk_size=2 * 1024 * 1024, retry=FAST)
    stored = await storage.put(VIDEO, spec("audio"), path)
    assert proxy.fired == {"503": 4, "drop": 1}
    assert any("*/" in s for s in proxy.seen)  # asked the server where to resume
    assert stored.md5_base64 == _md5(path)
    assert await _download(emulator, "klipstream-vods-raw", f"{VIDEO}/audio_{VIDEO}.mp3") == path.read_bytes()

    small = tmp_path / "chat.csv"
    small.write_text("time,user,message\n1.0,a,hello\n")
    proxy.add(lambda r: r.method == "POST", "503", 2)
    stored = await storage.put(VIDEO, spec("chat_csv"), small)
    assert stored.uri == f"gs://klipstream-chatlogs/{VIDEO}/{VIDEO}_chat.csv"


async def test_persistent_failure_raises_storage_error(proxy: FaultyProxy, http, tmp_path: Path):
    proxy.add(lambda r: True, "503", 1000)
    path = tmp_path / "words.csv"
    path.write_text("start,end,word\n")
    storage = GcsStorage(_settings(tmp_path), http, retry=FAST)
    with pytest.raises(StorageError) as info:
        await storage.put(VIDEO, spec("words_csv"), path)
    assert info.value.code == "gcs_upload_failed"
    assert len(proxy.seen) == FAST.attempts


async def test_missing_bucket_fails_fast_with_actionable_error(proxy: FaultyProxy, http, tmp_path: Path):
    path = tmp_path / "words.csv"
    path.write_text("start,end,word\n")
    storage = GcsStorage(_settings(tmp_path, gcs_bucket_transcripts="no-such-bucket"), http, retry=FAST)
    with pytest.raises(StorageError) as info:
        await storage.put(VIDEO, spec("words_csv"), path)
    assert info.value.code == "gcs_bucket_not_found"
    assert len(proxy.seen) == 1


async def test_checksum_mismatch_is_detected(proxy: FaultyProxy, http, tmp_path: Path):
    proxy.add(_is_chunk, "corrupt_md5", 10)
    path = _file(tmp_path, "big.mp3", 6 * 1024 * 1024)
    storage = GcsStorage(_settings(tmp_path), http, retry=FAST)
    with pytest.raises(StorageError) as info:
        await storage.put(VIDEO, spec("audio"), path)
    assert info.value.code == "gcs_checksum_mismatch"


async def test_single_bucket_layout_and_listing(proxy: FaultyProxy, http, tmp_path: Path):
    storage = GcsStorage(_settings(tmp_path, gcs_bucket="one"), http)
    a = tmp_path / "a.csv"
    a.write_text("x\n1\n")
    b = tmp_path / "b.json"
    b.write_text("{}")
    await storage.put("777", spec("segments_csv"), a)
    await storage.put("777", spec("integrated_json"), b)
    await storage.put("888", spec("segments_csv"), a)
    listed = await storage.list_objects("777")
    assert sorted(o.uri for o in listed) == ["gs://one/777/audio_777_segments.csv", "gs://one/777/integrated_777.json"]
    assert {o.md5_base64 for o in listed} == {_md5(a), _md5(b)}
    assert len(await storage.list_objects()) == 3


async def test_signed_urls_with_a_service_account_key(
    proxy: FaultyProxy, http, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    creds = tmp_path / "sa.json"
    creds.write_text(
        json.dumps({"type": "service_account", "client_email": "svc@proj.iam.gserviceaccount.com", "private_key": pem})
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(creds))
    path = tmp_path / "w.json"
    path.write_text("[0.5]")
    storage = GcsStorage(_settings(tmp_path, signed_url_seconds=3600), http)
    assert storage.can_sign
    stored = await storage.put(VIDEO, spec("waveform"), path)

    parts = urlsplit(stored.url)
    assert parts.scheme == "https" and parts.path == f"/klipstream-vods-raw/{VIDEO}/audio_{VIDEO}_waveform.json"
    query = dict(parse_qsl(parts.query))
    assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert query["X-Goog-Expires"] == "3600"
    assert query["X-Goog-Credential"].startswith("svc@proj.iam.gserviceaccount.com/")
    # Rebuild the V4 string-to-sign and check the signature with the public key.
    signature = binascii.unhexlify(query.pop("X-Goog-Signature"))
    canonical_query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(query.items()))
    canonical = "\n".join(["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"])
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["GOOG4-RSA-SHA256", query["X-Goog-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key.public_key().verify(signature, to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


def test_signed_url_lifetime_is_capped(tmp_path: Path):
    from klipstream.config import ConfigError

    with pytest.raises(ConfigError):
        GcsStorage(_settings(tmp_path, signed_url_seconds=604801), None)  # type: ignore[arg-type]
