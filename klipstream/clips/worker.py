"""The clips child process: `python -m klipstream.clips.worker PLAN.json`.

Everything the clips stage produces is made here, outside the server process: PyAV cuts (which a
thread could not abandon), ffmpeg runs for the vertical versions (grandchildren in the same
process group, taken down with the worker when it is told to stop), captions, thumbnails and edit
lists. It speaks klipstream.proc's line protocol: progress lines, a classified error, and a final
result with the manifest and the warnings for the job.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from klipstream.errors import InsufficientResources, InternalError, VideoUnavailable
from klipstream.proc import child_main, report

# Relative cost of each step per second of clip, for one progress fraction across all of them
# (measured by bench/bench_clips.py on 720p: a vertical second costs ~10x a cut second).
CUT_WEIGHT = 0.1
VERTICAL_WEIGHT = 1.0
THUMBNAIL_WEIGHT = 0.05  # per thumbnail, in clip-seconds


@dataclass
class ClipTask:
    index: int  # artifact number (the highlight's rank)
    rank: int
    start: float  # VOD seconds
    end: float
    peak: float
    name: str  # shown in edit lists
    clip: str  # file names inside the plan's directory
    thumbnail: str
    vertical: str | None = None
    srt: str | None = None
    vtt: str | None = None


@dataclass
class VerticalPlan:
    width: int
    height: int
    fill: str
    facecam: dict[str, float] | None = None
    captions: bool = True


@dataclass
class Plan:
    video: str
    directory: str
    height: int
    codec: str
    preset: str
    crf: int
    manifest: str
    otio: str
    edl: str
    fcpxml: str
    source_name: str
    vertical_preset: str = "superfast"  # 1080x1920 costs ~3x a 720p clip per second
    parallel_cuts: int = 2  # clips cut at once
    captions_srt: str | None = None
    captions_vtt: str | None = None
    transcript: str | None = None
    vertical: VerticalPlan | None = None
    ffmpeg: str = "ffmpeg"
    clips: list[ClipTask] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["clips"] = [ClipTask(**c) for c in data.get("clips") or []]
        if data.get("vertical"):
            data["vertical"] = VerticalPlan(**data["vertical"])
        return cls(**data)


_ENCODER_ACTION = "Set KLIPSTREAM_CLIP_ENCODER=libx264 (or auto), or run on a machine with an NVIDIA GPU and driver."


class _Progress:
    """One fraction over all steps; called from the cutting threads too."""

    def __init__(self, total: float) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.last = 0.0
        self.lock = threading.Lock()

    def add(self, amount: float, detail: str, *, force: bool = False) -> None:
        with self.lock:
            self.done += amount
        self.report(detail, force=force)

    def report(self, detail: str, extra: float = 0.0, *, force: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            if not force and now - self.last < 0.2:
                return
            self.last = now
            fraction = min(1.0, (self.done + extra) / self.total)
            report(fraction, detail)


def run(plan: Plan, warnings: list[str] | None = None) -> dict[str, Any]:
    """Make every file of the plan; returns the manifest. Warnings for the job go to `warnings`."""
    from klipstream.clips import captions as cap
    from klipstream.clips.cut import CutError, EmptySpan, EncoderUnavailable, cut_clip, probe, thumbnail
    from klipstream.clips.editlists import EditClip, timeline, write_all
    from klipstream.clips.encoding import VideoEncoding
    from klipstream.transcript import load_segments

    warn = (warnings if warnings is not None else []).append
    directory = Path(plan.directory)
    video = Path(plan.video)
    encoding = VideoEncoding(plan.codec, plan.preset, plan.crf)
    try:
        source = probe(video)
    except CutError as exc:
        raise VideoUnavailable(f"The video rendition cannot be read: {exc}", code="video_unreadable") from None
    segments = load_segments(Path(plan.transcript)) if plan.transcript else []
    words = cap.all_words(segments)

    total = sum(
        (t.end - t.start) * (CUT_WEIGHT + (VERTICAL_WEIGHT if t.vertical else 0.0)) + THUMBNAIL_WEIGHT
        for t in plan.clips
    )
    progress = _Progress(total)
    progress.report("starting", force=True)

    if plan.transcript and not words:
        warn("nothing was said in the video, so the clips have no captions")
    if words and plan.captions_srt and plan.captions_vtt:
        cues = cap.build_cues(words)
        (directory / plan.captions_srt).write_text(cap.srt(cues), encoding="utf-8")
        (directory / plan.captions_vtt).write_text(cap.webvtt(cues), encoding="utf-8")

    def cut_one(n: int, task: ClipTask) -> dict[str, Any] | None:
        label = f"clip {n} of {len(plan.clips)}"
        started = time.monotonic()
        try:
            result = cut_clip(video, directory / task.clip, task.start, task.end, height=plan.height, encoding=encoding)
        except EmptySpan:
            # e.g. a highlight past the end of the video rendition: the others still get clips
            warn(f"highlight {task.rank} has no video frames ({task.start:.1f}-{task.end:.1f} s); no clip was cut")
            (directory / task.clip).unlink(missing_ok=True)
            return None
        except EncoderUnavailable as exc:
            raise InternalError(str(exc), code="encoder_unavailable", suggested_action=_ENCODER_ACTION) from None
        except CutError as exc:
            raise VideoUnavailable(str(exc), code="clip_failed") from None
        cut_seconds = time.monotonic() - started
        progress.add((task.end - task.start) * CUT_WEIGHT, f"{label}: cut")
        peak = min(max(task.peak, result.first_pts), result.first_pts + result.duration - 1e-3)
        try:
            thumb_at = thumbnail(video, directory / task.thumbnail, peak, height=plan.height)
        except CutError as exc:
            raise VideoUnavailable(str(exc), code="thumbnail_failed") from None
        progress.add(THUMBNAIL_WEIGHT, f"{label}: thumbnail")
        clip_words = cap.words_between(segments, result.first_pts, result.first_pts + result.duration)
        files: dict[str, str] = {"clip": task.clip, "thumbnail": task.thumbnail}
        if clip_words and task.srt and task.vtt:
            cues = cap.build_cues(clip_words)
            (directory / task.srt).write_text(cap.srt(cues), encoding="utf-8")
            (directory / task.vtt).write_text(cap.webvtt(cues), encoding="utf-8")
            files.update(srt=task.srt, vtt=task.vtt)
        return {
            "index": task.index,
            "rank": task.rank,
            "start_time": round(result.first_pts, 3),
            "end_time": round(result.first_pts + result.duration, 3),
            "requested": [task.start, task.end],
            "peak_time": task.peak,
            "thumbnail_time": round(thumb_at, 3),
            "duration": round(result.duration, 3),
            "frames": result.frames,
            "method": result.method,
            "encoded_frames": result.encoded_frames,
            "words": len(clip_words),
            "files": files,
            "seconds": {"cut": round(cut_seconds, 3), "vertical": None},
            "_words": clip_words,
        }

    # Cuts run side by side: PyAV releases the GIL while decoding and encoding, and one cut alone
    # keeps about one core busy. The vertical versions then run one at a time (ffmpeg uses all).
    with ThreadPoolExecutor(max_workers=max(1, min(plan.parallel_cuts, len(plan.clips)))) as pool:
        results = list(pool.map(lambda pair: cut_one(*pair), enumerate(plan.clips, 1)))
    made = [(task, entry) for task, entry in zip(plan.clips, results, strict=True) if entry is not None]
    entries = [entry for _, entry in made]
    vertical_encoding = VideoEncoding(plan.codec, plan.vertical_preset, plan.crf)
    for n, (task, entry) in enumerate(made, 1):
        clip_words = entry.pop("_words")
        if task.vertical and plan.vertical is not None:
            started = time.monotonic()
            label = f"clip {n} of {len(plan.clips)}"
            _vertical(plan, task, clip_words, vertical_encoding, progress, label, entry["duration"])
            entry["seconds"]["vertical"] = round(time.monotonic() - started, 3)
            entry["files"]["vertical"] = task.vertical

    if made:  # an edit list needs at least one clip
        edit = timeline(
            [EditClip(t.rank, e["start_time"], e["end_time"], t.peak, t.name) for t, e in made],
            source_name=plan.source_name,
            source_url=plan.source_name,
            duration=source.duration or max((t.end for t in plan.clips), default=0.0),
            fps=source.fps,
        )
        write_all(edit, directory / plan.otio, directory / plan.edl, directory / plan.fcpxml)
    manifest = {
        "source": {**source.to_dict(), "file": plan.source_name},
        "encoder": {
            "codec": plan.codec,
            "preset": plan.preset,
            "vertical_preset": plan.vertical_preset,
            "crf": plan.crf,
        },
        "height": plan.height,
        "vertical": asdict(plan.vertical) if plan.vertical else None,
        "captions": {"srt": plan.captions_srt, "vtt": plan.captions_vtt} if words else None,
        "edit_lists": {"otio": plan.otio, "edl": plan.edl, "fcpxml": plan.fcpxml},
        "clips": entries,
    }
    (directory / plan.manifest).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    progress.report("done", force=True)
    return manifest


def _vertical(
    plan: Plan,
    task: ClipTask,
    clip_words: list[Any],
    encoding: Any,
    progress: _Progress,
    label: str,
    duration: float,
) -> None:
    from klipstream.clips import captions as cap
    from klipstream.clips.vertical import Box, Fill, Layout, ffmpeg_args

    assert plan.vertical is not None and task.vertical is not None
    directory = Path(plan.directory)
    layout = Layout(
        plan.vertical.width,
        plan.vertical.height,
        Fill(plan.vertical.fill),
        Box(**plan.vertical.facecam) if plan.vertical.facecam else None,
    )
    ass_name = None
    if plan.vertical.captions and clip_words:
        ass_name = f".{Path(task.vertical).stem}.ass"
        cues = cap.build_cues(clip_words, cap.VERTICAL)
        (directory / ass_name).write_text(cap.ass(cues, layout.width, layout.height), encoding="utf-8")
    width, height = _clip_size(directory / task.clip)
    args = ffmpeg_args(plan.ffmpeg, task.clip, task.vertical, layout, width, height, ass_name, encoding)
    weight = duration * VERTICAL_WEIGHT
    tail: deque[str] = deque(maxlen=20)
    try:
        proc = subprocess.Popen(
            args, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
    except FileNotFoundError:
        raise InternalError(
            f"{plan.ffmpeg} was not found; vertical clips need the ffmpeg program.",
            code="ffmpeg_missing",
            suggested_action="Install ffmpeg (Debian: apt-get install ffmpeg) or turn vertical clips off.",
        ) from None
    assert proc.stdout is not None and proc.stderr is not None
    done_seconds = 0.0
    for line in proc.stdout:
        if line.startswith("out_time_us="):
            try:
                done_seconds = max(0.0, int(line.split("=", 1)[1]) / 1e6)
            except ValueError:
                continue
            progress.report(
                f"{label}: vertical {done_seconds:.0f}/{duration:.0f} s",
                min(1.0, done_seconds / max(duration, 1e-3)) * weight,
            )
    tail.extend(proc.stderr.read().splitlines())
    code = proc.wait()
    if ass_name:
        (directory / ass_name).unlink(missing_ok=True)
    if code != 0:
        text = " | ".join(line for line in tail if line.strip())[-400:]
        if encoding.codec == "h264_nvenc":
            raise InternalError(
                f"The NVENC encoder could not be used: {text}",
                code="encoder_unavailable",
                suggested_action=_ENCODER_ACTION,
            )
        raise InternalError(f"ffmpeg failed on the vertical version (exit {code}): {text}", code="ffmpeg_failed")
    progress.add(weight, f"{label}: vertical")


def _clip_size(path: Path) -> tuple[int, int]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise InternalError("usage: python -m klipstream.clips.worker PLAN.json")
    # The runner stops this process group with SIGTERM; ffmpeg would take its time finishing the
    # file it writes, so the worker takes its whole group down at once instead.
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    plan = Plan.from_json(Path(argv[0]).read_text(encoding="utf-8"))
    warnings: list[str] = []
    try:
        manifest = run(plan, warnings)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
            raise InsufficientResources(f"Writing the clips failed: {exc}", code="clips_io") from None
        raise
    print(json.dumps({"result": {"clips": len(manifest["clips"]), "warnings": warnings}}), flush=True)


if __name__ == "__main__":
    child_main(main, sys.argv[1:])
