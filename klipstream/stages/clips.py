"""Stage `clips` (opt-in with `options.clips`): per highlight a clip, thumbnail and captions, a
vertical version on request, and the edit lists editors import.

The work runs in a child process (klipstream.clips.worker, through klipstream.proc.run_python)
that the stage feeds a plan and kills on cancel or timeout, with everything it started; this
coroutine only plans, relays progress and warnings and records the files. A job whose source
has no video (audio-only) ends this stage `unavailable` with a warning; the rest of the job is
unaffected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klipstream.artifacts import per_highlight_key, spec
from klipstream.clips.encoding import choose
from klipstream.clips.vertical import vertical_size
from klipstream.clips.worker import ClipTask, Plan, VerticalPlan
from klipstream.errors import InternalError, StageUnavailable
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import ClipOptions, DisplayStage, JobOptions
from klipstream.proc import run_python

MIN_CLIP_SECONDS = 0.1
_FIXED_OUTPUTS = {
    "clips_json": "manifest",
    "edit_otio": "otio",
    "edit_edl": "edl",
    "edit_fcpxml": "fcpxml",
    "captions_srt": "captions_srt",
    "captions_vtt": "captions_vtt",
}


def wanted(options: JobOptions) -> bool:
    return options.clip_options is not None


def numbered(highlights: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(artifact number, highlight): the rank when ranks are distinct 1-999, else the position."""
    ranks = [h.get("rank") for h in highlights]
    if all(isinstance(r, int) and 1 <= r <= 999 for r in ranks) and len(set(ranks)) == len(ranks):
        return [(int(h["rank"]), h) for h in highlights]
    return list(enumerate(highlights, 1))


def spans(
    highlights: list[dict[str, Any]], duration: float | None
) -> tuple[list[tuple[int, dict[str, Any], float, float, float]], list[str]]:
    """(n, highlight, start, end, peak) per usable highlight, clamped to the video; and warnings."""
    out, warnings = [], []
    for n, h in numbered(highlights):
        try:
            start, end = float(h["start_time"]), float(h["end_time"])
        except (KeyError, TypeError, ValueError):
            warnings.append(f"Highlight {n} has no usable start_time/end_time; no clip was cut for it.")
            continue
        start = max(0.0, start)
        if duration is not None:
            end = min(end, duration)
        if end - start < MIN_CLIP_SECONDS:
            warnings.append(f"Highlight {n} lies outside the video ({start:.1f}-{end:.1f} s); no clip was cut for it.")
            continue
        try:
            peak = float(h.get("peak_time", (start + end) / 2))
        except (TypeError, ValueError):
            peak = (start + end) / 2
        out.append((n, h, start, end, min(max(peak, start), end)))
    return out, warnings


def _name(n: int, h: dict[str, Any]) -> str:
    reason = " ".join(str(h.get("reason") or h.get("category") or "").split())
    return f"Highlight {n}" + (f": {reason}" if reason else "")[:100]


def build_plan(ctx: StageContext, options: ClipOptions, video: Path, highlights: list[dict[str, Any]]) -> Plan:
    settings = ctx.settings
    encoding = choose(settings.clip_encoder, settings.clip_preset, settings.clip_crf)
    duration = ctx.video.duration_seconds if ctx.video else None
    usable, warnings = spans(highlights, duration)
    for warning in warnings:
        ctx.warn(warning)
    transcript = ctx.optional_input("transcript_json")
    vertical = None
    if options.vertical:
        width, height = vertical_size(options.vertical_height or settings.vertical_height)
        vertical = VerticalPlan(
            width=width,
            height=height,
            fill=options.fill.value,
            facecam=options.facecam.model_dump() if options.facecam else None,
            captions=options.captions,
        )

    def name(family: str, n: int) -> str:
        return ctx.output_path(per_highlight_key(family, n)).name

    tasks = [
        ClipTask(
            index=n,
            rank=int(h.get("rank") or n),
            start=start,
            end=end,
            peak=peak,
            name=_name(n, h),
            clip=name("clip", n),
            thumbnail=name("thumbnail", n),
            vertical=name("vertical", n) if vertical else None,
            srt=name("clip_srt", n) if transcript else None,
            vtt=name("clip_vtt", n) if transcript else None,
        )
        for n, h, start, end, peak in usable
    ]
    return Plan(
        video=str(video),
        directory=str(ctx.workdir),
        height=options.height or settings.clip_height,
        codec=encoding.codec,
        preset=encoding.preset,
        vertical_preset=settings.vertical_preset,
        parallel_cuts=settings.cpu_concurrency,
        crf=encoding.crf,
        manifest=ctx.output_path("clips_json").name,
        otio=ctx.output_path("edit_otio").name,
        edl=ctx.output_path("edit_edl").name,
        fcpxml=ctx.output_path("edit_fcpxml").name,
        source_name=spec("video").filename(ctx.video_id, video.suffix.lstrip(".") or None),
        captions_srt=ctx.output_path("captions_srt").name if transcript else None,
        captions_vtt=ctx.output_path("captions_vtt").name if transcript else None,
        transcript=str(transcript) if transcript else None,
        vertical=vertical,
        ffmpeg=settings.ffmpeg_path,
        clips=tasks,
    )


