"""The 9:16 version of a clip: an ffmpeg filter graph, with captions burned in by libass.

The ffmpeg command line is used here (not PyAV) because the captions need libass, which Debian's
ffmpeg has and PyAV's bundled libraries do not. Input is the finished horizontal clip, so the
vertical version is frame-for-frame the same cut and caption times are clip-relative.

Layouts: `crop` scales the gameplay to cover the frame and keeps its centre; `blur` fits it to the
width over a blurred, zoomed copy of itself (blurred at 1/8 size, which is cheap and looks the
same). A facecam box (fractions of the source frame) is cropped out and stacked above the gameplay.
"""

from __future__ import annotations

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


def _game(label_in: str, label_out: str, width: int, height: int, fill: Fill) -> list[str]:
    """Gameplay into a width×height area."""
    if fill is Fill.CROP:
        return [
            f"[{label_in}]scale={width}:{height}:force_original_aspect_ratio=increase,"
            f"crop={width}:{height},setsar=1[{label_out}]"
        ]
    small_w, small_h = even(width / 8), even(height / 8)
    return [
        f"[{label_in}]split=2[{label_out}_b][{label_out}_f]",
        f"[{label_out}_b]scale={small_w}:{small_h}:force_original_aspect_ratio=increase,crop={small_w}:{small_h},"
        f"gblur=sigma=4,eq=brightness=-0.08,scale={width}:{height},setsar=1[{label_out}_bg]",
        f"[{label_out}_f]scale={width}:{height}:force_original_aspect_ratio=decrease,setsar=1[{label_out}_fg]",
        f"[{label_out}_bg][{label_out}_fg]overlay=(W-w)/2:(H-h)/2[{label_out}]",
    ]


def filter_graph(layout: Layout, source_w: int, source_h: int, captions: str | None) -> str:
    """The graph from input 0's video to [out]. `captions`: an .ass file name in ffmpeg's cwd."""
    w, h = layout.width, layout.height
    parts: list[str] = []
    if layout.facecam is None:
        parts += _game("0:v", "v", w, h, layout.fill)
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
        parts += _game("game_in", "game", w, h - cam_h, layout.fill)
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
