"""Stage `download`: metadata first, then the media (audio only unless the job asks for video).

The job shows the title, channel and duration before any byte of media moves, and a VOD over the
length limit fails before the download starts. The transfers themselves run in killable child
processes (klipstream.acquisition.media), audio and video concurrently.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import av

from klipstream.acquisition import media as media_fetch
from klipstream.acquisition.media import DownloadProgress
from klipstream.errors import InvalidVideoUrl, KlipstreamError, VideoNotFound, VideoTooLong
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage, VideoInfo
from klipstream.network import ensure_public_url

_REPORT_INTERVAL = 0.25  # seconds between progress reports from output lines
_HEARTBEAT = 1.0  # the stage reports at least this often, even while a transfer stalls


@dataclass(frozen=True)
class _Transfer:
    key: str  # artifact key
    format_spec: str
    stem: Path  # output path without extension; yt-dlp adds the real one


async def run(ctx: StageContext) -> None:
    local = local_media_path(ctx.url)
    if local is not None:
        await _use_local_file(ctx, local)
        return
    allow_private = ctx.settings.allow_private_urls
    await ensure_public_url(ctx.url, allow_private=allow_private)
    ctx.progress(0.0, "Reading video information")
    meta = await ctx.to_thread(media_fetch.extract_metadata, ctx.url, allow_private=allow_private)
    ctx.set_video(meta.video)
    check_duration(meta.video.duration_seconds, ctx.settings.max_video_seconds)
    await media_fetch.ensure_public_urls(meta.urls, allow_private=allow_private)

    transfers = [_Transfer("media", media_fetch.AUDIO_FORMAT, _stem(ctx.output_path("media")))]
    if ctx.options.include_video:
        if meta.has_video:
            height = ctx.options.video_height or ctx.settings.video_height
            clips = ctx.options.clip_options
            if clips is not None and not ctx.options.video_height:  # clips want their own height's worth
                height = max(height, clips.height or ctx.settings.clip_height)
            transfers.append(_Transfer("video", media_fetch.video_format(height), _stem(ctx.output_path("video"))))
        else:
            ctx.warn("The source has no video rendition; only the audio was downloaded.")
    info_json = ctx.workdir / f".{ctx.video_id}.info.json"
    await ctx.to_thread(_write_json, info_json, meta.info)
    try:
        paths = await _transfer_all(ctx, transfers, info_json)
    except KlipstreamError as exc:
        # A retryable failure keeps yt-dlp's .part files so the stage's retry resumes them.
        if not exc.retryable:
            await ctx.to_thread(_remove_partials, transfers, info_json)
        raise
    except BaseException:
        # Cancelled: nothing half-written may stay behind.
        await asyncio.shield(asyncio.to_thread(_remove_partials, transfers, info_json))
        raise
    await ctx.to_thread(_remove_partials, [], info_json)
    for transfer, path in zip(transfers, paths, strict=True):
        ctx.add_artifact(transfer.key, path)


async def _transfer_all(ctx: StageContext, transfers: list[_Transfer], info_json: Path) -> list[Path]:
    tracker = _Tracker(ctx, len(transfers))
    public_only = not ctx.settings.allow_private_urls
    tasks = [
        asyncio.create_task(
            media_fetch.run_download(
                media_fetch.download_args(
                    info_json,
                    t.stem,
                    t.format_spec,
                    fragments=ctx.settings.download_fragments,
                    public_only=public_only,
                ),
                on_progress=tracker.callback(i),
                time_limit=ctx.settings.stage_timeout_seconds,
            )
        )
        for i, t in enumerate(transfers)
    ]
    heartbeat = asyncio.create_task(tracker.heartbeat())
    try:
        paths = await asyncio.gather(*tasks)
    except BaseException:
        # One transfer failed or the stage was cancelled: stop the others and wait until their
        # processes are dead, so the partial files can be removed safely.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=3.0)
        raise
    finally:
        heartbeat.cancel()
    tracker.report(force=True)
    return list(paths)


class _Tracker:
    """Combines the progress lines of concurrent transfers into one stage fraction and rate."""

    def __init__(self, ctx: StageContext, count: int) -> None:
        self.ctx = ctx
        self.latest: list[DownloadProgress | None] = [None] * count
        self.last_report = 0.0

    def callback(self, index: int):  # type: ignore[no-untyped-def]
        def update(progress: DownloadProgress) -> None:
            self.latest[index] = progress
            self.report()

        return update

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(_HEARTBEAT)
            self.report(force=True)

    def report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_report < _REPORT_INTERVAL:
            return
        self.last_report = now
        fraction, detail = summarise(self.latest)
        self.ctx.progress(fraction, detail)


def summarise(latest: list[DownloadProgress | None]) -> tuple[float, str]:
    """(fraction, detail) for the transfers' last reports; bytes-weighted when all sizes are known."""
    known = [p for p in latest if p is not None]
    if not known:
        return 0.0, "Starting download"
    downloaded = sum(p.downloaded_bytes for p in known)
    totals = [p.total_bytes for p in known]
    if len(known) == len(latest) and all(totals):
        fraction = min(1.0, downloaded / sum(t for t in totals if t))
    else:
        fraction = sum((p.fraction or 0.0) if p is not None else 0.0 for p in latest) / len(latest)
    speed = sum(p.speed or 0.0 for p in known if not p.finished)
    parts = [f"{downloaded / 1e6:.1f} MB"]
    if all(totals):
        parts[0] += f" of {sum(t for t in totals if t) / 1e6:.1f} MB"
    fragments = [p for p in known if p.fragment_count]
    if fragments:
        done = sum(p.fragment_index or 0 for p in fragments)
        parts.append(f"fragment {done}/{sum(p.fragment_count or 0 for p in fragments)}")
    if speed > 0:
        parts.append(f"{speed / 1e6:.2f} MB/s")
    return fraction, ", ".join(parts)


