"""Transcription accuracy on real recordings, against plain faster-whisper in the same run.

The stage (VAD, chunks, worker pool, word alignment) must be at least as accurate as the better of
faster-whisper with and without its VAD, same bundled model, same PCM, scored with Whisper's
English text normaliser. The recordings (tests/fixtures/speech/real/SOURCES.md: licences and
attribution) are human speech with human transcripts: read speech, spontaneous meeting speech, an
old broadcast, and 220 s of read speech without a pause long enough for the VAD to cut at, which
the stage must split inside speech (its 120 s chunks) without losing a word at the cut.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from klipstream.config import Settings
from klipstream.transcript import Transcript
from klipstream.transcription.pool import Transcriber
from tests.test_transcription import decode_to_pcm

REAL = Path(__file__).parent / "fixtures" / "speech" / "real"
REPO = Path(__file__).resolve().parent.parent
NAMES = sorted(p.stem for p in REAL.glob("*.ogg"))
CONTINUOUS = "read_ljspeech_lj001_rapid"  # 220 s, no pause of 2 s: cut inside speech at least once

normalize = EnglishTextNormalizer()


@pytest.fixture(scope="module")
def pcms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("real-speech")
    return {name: decode_to_pcm(REAL / f"{name}.ogg", tmp / f"{name}.pcm") for name in NAMES}


@pytest.fixture(scope="module")
def baselines(pcms: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{"plain" | "vad": {name: text}} from faster-whisper itself, in a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.fw_baseline", *map(str, pcms.values())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    by_path = json.loads(result.stdout)
    return {label: {name: by_path[str(path)][label] for name, path in pcms.items()} for label in ("plain", "vad")}


def pooled_wer(hypotheses: dict[str, str]) -> float:
    references = [normalize((REAL / f"{name}.txt").read_text()) for name in NAMES]
    return jiwer.wer(references, [normalize(hypotheses[name]) for name in NAMES])


async def test_stage_is_as_accurate_as_faster_whisper_on_real_speech(
    tmp_path: Path, pcms: dict[str, Path], baselines: dict[str, dict[str, str]]
) -> None:
    # The service's defaults: one worker, 120 s chunks, sequential decoder on CPU.
    transcriber = Transcriber(Settings.from_env({}, data_dir=tmp_path))
    try:
        transcripts: dict[str, Transcript] = {name: await transcriber.transcribe(pcm) for name, pcm in pcms.items()}
    finally:
        await transcriber.close()
    stage = pooled_wer({name: " ".join(s.text for s in t.segments) for name, t in transcripts.items()})
    words = pooled_wer({name: "".join(w.word for s in t.segments for w in s.words) for name, t in transcripts.items()})
    plain, vad = pooled_wer(baselines["plain"]), pooled_wer(baselines["vad"])
    report = f"stage {stage:.4f}, its words {words:.4f}, faster-whisper {plain:.4f}, with VAD {vad:.4f}"
    assert stage <= min(plain, vad), report
    assert words <= min(plain, vad), report  # the word track says what the text says

    for name, transcript in transcripts.items():
        times = [(w.start, w.end) for s in transcript.segments for w in s.words]
        assert times, name
        assert all(start <= end for start, end in times), name
        # In time order and never overlapping, across Whisper windows and chunk cuts.
        assert all(a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(times)), name
        for segment in transcript.segments:
            assert all(segment.start - 1e-6 <= w.start and w.end <= segment.end + 1e-6 for w in segment.words)

    # The continuous recording is cut inside speech; no stretch of it lost words at the cut.
    times = [w.start for s in transcripts[CONTINUOUS].segments for w in s.words]
    assert times[-1] > 215.0
    assert max(b - a for a, b in itertools.pairwise(times)) < 2.0
