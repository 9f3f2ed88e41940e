"""The highlights as an edit: subclips of the source video with a marker at each peak.

Written with OpenTimelineIO and its adapters (CMX 3600 EDL, Final Cut Pro 7 XML), which Premiere,
DaVinci Resolve, Final Cut, Kdenlive and Shotcut import; `.otio` is the native interchange file.
Times are whole frames of the source's frame rate, as editors count them.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import opentimelineio as otio


@dataclass(frozen=True)
class EditClip:
    rank: int
    start: float  # VOD seconds
    end: float
    peak: float
    name: str


def edl_rate(fps: Fraction) -> float:
    """The source's rate as a timecode rate (30000/1001 stays exact); odd rates snap to the nearest."""
    rate = float(fps)
    if otio.opentime.RationalTime.is_valid_timecode_rate(rate):
        return rate
    return float(otio.opentime.RationalTime.nearest_valid_timecode_rate(rate))


def timeline(
    clips: list[EditClip], *, source_name: str, source_url: str, duration: float, fps: Fraction
) -> otio.schema.Timeline:
    rate = edl_rate(fps)

    def frames(seconds: float) -> otio.opentime.RationalTime:
        return otio.opentime.RationalTime(round(seconds * rate), rate)

    media = otio.opentime.TimeRange(frames(0.0), frames(duration))
    track = otio.schema.Track(name="Highlights", kind=otio.schema.TrackKind.Video)
    for clip in sorted(clips, key=lambda c: c.start):
        reference = otio.schema.ExternalReference(target_url=source_url, available_range=media)
        reference.name = source_name
        source_range = otio.opentime.TimeRange(frames(clip.start), frames(clip.end) - frames(clip.start))
        item = otio.schema.Clip(name=clip.name, media_reference=reference, source_range=source_range)
        item.metadata["klipstream"] = {"rank": clip.rank, "peak_time": clip.peak}
        peak = otio.schema.Marker(
            name=f"Peak of highlight {clip.rank}",
            marked_range=otio.opentime.TimeRange(frames(clip.peak), otio.opentime.RationalTime(1, rate)),
            color=otio.schema.MarkerColor.RED,
        )
        item.markers.append(peak)
        track.append(item)
    edit = otio.schema.Timeline(name=f"{source_name} highlights", tracks=[track])
    edit.global_start_time = otio.opentime.RationalTime(0, rate)
    return edit


def write_all(edit: otio.schema.Timeline, otio_path: Path, edl_path: Path, fcp_path: Path) -> None:
    otio.adapters.write_to_file(edit, str(otio_path), adapter_name="otio_json")
    otio.adapters.write_to_file(edit, str(edl_path), adapter_name="cmx_3600", style="avid")
    otio.adapters.write_to_file(edit, str(fcp_path), adapter_name="fcp_xml")
