"""Benchmark: a whole job on a 10-minute fixture against bare faster-whisper on the same audio.

    python bench/bench_job.py                 # 10 minutes, 2 rounds, best of each
    python bench/bench_job.py --rounds 3 --minutes 5

Issue 5's target: the whole job's wall time is at most 1.25x the bare transcription time of the
same audio measured in the same run, i.e. everything besides transcription overlaps with it or
is negligible.

Inputs (built once, then reused from CACHE):
- media: the speech fixture looped with 3 s silences (bench_transcribe.make_pcm), encoded as a
  48 kHz stereo AAC .m4a, the shape of a Twitch audio-only rendition, so the audio stage does a
  realistic decode and resample;
- chat: a TwitchDownloader-style JSON archive from tests.synthetic (a few thousand
  messages with planted surges, emote spam and bot bursts);
- the 16 kHz PCM of that media, produced by klipstream.acquisition.audio_pass.run_audio_pass, i.e. exactly the
  samples the job's audio stage hands to transcription.

Bare run: `WhisperModel.transcribe(vad_filter=True, word_timestamps=True)` (bench_transcribe.bare_run)
on that PCM, with the bundled tiny.en loaded beforehand, int8 on CPU, the CPU threads one pool
worker gets (cores / KLIPSTREAM_TRANSCRIBE_WORKERS), beam 5 as the worker uses.

Whole job: klipstream.cli.local.analyze with Settings.from_env(), i.e. the real queue, runner and
stages (download of a local file, chat from a local file, audio pass, transcription in the worker
pool, chat analysis, transcript analysis, highlights). Two figures: the job's own wall time
(started_at -> finished_at in the job JSON, which includes the pool's cold start because the pool
starts on first use) and the whole `analyze` call (adds runtime start-up/shut-down and moving the
artifacts). Runs alternate order each round and the best of each is compared, which keeps noise
from other load on this shared machine out of the ratio; the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_transcribe import RATE, bare_run, make_pcm, warm  # noqa: E402

from klipstream.config import Settings  # noqa: E402
from klipstream.models import Job, JobOptions, JobStatus, SubmitRequest  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "klipstream-bench-job"
MEDIA_RATE = 48_000  # Twitch audio renditions are 48 kHz stereo AAC
MEDIA_BIT_RATE = 128_000
CHAT_RATE = 5.0  # background messages per second: ~3,000 in 10 minutes before surges and bursts
CHAT_SEED = 5
TARGET = 1.25


@dataclass(frozen=True)
class Fixture:
    seconds: float
    media: Path
    chat: Path
    pcm: Path  # what the audio stage produces from `media`
    messages: int


@dataclass(frozen=True)
class JobRun:
    job_seconds: float  # started_at -> finished_at of the job
    call_seconds: float  # the whole analyze() call
    job: Job
    files: dict[str, Path]  # artifact key -> file in the output directory
    cpu_seconds: float  # this process + its reaped children (the pool workers) during the call


# --- inputs ---------------------------------------------------------------------------------


def encode_m4a(pcm: Path, target: Path) -> None:
    """16 kHz mono s16 PCM -> 48 kHz stereo AAC in an .m4a, written to a temporary name first."""
    import av

    partial = target.with_suffix(".part.m4a")
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=MEDIA_RATE)
    with av.open(str(partial), "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=MEDIA_RATE, layout="stereo")
        stream.bit_rate = MEDIA_BIT_RATE
        samples = np.memmap(pcm, dtype="<i2", mode="r")
        pts = 0
        for start in range(0, samples.size, RATE):  # one second at a time
            block = np.ascontiguousarray(samples[start : start + RATE]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate = RATE
            frame.pts = pts
            pts += block.shape[1]
            for resampled in resampler.resample(frame):
                out.mux(stream.encode(resampled))
        for resampled in resampler.resample(None):
            out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))
        del samples
    partial.rename(target)


def decode_like_audio_stage(media: Path, directory: Path) -> Path:
    """The PCM the job's audio stage would hand to transcription (the same function, same file)."""
    import threading

    from klipstream.acquisition.audio_pass import AudioPassOutputs, playback_format, run_audio_pass

    fmt = playback_format()
    outputs = AudioPassOutputs(
        pcm=directory / "stage.pcm.part",
        audio=directory / f"stage_playback.{fmt.ext}",
        waveform=directory / "stage_waveform.json",
        features=directory / "stage_features.npz",
    )
    run_audio_pass(media, outputs, cancelled=threading.Event(), playback=fmt)
    for extra in (outputs.audio, outputs.waveform, outputs.features):
        extra.unlink(missing_ok=True)
    pcm = directory / "stage.pcm"
    outputs.pcm.rename(pcm)
    return pcm


