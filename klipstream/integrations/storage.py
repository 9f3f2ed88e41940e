"""Where published artifacts go: a local directory (default) or Google Cloud Storage.

Both backends take a finished file from a job directory and return where it now lives. The GCS
backend streams from disk in bounded chunks (a multi-GB video never sits in memory), retries
transient failures with backoff and full jitter, and only reports success once the MD5 the server
computed matches the one computed locally, so a result URL never points at a truncated object.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
from gcloud.aio.storage import Bucket
from gcloud.aio.storage import Storage as GcsClient

# Imported with the module on purpose: the library fixes the signed-URL host when its blob module
# is first imported, so this keeps it at storage.googleapis.com even if a test later points
# STORAGE_EMULATOR_HOST at an emulator.
from gcloud.aio.storage.blob import Blob
from gcloud.aio.storage.storage import init_api_root

from klipstream.artifacts import ARTIFACTS, ArtifactSpec, StorageKind
from klipstream.config import ConfigError
from klipstream.errors import InternalError, StorageError
from klipstream.retry import RetryPolicy, parse_retry_after

if TYPE_CHECKING:
    from klipstream.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_SIGNED_URL_SECONDS = 7 * 24 * 3600  # the V4 signing limit
RESUMABLE_THRESHOLD = 5 * 1024 * 1024  # above this, resumable upload in chunks
CHUNK_SIZE = 8 * 1024 * 1024  # must be a multiple of 256 KiB
_CHUNK_QUANTUM = 256 * 1024
_HASH_BLOCK = 1024 * 1024
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class StoredObject:
    uri: str  # file:///... or gs://bucket/object
    url: str  # what a client fetches: files route, V4 signed https URL, or the gs:// URI
    size: int
    md5_base64: str | None  # confirmed by the server; None where the backend keeps no checksum


class Storage(Protocol):
    async def put(self, video_id: str, artifact: ArtifactSpec, path: Path) -> StoredObject: ...

    async def list_objects(self, video_id: str | None = None) -> list[StoredObject]: ...

    async def purge(self, stored_before: float) -> int: ...

    async def close(self) -> None: ...


def create_storage(settings: Settings, session: aiohttp.ClientSession) -> Storage:
    if settings.storage == "gcs":
        return GcsStorage(settings, session)
    return LocalStorage(settings)


def _check_names(video_id: str, artifact: ArtifactSpec, path: Path) -> str:
    """The object's file name; ids become path components, so refuse anything that could escape."""
    if not _SAFE_ID.match(video_id) or video_id in (".", ".."):
        raise InternalError(f"Refusing to store artifacts under the unsafe video id {video_id!r}.")
    if not artifact.published:
        raise InternalError(f"Artifact {artifact.key!r} is internal and is never published.")
    # The stage may have chosen another container (e.g. .ogg where no MP3 encoder exists).
    return artifact.filename(video_id, path.suffix[1:] or None)


# --------------------------------------------------------------------------------------------
# Local directory


