"""The 9:16 version of a clip: an ffmpeg filter graph, with captions burned in by libass.

The ffmpeg command line is used here (not PyAV) because the captions need libass, which Debian's
ffmpeg has and PyAV's bundled libraries do not. Input is the finished horizontal clip, so the
vertical version is frame-for-frame the same cut and caption times are clip-relative.

Layouts: `crop` scales the gameplay to cover the frame and keeps its centre; `blur` fits it to the
width between two bands of a blurred, zoomed copy of itself (blurred at 1/8 size, which is cheap and
looks the same, and only the bands are scaled back up). A facecam box (fractions of the source
frame) is cropped out and stacked above the gameplay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from klipstream.clips.encoding import VideoEncoding


class Fill(StrEnum):
    BLUR = "blur"  # gameplay fit to the width over a blurred copy of itself
    CROP = "crop"  # gameplay scaled to cover the frame, centre kept


@dataclass(frozen=True)
class Box:
    """A region of the source frame in fractions of its width and height."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Layout:
    width: int  # output frame
    height: int
    fill: Fill
    facecam: Box | None
    max_facecam_share: float = 0.4  # of the output height


def even(value: float) -> int:
    return max(2, round(value / 2) * 2)


def vertical_size(height: int) -> tuple[int, int]:
    """9:16 at `height` pixels, both sides even."""
    return even(height * 9 / 16), even(height)


BLUR_SCALE = 8  # the blurred fill is made at 1/8 of the output size, then scaled up


def _game(
    label_in: str, label_out: str, width: int, height: int, fill: Fill, source_w: int, source_h: int
) -> list[str]:
    """Gameplay (a source_w×source_h input) into a width×height area."""
    if fill is Fill.CROP:
        return [
            f"[{label_in}]scale={width}:{height}:force_original_aspect_ratio=increase,"
            f"crop={width}:{height},setsar=1[{label_out}]"
        ]
    return _blur_fill(label_in, label_out, width, height, source_w, source_h)


def _blur_fill(label_in: str, label_out: str, width: int, height: int, source_w: int, source_h: int) -> list[str]:
    """The gameplay fit inside the area, the bands beside it filled with a blurred, darkened copy.

    Costs were measured (docs/decisions.md, vertical versions): the copy is cropped to the area's
    aspect before it is shrunk (a third of the pixels of a 16:9 source to read), blurred at 1/8
    size, and only the two bands the gameplay does not cover are scaled back up (bilinear: the
    picture is a blur) and stacked with the gameplay; scaling the whole frame and overlaying the
    gameplay on it spent half its work on pixels nobody sees.
    """
    wide = source_w * height >= source_h * width  # gameplay spans the width, bands above and below
    if wide:
        fg_w, fg_h = width, min(height, even(width * source_h / max(1, source_w)))
    else:
        fg_w, fg_h = min(width, even(height * source_w / max(1, source_h))), height
    fg = f"scale={fg_w}:{fg_h},setsar=1"
    long_side = height if wide else width  # along the stacking axis
    bands = long_side - (fg_h if wide else fg_w)
    if bands <= 0:
        return [f"[{label_in}]{fg}[{label_out}]"]
    small_w, small_h = even(width / BLUR_SCALE), even(height / BLUR_SCALE)
    if source_w * small_h > source_h * small_w:  # centre crop to the area's aspect, then shrink
        crop_w, crop_h = min(source_w, even(source_h * small_w / small_h)), source_h
    else:
        crop_w, crop_h = source_w, min(source_h, even(source_w * small_h / small_w))
    first = bands // 2 // 2 * 2
    spans = [(0, first), (long_side - (bands - first), bands - first)]
    spans = [(start, size) for start, size in spans if size > 0]
    b = f"{label_out}_b"
    parts = [
        f"[{label_in}]split=2[{b}][{label_out}_f]",
        f"[{label_out}_f]{fg}[{label_out}_fg]",
        f"[{b}]crop={crop_w}:{crop_h},scale={small_w}:{small_h},gblur=sigma=4,eq=brightness=-0.08"
        + (f",split={len(spans)}" + "".join(f"[{b}{n}]" for n in range(len(spans))) if len(spans) > 1 else f"[{b}0]"),
    ]
    small_long = small_h if wide else small_w
    for n, (start, size) in enumerate(spans):
        parts.append(f"[{b}{n}]{_band(start, size, long_side, small_long, width if wide else height, wide)}[{b}{n}s]")
    inputs = [f"[{b}0s]", f"[{label_out}_fg]"] + ([f"[{b}1s]"] if len(spans) > 1 else [])
    if spans[0][0] != 0:  # only a band after the gameplay
        inputs = [f"[{label_out}_fg]", f"[{b}0s]"]
    stack = "vstack" if wide else "hstack"
    parts.append("".join(inputs) + f"{stack}=inputs={len(inputs)},setsar=1[{label_out}]")
    return parts


