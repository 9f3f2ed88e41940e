"""Benchmark: the transcription stage against a bare faster-whisper run of the same audio.

    python bench/bench_transcribe.py            # 10-minute file: stage vs bare, real-time factor
    python bench/bench_transcribe.py --hours 1  # also a 1 h file: peak worker memory (takes a while)

Audio: the speech fixture (tests/fixtures/speech/speech.ogg, ~31 s of espeak-ng speech with
pauses) looped with 3 s of silence after each copy, cut to the wanted length, as the 16 kHz s16le
PCM the audio stage produces. Both runs use the bundled tiny.en, the same device and compute
type (auto: int8 on this CPU), the same number of CPU threads (all cores; one worker) and the
same decoding options (beam 5, word timestamps, faster-whisper's VAD). The bare run is
`WhisperModel.transcribe(vad_filter=True, word_timestamps=True)` in this process with the model
already loaded; the stage run goes through a warm pool (workers started and model loaded before
timing, as in a running server), so both figures exclude model loading. Runs alternate and the
best of each is compared, which keeps noise from other load on the machine out of the ratio.
Peak worker memory is the worker process's VmHWM (peak resident set) from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from klipstream.config import Settings  # noqa: E402
from klipstream.jobs.stage import ProgressSink, StageContext  # noqa: E402
from klipstream.models import Job, JobOptions, VideoInfo  # noqa: E402
from klipstream.stages.transcribe import TRANSCRIBE  # noqa: E402
from klipstream.transcription.pool import Transcriber  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "speech" / "speech.ogg"
RATE = 16000


class NullSink(ProgressSink):
    def stage_progress(self, stage: str, fraction: float, detail: str | None) -> None:
        pass

    def warn(self, stage: str, message: str) -> None:
        pass

    def set_video(self, info: VideoInfo) -> None:
        pass

    def set_highlights(self, highlights: list[dict[str, Any]]) -> None:
        pass


def fixture_samples() -> np.ndarray:
    import av

    container = av.open(str(FIXTURE))
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    parts = []
    for frame in container.decode(audio=0):
        parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(parts).astype("<i2")


def make_pcm(path: Path, seconds: float) -> Path:
    """Loop the fixture plus 3 s of silence, written piecewise so an hour never sits in memory."""
    unit = np.concatenate([fixture_samples(), np.zeros(3 * RATE, dtype="<i2")])
    remaining = int(seconds * RATE)
    with path.open("wb") as out:
        while remaining > 0:
            piece = unit[:remaining]
            out.write(piece.tobytes())
            remaining -= piece.size
    return path


def fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_run(model: Any, pcm: Path) -> tuple[float, float, int]:
    audio = np.fromfile(pcm, dtype="<i2").astype(np.float32) / 32768.0
    start, cpu = time.perf_counter(), cpu_seconds(os.getpid())
    segments, _ = model.transcribe(audio, vad_filter=True, word_timestamps=True)
    words = sum(len(s.words or ()) for s in segments)
    return time.perf_counter() - start, cpu_seconds(os.getpid()) - cpu, words


async def stage_run(transcriber: Transcriber, settings: Settings, pcm: Path, workdir: Path) -> tuple[float, float, int]:
    fresh_dir(workdir)
    job = Job(job_id="bench", video_id="bench", url="https://example.com/bench.mp4", options=JobOptions())
    ctx = StageContext(
        job=job,
        stage=TRANSCRIBE,
        workdir=workdir,
        settings=settings,
        http=None,  # type: ignore[arg-type]  # the stage makes no HTTP calls
        inputs={"pcm": pcm},
        sink=NullSink(),
        transcriber=transcriber,
    )
    pids = [os.getpid(), *transcriber.pids()]
    start, cpu = time.perf_counter(), sum(cpu_seconds(p) for p in pids)
    await TRANSCRIBE.run(ctx)
    elapsed = time.perf_counter() - start
    if sorted(pids[1:]) != sorted(transcriber.pids()):
        raise RuntimeError("a worker was replaced during the run; its CPU time is lost")
    used = sum(cpu_seconds(p) for p in pids) - cpu
    words = sum(1 for _ in ctx.outputs["words_csv"].open()) - 1
    return elapsed, used, words


async def warm(transcriber: Transcriber) -> None:
    await transcriber.start()
    async with asyncio.timeout(300):
        while transcriber.stats()["ready"] < transcriber.size:  # noqa: ASYNC110 - workers are other processes
            await asyncio.sleep(0.05)


async def compare(tmp: Path, seconds: float, rounds: int) -> list[tuple[str, str]]:
    from faster_whisper import WhisperModel

    from klipstream.transcription.worker import resolve_model

    pcm = make_pcm(tmp / "ten.pcm", seconds)
    settings = Settings.from_env({}, data_dir=tmp, transcribe_workers=1)
    transcriber = Transcriber(settings)
    cold_start = time.perf_counter()
    await warm(transcriber)
    cold = time.perf_counter() - cold_start
    model = WhisperModel(resolve_model("")[0], device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 1)
    bare_times, stage_times, bare_cpus, stage_cpus = [], [], [], []
    try:
        for i in range(rounds):
            bare, bare_cpu, bare_words = bare_run(model, pcm)
            stage, stage_cpu, stage_words = await stage_run(transcriber, settings, pcm, tmp / f"job{i}")
            bare_times.append(bare)
            stage_times.append(stage)
            bare_cpus.append(bare_cpu)
            stage_cpus.append(stage_cpu)
            print(
                f"round {i + 1}: bare {bare:.1f} s wall / {bare_cpu:.1f} s CPU ({bare_words} words), "
                f"stage {stage:.1f} s wall / {stage_cpu:.1f} s CPU ({stage_words} words)"
            )
        worker_peak = max(peak_rss_mb(pid) for pid in transcriber.pids())
    finally:
        await transcriber.close()
    best_bare, best_stage = min(bare_times), min(stage_times)
    return [
        ("audio", f"{seconds / 60:.0f} min (fixture looped with 3 s silences)"),
        (
            "bare faster-whisper, best of " + str(rounds),
            f"{best_bare:.1f} s (median {statistics.median(bare_times):.1f})",
        ),
        (
            "transcribe stage, best of " + str(rounds),
            f"{best_stage:.1f} s (median {statistics.median(stage_times):.1f})",
        ),
        ("stage / bare, wall time", f"{best_stage / best_bare:.3f} (limit 1.05)"),
        ("stage / bare, CPU time (server + worker vs bare)", f"{min(stage_cpus) / min(bare_cpus):.3f}"),
        ("real-time factor (stage, tiny.en int8, 1 worker)", f"{best_stage / seconds:.3f}"),
        ("pool cold start (spawn + model load)", f"{cold:.1f} s"),
        ("peak worker RSS", f"{worker_peak:.0f} MB"),
    ]


async def hour(tmp: Path, hours: float) -> list[tuple[str, str]]:
    seconds = hours * 3600
    pcm = make_pcm(tmp / "hour.pcm", seconds)
    settings = Settings.from_env({}, data_dir=tmp, transcribe_workers=1)
    transcriber = Transcriber(settings)
    try:
        await warm(transcriber)
        elapsed, words = await stage_run(transcriber, settings, pcm, tmp / "hourjob")
        worker_peak = max(peak_rss_mb(pid) for pid in transcriber.pids())
    finally:
        await transcriber.close()
    server_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [
        ("long audio", f"{hours:g} h, {words} words"),
        ("long run wall time", f"{elapsed:.0f} s (real-time factor {elapsed / seconds:.3f})"),
        ("peak worker RSS, long run", f"{worker_peak:.0f} MB (limit 1024)"),
        ("peak bench (server-side) process RSS", f"{server_peak:.0f} MB"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hours", type=float, default=0.0, help="also run a long file to measure worker memory")
    parser.add_argument("--skip-compare", action="store_true")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_compare:
            rows += asyncio.run(compare(Path(tmp), args.minutes * 60, args.rounds))
        if args.hours > 0:
            rows += asyncio.run(hour(Path(tmp), args.hours))
    print("\n| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