class LocalStorage:
    """Artifacts under settings.artifacts_dir/{video_id}/{file}, served by the server's files route.

    A hard link makes publishing a multi-GB file instant and free when the job directory is on the
    same file system; otherwise the copy runs in a thread.
    """

    def __init__(self, settings: Settings) -> None:
        self._root = settings.artifacts_dir
        self._public_url = settings.public_url.rstrip("/")

    def _stored(self, video_id: str, path: Path) -> StoredObject:
        return StoredObject(
            uri=path.resolve().as_uri(),
            url=f"{self._public_url}/files/{quote(video_id)}/{quote(path.name)}",
            size=path.stat().st_size,
            md5_base64=None,
        )

    async def put(self, video_id: str, artifact: ArtifactSpec, path: Path) -> StoredObject:
        filename = _check_names(video_id, artifact, path)
        dest = self._root / video_id / filename
        try:
            return await asyncio.to_thread(self._place, video_id, path, dest)
        except OSError as exc:
            raise StorageError(f"Could not store {filename} in {self._root}: {exc.strerror or exc}.") from exc

    def _place(self, video_id: str, source: Path, dest: Path) -> StoredObject:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
        try:
            try:
                os.link(source, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                    raise
                shutil.copyfile(source, tmp)
            os.replace(tmp, dest)  # readers never see a half-written file
        finally:
            tmp.unlink(missing_ok=True)
        return self._stored(video_id, dest)

    async def list_objects(self, video_id: str | None = None) -> list[StoredObject]:
        return await asyncio.to_thread(self._list, video_id)

    def _list(self, video_id: str | None) -> list[StoredObject]:
        if video_id is not None and not _SAFE_ID.match(video_id):
            return []
        dirs = [self._root / video_id] if video_id else sorted(p for p in self._root.glob("*") if p.is_dir())
        found = []
        for folder in dirs:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    found.append(self._stored(folder.name, path))
        return found

    async def purge(self, stored_before: float) -> int:
        """Remove artifacts stored before the cutoff (by modification time) and emptied folders."""
        return await asyncio.to_thread(self._purge, stored_before)

    def _purge(self, stored_before: float) -> int:
        removed = 0
        if not self._root.is_dir():
            return 0
        for folder in self._root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                try:
                    if path.is_file() and path.stat().st_mtime < stored_before:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        return removed

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Google Cloud Storage


GCS_RETRY = RetryPolicy(attempts=6, base_seconds=0.5, cap_seconds=30.0, max_retry_after=120.0)


class _Transient(Exception):
    """A response GCS documents as worth retrying (408, 429, 5xx)."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


class _SessionGone(Exception):
    """The resumable session expired or was lost (404/410): the upload must start over."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _Transient):
        return True
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status in (408, 429) or exc.status >= 500
    return isinstance(exc, (aiohttp.ClientError, ConnectionError, TimeoutError))


def _storage_error(what: str, exc: BaseException) -> StorageError:
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return StorageError(
            f"Google Cloud Storage refused to {what} (HTTP {status}).",
            code="gcs_forbidden",
            suggested_action="Grant the service account roles/storage.objectAdmin on the bucket, then retry.",
        )
    if status == 404:
        return StorageError(
            f"Google Cloud Storage could not {what}: the bucket does not exist (HTTP 404).",
            code="gcs_bucket_not_found",
            suggested_action="Create the bucket or set KLIPSTREAM_GCS_BUCKET / KLIPSTREAM_GCS_BUCKET_*, then retry.",
        )
    detail = f"HTTP {status}" if status else type(exc).__name__
    return StorageError(f"Could not {what} in Google Cloud Storage ({detail}).", code="gcs_upload_failed")


def _file_md5(path: Path) -> tuple[int, str]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, base64.b64encode(digest.digest()).decode("ascii")


class _HashingWriter:
    """A file written block by block (in a worker thread) while its MD5 and size are counted."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")
        self._digest = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def write(self, block: bytes) -> None:
        self._file.write(block)
        self._digest.update(block)
        self.size += len(block)

    def close(self) -> None:
        self._file.close()

    def md5(self) -> str:
        return base64.b64encode(self._digest.digest()).decode("ascii")


def _read_at(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def _next_offset(range_header: str | None) -> int:
    """Bytes GCS has persisted, from a 308's `Range: bytes=0-N` (absent: none)."""
    if not range_header or "-" not in range_header:
        return 0
    return int(range_header.rsplit("-", 1)[1]) + 1


class GcsStorage:
    """Artifacts in GCS through gcloud-aio-storage, at {bucket}/{video_id}/{file}.

    The client library handles credentials (service-account file, workload identity / metadata
    server, or the emulator when STORAGE_EMULATOR_HOST is set), small multipart uploads, listing
    and URL signing. Large files use GCS's resumable protocol implemented here in chunks, because
    the library's resumable path sends the whole file in one request and cannot resume from the
    offset the server has already persisted.

    `url` is a V4 signed https URL when the credentials can sign: a service-account key (signed
    locally) or KLIPSTREAM_GCS_SIGNING_ACCOUNT (signed by the IAM signBlob API, which is how Cloud
    Run's key-less service accounts sign; the account needs roles/iam.serviceAccountTokenCreator
    on itself). Otherwise `url` is the gs:// URI, readable only by principals with bucket access.
    """

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        retry: RetryPolicy | None = None,
        chunk_size: int = CHUNK_SIZE,
        resumable_threshold: int = RESUMABLE_THRESHOLD,
    ) -> None:
        if settings.signed_url_seconds > MAX_SIGNED_URL_SECONDS:
            raise ConfigError(
                f"KLIPSTREAM_SIGNED_URL_SECONDS={settings.signed_url_seconds}: "
                f"at most {MAX_SIGNED_URL_SECONDS} (7 days, the V4 signing limit)"
            )
        if chunk_size % _CHUNK_QUANTUM:
            raise ValueError("chunk_size must be a multiple of 256 KiB")
        self._settings = settings
        self._session = session
        self._retry = retry or GCS_RETRY
        self._chunk_size = chunk_size
        self._threshold = resumable_threshold
        self._limit = asyncio.Semaphore(settings.upload_concurrency)
        self._is_dev, api_root = init_api_root(None)
        self._upload_root = f"{api_root}/upload/storage/v1/b"
        self._read_root = f"{api_root}/storage/v1/b"
        self._client = GcsClient(session=session)  # type: ignore[arg-type]  # library types name requests' Session
        service_data = self._client.token.service_data
        self._sign_locally = bool(service_data.get("private_key") and service_data.get("client_email"))
        self._signing_account = settings.gcs_signing_account or None

    @property
    def can_sign(self) -> bool:
        return self._sign_locally or self._signing_account is not None

    def location(self, video_id: str, artifact: ArtifactSpec, path: Path) -> tuple[str, str]:
        """(bucket, object name) of an artifact; keeps the existing per-kind bucket layout by default."""
        filename = _check_names(video_id, artifact, path)
        if self._settings.gcs_bucket:
            return self._settings.gcs_bucket, f"{video_id}/{filename}"
        return self._bucket_for(artifact.kind), f"{video_id}/{filename}"

    def _bucket_for(self, kind: StorageKind) -> str:
        s = self._settings
        return {
            StorageKind.RAW: s.gcs_bucket_raw,
            StorageKind.TRANSCRIPTS: s.gcs_bucket_transcripts,
            StorageKind.CHATLOGS: s.gcs_bucket_chatlogs,
            StorageKind.ANALYSIS: s.gcs_bucket_analysis,
        }[kind]

    def _buckets(self) -> list[str]:
        if self._settings.gcs_bucket:
            return [self._settings.gcs_bucket]
        kinds = {spec.kind for spec in ARTIFACTS.values() if spec.published}
        return sorted({self._bucket_for(kind) for kind in kinds})

    async def _auth(self) -> dict[str, str]:
        if self._is_dev:
            return {}
        token = await self._client.token.get()
        return {"Authorization": f"Bearer {token}"}

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await op()
            except StorageError:
                raise  # already classified by the operation itself
            except Exception as exc:
                failures += 1
                if not _is_transient(exc) or self._retry.exhausted(failures):
                    raise _storage_error(what, exc) from exc
                retry_after = exc.retry_after if isinstance(exc, _Transient) else None
                delay = self._retry.delay(failures, retry_after)
                log.warning("gcs: %s failed (%s); retry %d in %.1fs", what, exc, failures, delay)
                await asyncio.sleep(delay)

    async def put(self, video_id: str, artifact: ArtifactSpec, path: Path) -> StoredObject:
        bucket, name = self.location(video_id, artifact, path)
        metadata = {"video_id": video_id, "artifact": artifact.key}
        size, md5 = await self.upload_file(bucket, name, path, artifact.content_type, metadata)
        return StoredObject(
            uri=f"gs://{bucket}/{name}", url=await self._url(bucket, name, size), size=size, md5_base64=md5
        )

    async def upload_file(
        self, bucket: str, name: str, path: Path, content_type: str, metadata: dict[str, str]
    ) -> tuple[int, str]:
        """Upload `path` to gs://bucket/name, streamed above the resumable threshold, and return
        (size, base64 MD5) once the server's checksum matches; published artifacts and job
        checkpoints (klipstream.jobs.checkpoints) both go through here."""
        async with self._limit:
            try:
                size, md5 = await asyncio.to_thread(_file_md5, path)
            except OSError as exc:
                raise StorageError(f"Could not read {path.name} for upload: {exc.strerror or exc}.") from exc
            body = {"metadata": metadata}
            if size > self._threshold:
                result = await self._upload_resumable(bucket, name, path, size, md5, content_type, body)
            else:
                result = await self._upload_small(bucket, name, path, content_type, body)
            self._verify(bucket, name, result, size, md5)
        return size, md5

    async def download_file(self, bucket: str, name: str, dest: Path, *, size: int, md5: str) -> None:
        """Stream gs://bucket/name into `dest` (written under a temporary name, renamed when the
        size and MD5 match what the upload confirmed), in bounded blocks: a multi-GB file never
        sits in memory. Transient failures start the transfer over, through the retry policy."""
        what = f"download gs://{bucket}/{name}"
        url = f"{self._read_root}/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{random.getrandbits(32):08x}.part")

        async def attempt() -> None:
            headers = await self._auth()
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
            async with self._session.get(url, params={"alt": "media"}, headers=headers, timeout=timeout) as resp:
                if resp.status == 404:
                    raise StorageError(f"gs://{bucket}/{name} does not exist.", code="gcs_object_not_found")
                await self._raise_for(resp)
                sink = await asyncio.to_thread(_HashingWriter, tmp)
                try:
                    async for block in resp.content.iter_chunked(_HASH_BLOCK):
                        await asyncio.to_thread(sink.write, block)
                finally:
                    await asyncio.to_thread(sink.close)
            if sink.size != size or sink.md5() != md5:
                raise StorageError(
                    f"gs://{bucket}/{name} read back {sink.size} bytes with MD5 {sink.md5()}, "
                    f"expected {size} and {md5}.",
                    code="gcs_checksum_mismatch",
                )

        try:
            async with self._limit:
                await self._retrying(what, attempt)
            await asyncio.to_thread(os.replace, tmp, dest)
        finally:
            await asyncio.to_thread(tmp.unlink, True)

    async def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Delete every object under `prefix` (a job's checkpoints); objects already gone count as deleted."""
        removed = 0
        for item in await self.list_prefix(bucket, prefix):
            await self.delete_object(bucket, item["name"])
            removed += 1
        return removed

    async def delete_object(self, bucket: str, name: str) -> None:
        """Delete one object; one already gone is not an error."""

        async def delete() -> None:
            try:
                await self._client.delete(bucket, name, timeout=60)
            except aiohttp.ClientResponseError as exc:
                if exc.status != 404:
                    raise

        await self._retrying(f"delete gs://{bucket}/{name}", delete)

    async def list_prefix(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        """The object resources under `prefix`, every page."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"prefix": prefix, **({"pageToken": token} if token else {})}

            async def page(params: dict[str, str] = params) -> dict[str, Any]:
                return await self._client.list_objects(bucket, params=params, timeout=60)

            listing = await self._retrying(f"list gs://{bucket}/{prefix}", page)
            items.extend(listing.get("items", []))
            token = listing.get("nextPageToken") or ""
            if not token:
                return items

    def _verify(self, bucket: str, name: str, result: dict[str, Any], size: int, md5: str) -> None:
        if int(result.get("size", -1)) != size:
            raise StorageError(
                f"gs://{bucket}/{name} has {result.get('size')} bytes after upload, expected {size}.",
                code="gcs_checksum_mismatch",
            )
        if result.get("md5Hash") != md5:
            raise StorageError(
                f"gs://{bucket}/{name} has MD5 {result.get('md5Hash')} after upload, expected {md5}.",
                code="gcs_checksum_mismatch",
            )

    async def _upload_small(
        self, bucket: str, name: str, path: Path, content_type: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        # Small enough to hold in memory. Object metadata makes the library use a multipart upload,
        # which carries the custom metadata in the same request (and works on the emulator, which
        # drops simple media uploads with a JSON content type).
        data = await asyncio.to_thread(path.read_bytes)

        async def attempt() -> dict[str, Any]:
            return await self._client.upload(
                bucket,
                name,
                data,
                content_type=content_type,
                metadata=metadata,
                force_resumable_upload=False,
                timeout=120,
            )

        return await self._retrying(f"upload gs://{bucket}/{name}", attempt)

    async def _upload_resumable(
        self, bucket: str, name: str, path: Path, size: int, md5: str, content_type: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        what = f"upload gs://{bucket}/{name}"
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            for _restart in range(3):
                session_uri = await self._retrying(
                    f"start {what}", lambda: self._initiate(bucket, name, size, md5, content_type, metadata)
                )
                try:
                    return await self._send_chunks(what, session_uri, fd, size)
                except _SessionGone:
                    log.warning("gcs: resumable session for %s expired; starting over", name)
            raise StorageError(f"Could not {what}: the upload session kept expiring.", code="gcs_upload_failed")
        finally:
            os.close(fd)

    async def _initiate(
        self, bucket: str, name: str, size: int, md5: str, content_type: str, metadata: dict[str, Any]
    ) -> str:
        body = {"name": name, "contentType": content_type, "md5Hash": md5, **metadata}
        headers = {
            **(await self._auth()),
            "X-Upload-Content-Type": content_type,
            "X-Upload-Content-Length": str(size),
        }
        url = f"{self._upload_root}/{quote(bucket, safe='')}/o"
        async with self._session.post(
            url,
            params={"uploadType": "resumable", "name": name},
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            await self._raise_for(resp)
            location = resp.headers.get("Location")
            if not location:
                raise StorageError(f"GCS started an upload of {name} without a session URI.", code="gcs_protocol")
            return location

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        text = (await resp.text(errors="replace"))[:500]
        if resp.status in (408, 429) or resp.status >= 500:
            raise _Transient(resp.status, text, parse_retry_after(resp.headers.get("Retry-After")))
        raise aiohttp.ClientResponseError(
            resp.request_info, resp.history, status=resp.status, message=text, headers=resp.headers
        )

    async def _send_chunks(self, what: str, session_uri: str, fd: int, size: int) -> dict[str, Any]:
        offset = 0
        failures = 0
        while True:
            length = min(self._chunk_size, size - offset)
            try:
                data = await asyncio.to_thread(_read_at, fd, offset, length)
                done, offset_or_result = await self._put_chunk(session_uri, data, offset, size)
            except (_SessionGone, StorageError):
                raise
            except Exception as exc:
                failures += 1
                if not _is_transient(exc) or self._retry.exhausted(failures):
                    raise _storage_error(what, exc) from exc
                delay = self._retry.delay(failures, exc.retry_after if isinstance(exc, _Transient) else None)
                log.warning("gcs: chunk at %d of %s failed (%s); resuming in %.1fs", offset, what, exc, delay)
                await asyncio.sleep(delay)
                # Ask where the server stands: it may have persisted part of the failed chunk.
                done, offset_or_result = await self._retrying(
                    f"query progress of {what}", lambda: self._query(session_uri, size)
                )
            else:
                failures = 0
            if done:
                assert isinstance(offset_or_result, dict)
                return offset_or_result
            assert isinstance(offset_or_result, int)
            offset = offset_or_result

    async def _put_chunk(self, session_uri: str, data: bytes, offset: int, size: int) -> tuple[bool, Any]:
        end = offset + len(data) - 1
        headers = {**(await self._auth()), "Content-Range": f"bytes {offset}-{end}/{size}"}
        return await self._resumable_put(session_uri, data, headers)

    async def _query(self, session_uri: str, size: int) -> tuple[bool, Any]:
        headers = {**(await self._auth()), "Content-Range": f"bytes */{size}"}
        return await self._resumable_put(session_uri, b"", headers)

    async def _resumable_put(self, session_uri: str, data: bytes, headers: dict[str, str]) -> tuple[bool, Any]:
        async with self._session.put(
            session_uri, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=300, sock_read=120)
        ) as resp:
            if resp.status == 308:
                return False, _next_offset(resp.headers.get("Range"))
            if resp.status in (404, 410):
                raise _SessionGone()
            await self._raise_for(resp)
            return True, await resp.json(content_type=None)

    async def _url(self, bucket: str, name: str, size: int) -> str:
        if not self.can_sign:
            return f"gs://{bucket}/{name}"
        blob = Blob(Bucket(self._client, bucket), name, {"size": size})

        async def sign() -> str:
            return await blob.get_signed_url(
                self._settings.signed_url_seconds,
                service_account_email=self._signing_account,
                session=self._session,  # type: ignore[arg-type]
            )

        return await self._retrying(f"sign a URL for gs://{bucket}/{name}", sign)

    async def list_objects(self, video_id: str | None = None) -> list[StoredObject]:
        if video_id is not None and (not _SAFE_ID.match(video_id) or video_id == "_checkpoints"):
            return []
        found: list[StoredObject] = []
        for bucket in self._buckets():
            token = ""
            while True:
                params = {"pageToken": token} if token else {}
                if video_id:
                    params["prefix"] = f"{video_id}/"

                async def page(params: dict[str, str] = params, bucket: str = bucket) -> dict[str, Any]:
                    return await self._client.list_objects(bucket, params=params, timeout=60)

                listing = await self._retrying(f"list gs://{bucket}", page)
                for item in listing.get("items", []):
                    if item["name"].startswith("_checkpoints/"):  # a job's intermediates (klipstream.jobs.checkpoints)
                        continue
                    size = int(item.get("size", 0))
                    found.append(
                        StoredObject(
                            uri=f"gs://{bucket}/{item['name']}",
                            url=await self._url(bucket, item["name"], size),
                            size=size,
                            md5_base64=item.get("md5Hash"),
                        )
                    )
                token = listing.get("nextPageToken") or ""
                if not token:
                    break
        return found

    async def purge(self, stored_before: float) -> int:
        """Retention of Cloud Storage objects belongs to the buckets' lifecycle rules (docs/deploy.md),
        which expire objects without a process listing millions of them."""
        return 0

    async def close(self) -> None:
        await self._client.close()