def _read_highlights(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    items = doc.get("highlights") if isinstance(doc, dict) else doc
    return [h for h in items or [] if isinstance(h, dict)]


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


async def run(ctx: StageContext) -> None:
    options = ctx.options.clip_options
    if options is None:  # the runner skips the stage then; kept for direct calls
        return
    video = ctx.optional_input("video")
    if video is None:
        raise StageUnavailable("no clips were made because the source has no video (audio only)")
    highlights = await ctx.to_thread(_read_highlights, ctx.input("highlights_json"))
    plan = build_plan(ctx, options, video, highlights)
    if not plan.clips:
        ctx.warn("no clips were made because no highlight was found to cut")
        ctx.progress(1.0, "no highlights to cut")
        return
    plan_path = ctx.workdir / f".{ctx.video_id}_clips_plan.json"
    await ctx.to_thread(_write, plan_path, plan.to_json())
    ctx.progress(0.0, f"cutting {len(plan.clips)} clip{'' if len(plan.clips) == 1 else 's'}")
    try:
        await _run_worker(ctx, plan_path)
    finally:
        plan_path.unlink(missing_ok=True)
    manifest = await ctx.to_thread(_read_manifest, ctx.workdir / plan.manifest)
    _record(ctx, plan, manifest)
    count = len(manifest.get("clips") or [])
    ctx.progress(1.0, f"{count} clip{'' if count == 1 else 's'}" + (" with vertical versions" if plan.vertical else ""))


async def _run_worker(ctx: StageContext, plan_path: Path) -> None:
    result = await run_python(
        "klipstream.clips.worker",
        [str(plan_path)],
        timeout=ctx.settings.stage_timeout_seconds,
        on_progress=ctx.progress,
    )
    for warning in result.get("warnings") or []:
        ctx.warn(str(warning))


def _read_manifest(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise InternalError("The clips manifest is not a JSON object.")
    return data


def _record(ctx: StageContext, plan: Plan, manifest: dict[str, Any]) -> None:
    for key, attr in _FIXED_OUTPUTS.items():
        name = getattr(plan, attr)
        if name and (ctx.workdir / name).is_file():
            ctx.add_artifact(key, ctx.workdir / name)
    families = {"clip": "clip", "thumbnail": "thumbnail", "vertical": "vertical", "srt": "clip_srt", "vtt": "clip_vtt"}
    for entry in manifest.get("clips") or []:
        for field_name, filename in (entry.get("files") or {}).items():
            family = families.get(field_name)
            if family is not None:
                ctx.add_artifact(per_highlight_key(family, int(entry["index"])), ctx.workdir / filename)


CLIPS = Stage(
    name="clips",
    display=DisplayStage.FINDING_HIGHLIGHTS,  # the status strings Convex knows; the stage name says "clips"
    run=run,
    needs=("highlights_json",),
    uses=("video", "transcript_json"),
    provides=tuple(_FIXED_OUTPUTS),
    weight=1.0,
    resource=Resource.CPU,
    wanted=wanted,
)
