"""Which H.264 encoder the clips use, and its options for PyAV and for the ffmpeg command line.

`KLIPSTREAM_CLIP_ENCODER=auto` picks NVENC when the machine has an NVIDIA device and the encoder
exists in the library, libx264 otherwise; `libx264` and `h264_nvenc` force one. The same settings
drive both PyAV (clips) and the ffmpeg CLI (vertical versions), so the GPU path is one switch.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Encoder(StrEnum):
    AUTO = "auto"  # NVENC when a GPU is present, else libx264
    X264 = "libx264"  # CPU; the path CI tests
    NVENC = "h264_nvenc"  # NVIDIA GPU


@dataclass(frozen=True)
class VideoEncoding:
    codec: str  # "libx264" or "h264_nvenc"
    preset: str  # x264 preset; NVENC maps it to p1..p7
    crf: int  # x264 CRF; NVENC's constant-quality target (-cq)

    @property
    def can_smart_cut(self) -> bool:
        """Copying GOPs needs our parameter sets renumbered, which only x264 can do."""
        return self.codec == Encoder.X264

    def options(self, *, full: bool) -> Mapping[str, str]:
        """PyAV codec options. `full`: a whole clip rather than an edge run of a smart cut.

        Edge runs are a second or two between copied GOPs: they use at most `superfast` (the
        edges would otherwise cost more than the whole copy) and a CRF 2 lower to keep the quality
        of the frames next to them.
        """
        if self.codec == Encoder.NVENC:
            return {"preset": _NVENC_PRESETS.get(self.preset, "p4"), "rc": "vbr", "cq": str(self.crf), "b": "0"}
        if full:
            return {"preset": self.preset, "crf": str(self.crf)}
        return {"preset": faster(self.preset, EDGE_PRESET), "crf": str(max(0, self.crf - 2))}

    def cli_args(self) -> list[str]:
        """The same encoder for the ffmpeg command line."""
        if self.codec == Encoder.NVENC:
            return ["-c:v", "h264_nvenc", "-preset", _NVENC_PRESETS.get(self.preset, "p4"), "-rc", "vbr",
                    "-cq", str(self.crf), "-b:v", "0"]  # fmt: skip
        return ["-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf)]


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
EDGE_PRESET = "superfast"


def faster(a: str, b: str) -> str:
    """The faster of two x264 presets."""
    return min(a, b, key=lambda p: X264_PRESETS.index(p) if p in X264_PRESETS else len(X264_PRESETS))


# x264 preset -> the NVENC preset of about the same speed/quality trade.
_NVENC_PRESETS = {
    "ultrafast": "p1",
    "superfast": "p2",
    "veryfast": "p3",
    "faster": "p4",
    "fast": "p4",
    "medium": "p5",
    "slow": "p6",
    "slower": "p7",
    "veryslow": "p7",
}


def gpu_present(environ: Mapping[str, str] | None = None) -> bool:
    """An NVIDIA device node exists and is not hidden from this process."""
    env = os.environ if environ is None else environ
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if os.path.exists("/dev/nvidia0"):
        return True
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidiactl")


def choose(encoder: str, preset: str, crf: int, *, gpu: bool | None = None) -> VideoEncoding:
    """Resolve `auto` once per job, so PyAV and the CLI use the same encoder."""
    codec = encoder
    if encoder == Encoder.AUTO:
        codec = Encoder.NVENC if (gpu_present() if gpu is None else gpu) else Encoder.X264
    return VideoEncoding(codec=str(codec), preset=preset, crf=crf)