def build_fixture(minutes: float) -> Fixture:
    from tests.synthetic import generate

    seconds = minutes * 60
    directory = CACHE / f"{minutes:g}min"
    directory.mkdir(parents=True, exist_ok=True)
    media = directory / "speech.m4a"
    if not media.exists():
        source = make_pcm(directory / "source.pcm", seconds)
        encode_m4a(source, media)
        source.unlink()
    chat = directory / "chat.json"
    if not chat.exists():
        doc = generate(CHAT_SEED, seconds, chat_rate=CHAT_RATE).chat
        partial = chat.with_suffix(".part")
        partial.write_text(json.dumps(doc), encoding="utf-8")
        partial.rename(chat)
    pcm = directory / "stage.pcm"
    if not pcm.exists():
        pcm = decode_like_audio_stage(media, directory)
    messages = len(json.loads(chat.read_text(encoding="utf-8"))["comments"])
    return Fixture(seconds, media, chat, pcm, messages)


# --- the two runs ---------------------------------------------------------------------------


def bare_model(settings: Settings) -> Any:
    from faster_whisper import WhisperModel

    from klipstream.transcription.worker import resolve_model

    threads = max(1, (os.cpu_count() or 1) // settings.transcribe_workers)  # what each pool worker gets
    return WhisperModel(
        resolve_model(settings.whisper_model)[0], device="cpu", compute_type=compute_type(settings), cpu_threads=threads
    )


def compute_type(settings: Settings) -> str:
    """What a CPU worker resolves `auto` to (klipstream.transcription.worker.Engine)."""
    return "int8" if settings.whisper_compute_type == "auto" else settings.whisper_compute_type


def process_tree_cpu() -> float:
    """User + system CPU of this process and of its children that have exited and been waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def job_run(settings: Settings, fixture: Fixture, out_dir: Path) -> JobRun:
    from klipstream.cli.local import analyze

    request = SubmitRequest(url=str(fixture.media), chat_url=str(fixture.chat), options=JobOptions(force=True))
    start, cpu = time.perf_counter(), process_tree_cpu()
    result = await analyze(settings, request, out_dir, stop=asyncio.Event())
    call, cpu = time.perf_counter() - start, process_tree_cpu() - cpu
    job = result.job
    if job.status != JobStatus.COMPLETED:
        detail = job.error.message if job.error else "no error recorded"
        raise RuntimeError(f"the job ended {job.status.value}: {detail}")
    assert job.started_at is not None and job.finished_at is not None
    return JobRun((job.finished_at - job.started_at).total_seconds(), call, job, result.files, cpu)


async def pool_cold_start(settings: Settings) -> float:
    """Spawn + model load of the transcription pool, which the job pays because the pool starts on first use."""
    from klipstream.transcription.pool import Transcriber

    transcriber = Transcriber(settings)
    start = time.perf_counter()
    try:
        await warm(transcriber)
        return time.perf_counter() - start
    finally:
        await transcriber.close()


def stage_wall(job: Job, name: str) -> float:
    state = job.stage(name)
    assert state.started_at is not None and state.finished_at is not None
    return (state.finished_at - state.started_at).total_seconds()


def timeline(job: Job) -> list[tuple[str, str, str, str, str]]:
    """Per stage: status, start and end in seconds from the job's start, and wall time."""
    assert job.started_at is not None
    origin: datetime = job.started_at
    rows = []
    for stage in job.stages:
        if stage.started_at is None or stage.finished_at is None:
            rows.append((stage.name, stage.status.value, "-", "-", "-"))
            continue
        a = (stage.started_at - origin).total_seconds()
        b = (stage.finished_at - origin).total_seconds()
        rows.append((stage.name, stage.status.value, f"{a:.1f}", f"{b:.1f}", f"{b - a:.1f}"))
    return rows


def words_in(run: JobRun) -> int | None:
    path = run.files.get("words_csv")
    if path is None:
        return None
    with path.open(encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


async def compare(minutes: float, rounds: int, work: Path) -> str:
    load_before = os.getloadavg()
    fixture = await asyncio.to_thread(build_fixture, minutes)
    settings = Settings.from_env()
    model = bare_model(settings)
    bare_times: list[float] = []
    bare_cpus: list[float] = []
    runs: list[JobRun] = []
    for i in range(rounds):
        order = ("bare", "job") if i % 2 == 0 else ("job", "bare")
        for which in order:
            if which == "bare":
                elapsed, cpu, words = bare_run(model, fixture.pcm)
                bare_times.append(elapsed)
                bare_cpus.append(cpu)
                print(f"round {i + 1}: bare {elapsed:.1f} s, {cpu:.1f} s CPU ({words} words)", flush=True)
            else:
                out_dir = work / f"job{i}"
                run = await job_run(settings, fixture, out_dir)
                runs.append(run)
                print(
                    f"round {i + 1}: job {run.job_seconds:.1f} s, analyze() {run.call_seconds:.1f} s, "
                    f"{run.cpu_seconds:.1f} s CPU "
                    f"({words_in(run)} words, {len(run.job.highlights)} highlights)",
                    flush=True,
                )
    cold = await pool_cold_start(settings)
    load_after = os.getloadavg()
    best_bare = min(bare_times)
    best = min(runs, key=lambda r: r.job_seconds)
    best_call = min(r.call_seconds for r in runs)
    paired = [run.job_seconds / bare for run, bare in zip(runs, bare_times, strict=True)]
    measures = [
        ("audio", f"{fixture.seconds / 60:g} min, 48 kHz stereo AAC (speech fixture looped with 3 s silences)"),
        ("chat archive", f"{fixture.messages:,} messages (synthetic, TwitchDownloader JSON)"),
        (
            "settings",
            f"{settings.transcribe_workers} worker(s), model {settings.whisper_model or 'tiny.en (bundled)'}, "
            f"{compute_type(settings)}, {max(1, (os.cpu_count() or 1) // settings.transcribe_workers)} CPU threads",
        ),
        (f"bare faster-whisper, best of {rounds}", f"{best_bare:.1f} s ({', '.join(f'{t:.1f}' for t in bare_times)})"),
        (
            f"whole job (started -> finished), best of {rounds}",
            f"{best.job_seconds:.1f} s ({', '.join(f'{r.job_seconds:.1f}' for r in runs)})",
        ),
        (
            f"whole analyze() call, best of {rounds}",
            f"{best_call:.1f} s ({', '.join(f'{r.call_seconds:.1f}' for r in runs)})",
        ),
        ("**job / bare**", f"**{best.job_seconds / best_bare:.3f}** (target <= {TARGET})"),
        ("analyze() / bare", f"{best_call / best_bare:.3f}"),
        (
            "job / bare per round (same round), median",
            f"{statistics.median(paired):.3f} ({', '.join(f'{r:.3f}' for r in paired)})",
        ),
        (
            "CPU time: analyze() (process + pool workers) / bare, best of each",
            f"{min(r.cpu_seconds for r in runs) / min(bare_cpus):.3f}",
        ),
        ("job - bare (the overhead to explain)", f"{best.job_seconds - best_bare:.1f} s"),
        ("· audio stage (serial: transcription needs its PCM)", f"{stage_wall(best.job, 'audio'):.1f} s"),
        ("· transcribe stage - bare", f"{stage_wall(best.job, 'transcribe') - best_bare:.1f} s"),
        ("· · of which pool cold start (spawn + model load, measured apart)", f"{cold:.1f} s"),
        (
            "load average before / after (1, 5, 15 min)",
            " / ".join(", ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after)),
        ),
        ("CPU cores", str(os.cpu_count())),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in measures)
    stages = "| stage (best job) | status | start s | end s | wall s |\n|---|---|---|---|---|\n" + "\n".join(
        "| " + " | ".join(row) + " |" for row in timeline(best.job)
    )
    return table + "\n\n" + stages


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        report = asyncio.run(compare(args.minutes, max(1, args.rounds), Path(work)))
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