def _band(start: int, size: int, total: int, small_total: int, across: int, wide: bool) -> str:
    """Filters that turn the small blurred picture into output rows (or columns) [start, start+size).

    Only the strip of small rows that covers the band is scaled, to the size that keeps the whole
    picture's scale factor, then trimmed to the band; `across` is the band's other dimension.
    """
    factor = total / small_total
    lo = int(start / factor) // 2 * 2
    hi = max(lo + 2, min(small_total, math.ceil((start + size) / factor / 2) * 2))
    scaled = max(size, even((hi - lo) * factor))
    offset = min(max(0, round((start - lo * factor) / 2) * 2), scaled - size)
    if wide:
        return f"crop=iw:{hi - lo}:0:{lo},scale={across}:{scaled}:flags=bilinear,crop={across}:{size}:0:{offset}"
    return f"crop={hi - lo}:ih:{lo}:0,scale={scaled}:{across}:flags=bilinear,crop={size}:{across}:{offset}:0"


def filter_graph(layout: Layout, source_w: int, source_h: int, captions: str | None) -> str:
    """The graph from input 0's video to [out]. `captions`: an .ass file name in ffmpeg's cwd."""
    w, h = layout.width, layout.height
    parts: list[str] = []
    if layout.facecam is None:
        parts += _game("0:v", "v", w, h, layout.fill, source_w, source_h)
    else:
        box = layout.facecam
        cw, ch = even(box.width * source_w), even(box.height * source_h)
        cx, cy = int(box.x * source_w), int(box.y * source_h)
        cw, ch = min(cw, source_w - cx - (source_w - cx) % 2), min(ch, source_h - cy - (source_h - cy) % 2)
        cam_h = min(even(w * ch / max(1, cw)), even(h * layout.max_facecam_share))
        parts.append("[0:v]split=2[cam_in][game_in]")
        parts.append(
            f"[cam_in]crop={cw}:{ch}:{cx}:{cy},scale={w}:{cam_h}:force_original_aspect_ratio=increase,"
            f"crop={w}:{cam_h},setsar=1[cam]"
        )
        parts += _game("game_in", "game", w, h - cam_h, layout.fill, source_w, source_h)
        parts.append("[cam][game]vstack=inputs=2[v]")
    if captions:
        parts.append(f"[v]ass=filename={captions}[out]")
    else:
        parts.append("[v]null[out]")
    return ";".join(parts)


def ffmpeg_args(
    ffmpeg: str,
    clip_name: str,
    dest_name: str,
    layout: Layout,
    source_w: int,
    source_h: int,
    captions: str | None,
    encoding: VideoEncoding,
) -> list[str]:
    """The whole command; file names are relative to the clip directory (ffmpeg's cwd)."""
    return [
        ffmpeg,
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-nostats",
        "-progress",
        "pipe:1",
        "-y",
        "-i",
        clip_name,
        "-filter_complex",
        filter_graph(layout, source_w, source_h, captions),
        "-map",
        "[out]",
        "-map",
        "0:a?",
        *encoding.cli_args(),
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "copy",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        dest_name,
    ]
