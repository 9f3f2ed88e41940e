"""Plain faster-whisper on 16 kHz s16le PCM files: the baseline the transcription stage must match.

    python -m tests.fw_baseline FILE.pcm ...   ->  {"FILE.pcm": {"plain": text, "vad": text}, ...}

A separate process so the test process never loads the model (the service's own server-side
modules must not either). faster-whisper's defaults (beam 5, no word timestamps), with and
without its VAD, the bundled tiny.en, int8 on CPU: what a user would get from the library alone.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from faster_whisper import WhisperModel

from klipstream.transcription.worker import resolve_model


def baseline_texts(paths: list[str]) -> dict[str, dict[str, str]]:
    """{path: {"plain": text, "vad": text}}."""
    model = WhisperModel(resolve_model("")[0], device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 1)
    out: dict[str, dict[str, str]] = {}
    for path in paths:
        audio = np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0
        out[path] = {
            label: " ".join(s.text.strip() for s in model.transcribe(audio, vad_filter=vad)[0])
            for label, vad in (("plain", False), ("vad", True))
        }
    return out


if __name__ == "__main__":
    json.dump(baseline_texts(sys.argv[1:]), sys.stdout)