def check_duration(seconds: float | None, limit: float) -> None:
    if seconds is not None and seconds > limit:
        raise VideoTooLong(
            f"The video lasts {seconds / 3600:.1f} h; this server analyses at most {limit / 3600:.1f} h.",
            suggested_action="Submit a shorter VOD or raise KLIPSTREAM_MAX_VIDEO_SECONDS.",
        )


def local_media_path(url: str) -> Path | None:
    """The file a job URL names, or None for network URLs (which urls.py validates)."""
    parts = urlsplit(url.strip())
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme == "" and not parts.netloc:
        return Path(url.strip()).expanduser()
    return None


async def _use_local_file(ctx: StageContext, path: Path) -> None:
    if not ctx.settings.allow_local_files:
        raise InvalidVideoUrl(
            "Local file paths are accepted only from the command line.",
            code="local_file_refused",
            suggested_action="Submit an http(s) URL, or set KLIPSTREAM_ALLOW_LOCAL_FILES=true on a private server.",
        )
    info, has_video = await ctx.to_thread(_probe_local, path, ctx.video_id)
    ctx.set_video(info)
    check_duration(info.duration_seconds, ctx.settings.max_video_seconds)
    ext = path.suffix.lstrip(".").lower() or None
    ctx.add_artifact("media", await ctx.to_thread(_link, path, ctx.output_path("media", ext)))
    if ctx.options.include_video:
        if has_video:
            ctx.add_artifact("video", await ctx.to_thread(_link, path, ctx.output_path("video", ext)))
        else:
            ctx.warn("The file has no video track; only the audio is analysed.")
    ctx.progress(1.0, "Local file")


def _probe_local(path: Path, video_id: str) -> tuple[VideoInfo, bool]:
    if not path.is_file():
        raise VideoNotFound(f"The file {path} does not exist.", suggested_action="Check the path and try again.")
    try:
        with av.open(str(path)) as container:
            duration = container.duration / av.time_base if container.duration else None
            has_video = bool(container.streams.video)
    except av.error.FFmpegError:
        raise InvalidVideoUrl(f"{path.name} is not an audio or video file.", code="not_media") from None
    return VideoInfo(id=video_id, title=path.stem, duration_seconds=duration, extractor="local"), has_video


def _link(source: Path, target: Path) -> Path:
    """Make the file visible in the job directory without copying gigabytes."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        try:
            target.symlink_to(source.resolve())
        except OSError:
            shutil.copyfile(source, target)
    return target


def _stem(path: Path) -> Path:
    return path.with_suffix("")


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _remove_partials(transfers: list[_Transfer], info_json: Path) -> None:
    info_json.unlink(missing_ok=True)
    for transfer in transfers:
        for leftover in transfer.stem.parent.glob(transfer.stem.name + ".*"):
            leftover.unlink(missing_ok=True)


DOWNLOAD = Stage(
    name="download",
    display=DisplayStage.DOWNLOADING,
    run=run,
    needs=(),
    provides=("media", "video"),
    weight=2.0,
    resource=Resource.NETWORK,
)
