"""Failure taxonomy.

Every failure a user can see is an exception of a known class, so the job error is classified by
type, never by grepping a message. Each class carries whether a retry can help and what the user
should do next.
"""

from __future__ import annotations

import asyncio
import errno
from enum import StrEnum
from typing import ClassVar


class ErrorType(StrEnum):
    NETWORK_ERROR = "network_error"  # a peer could not be reached or dropped the connection
    INVALID_VIDEO_URL = "invalid_video_url"  # the URL is malformed, refused, or not media
    VIDEO_NOT_FOUND = "video_not_found"  # the VOD does not exist (deleted, wrong id)
    VIDEO_UNAVAILABLE = "video_unavailable"  # exists but cannot be fetched (subscriber-only, geo-blocked)
    VIDEO_TOO_LONG = "video_too_long"  # longer than KLIPSTREAM_MAX_VIDEO_SECONDS
    PROCESSING_TIMEOUT = "processing_timeout"  # a stage ran past its time limit
    INSUFFICIENT_RESOURCES = "insufficient_resources"  # out of memory or disk
    TRANSCRIPTION_ERROR = "transcription_error"  # the speech model failed on this audio
    EXTERNAL_SERVICE_ERROR = "external_service_error"  # a third-party API answered with an error
    STORAGE_ERROR = "storage_error"  # writing or reading artifacts failed
    DATABASE_UNAVAILABLE = "database_unavailable"  # the job database could not be reached in time
    INTERNAL_ERROR = "internal_error"  # a bug: nothing the user did


class KlipstreamError(Exception):
    """Base of all classified failures."""

    error_type: ClassVar[ErrorType] = ErrorType.INTERNAL_ERROR
    retryable: ClassVar[bool] = False
    default_action: ClassVar[str] = "This is a bug in KlipStream. Retry later; if it persists, report the job id."

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        suggested_action: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.error_type.value
        self.retry_after = retry_after
        self.suggested_action = suggested_action or self.default_action


class NetworkError(KlipstreamError):
    error_type = ErrorType.NETWORK_ERROR
    retryable = True
    default_action = "Check that the URL is reachable, then retry the job."


class InvalidVideoUrl(KlipstreamError):
    error_type = ErrorType.INVALID_VIDEO_URL
    default_action = "Submit a link to a Twitch VOD (https://www.twitch.tv/videos/<id>) or a direct media URL."


class VideoNotFound(KlipstreamError):
    error_type = ErrorType.VIDEO_NOT_FOUND
    default_action = "Check the video id; the VOD may have been deleted or expired."


class VideoUnavailable(KlipstreamError):
    error_type = ErrorType.VIDEO_UNAVAILABLE
    default_action = "The VOD is restricted (subscriber-only, geo-blocked or private); make it public and retry."


class VideoTooLong(KlipstreamError):
    error_type = ErrorType.VIDEO_TOO_LONG
    default_action = "Submit a shorter VOD or raise KLIPSTREAM_MAX_VIDEO_SECONDS."


class ProcessingTimeout(KlipstreamError):
    error_type = ErrorType.PROCESSING_TIMEOUT
    retryable = True
    default_action = "Retry the job; if it keeps timing out, the service is overloaded."


class TimeLimitExceeded(ProcessingTimeout):
    """A step ran past its whole time budget. Not retried: another attempt would take as long
    (a stalled transfer is retried inside the step, by yt-dlp's and the clients' own retries)."""

    retryable = False
    default_action = "The step exceeded its time limit; raise KLIPSTREAM_STAGE_TIMEOUT_SECONDS or submit a shorter VOD."


class InsufficientResources(KlipstreamError):
    error_type = ErrorType.INSUFFICIENT_RESOURCES
    retryable = True
    default_action = "Retry later, when the server has more free memory or disk."


class TranscriptionError(KlipstreamError):
    error_type = ErrorType.TRANSCRIPTION_ERROR
    default_action = "Retry the job; if it fails again the audio may be damaged."


class ExternalServiceError(KlipstreamError):
    error_type = ErrorType.EXTERNAL_SERVICE_ERROR
    retryable = True
    default_action = "A third-party service failed; retry the job later."


class StorageError(KlipstreamError):
    error_type = ErrorType.STORAGE_ERROR
    retryable = True
    default_action = "Artifact storage failed; retry the job later."


class DatabaseUnavailable(KlipstreamError):
    """The job store's database is down, unreachable or refusing connections.

    Raised at once (connection refused) or after the store's timeout, never after a hang; the HTTP
    layer answers 503 with Retry-After, since the same request can succeed a moment later.
    """

    error_type = ErrorType.DATABASE_UNAVAILABLE
    retryable = True
    default_action = "The job database is unavailable; retry in a few seconds."


class InternalError(KlipstreamError):
    error_type = ErrorType.INTERNAL_ERROR


ERROR_CLASSES: dict[ErrorType, type[KlipstreamError]] = {
    cls.error_type: cls
    for cls in (
        NetworkError,
        InvalidVideoUrl,
        VideoNotFound,
        VideoUnavailable,
        VideoTooLong,
        ProcessingTimeout,
        InsufficientResources,
        TranscriptionError,
        ExternalServiceError,
        StorageError,
        InternalError,
    )
}
"""The class of each error type, so an error can cross a process boundary as plain data."""


class StageUnavailable(Exception):
    """A stage whose input does not exist for this video (e.g. chat replay refused).

    Not a failure: the stage ends `unavailable`, the job gets a warning, and stages that can do
    without its artifacts go on.
    """


def classify(exc: BaseException) -> KlipstreamError:
    """Map any exception to a classified error, by type only."""
    import aiohttp  # here, not at the top: the child processes that import this module never use it

    if isinstance(exc, KlipstreamError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ProcessingTimeout("The step took longer than its time limit.")
    if isinstance(exc, MemoryError):
        return InsufficientResources("The server ran out of memory while processing this job.")
    if isinstance(exc, aiohttp.ClientResponseError):
        if exc.status == 429 or exc.status >= 500:
            return ExternalServiceError(f"A remote service answered HTTP {exc.status}.", code=f"http_{exc.status}")
        return ExternalServiceError(
            f"A remote service refused the request (HTTP {exc.status}).", code=f"http_{exc.status}"
        )
    if isinstance(exc, (aiohttp.ClientError, ConnectionError)):
        return NetworkError(f"Network failure: {type(exc).__name__}.")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientResources("The server ran out of disk space.", code="disk_full")
    if isinstance(exc, OSError):
        return StorageError(f"File system error: {exc.strerror or type(exc).__name__}.")
    return InternalError(f"Unexpected {type(exc).__name__}.")
