"""What a checkpoint costs: a stage completion that uploads the PCM transcription reads, against
the same completion without checkpoints, and the restore a resuming instance does.

The job runs through the real runtime (klipstream.jobs.runtime: SQLite store, runner, GCS storage
client) with two stages: `audio` hard-links a pre-made 16 kHz mono s16 PCM file of `--minutes`
of audio into the job directory (so the stage's own work is nil) and `transcribe` reads it. The
figure is the time from `audio` returning to `audio` being stored as completed, with GCS
checkpoints (the upload: MD5, resumable chunks, server MD5 check) and, in the same run, with the
data directory as the checkpoint (the baseline: `LocalCheckpoints`, as with local storage).
The restore (download, MD5 check, rename) is timed against a local file copy of the same bytes.

The artifact store is gcp-storage-emulator on loopback (a Python process, in memory): its
throughput, not the network, bounds these figures; Cloud Storage from Cloud Run in the same region
is typically faster per stream. The process's peak RSS, compared between two `--minutes`, shows
memory stays flat (the file is never read whole).

Usage: python bench/bench_checkpoints.py [--minutes 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from klipstream.config import Settings
from klipstream.jobs.checkpoints import GcsCheckpoints, LocalCheckpoints
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage, Job, JobOptions, StageStatus, SubmitRequest
from tests.gcs_emulator import start_emulator

PCM_BYTES_PER_SECOND = 16000 * 2  # 16 kHz mono int16, what klipstream.acquisition.audio_pass writes
BUCKETS = ("klipstream-vods-raw", "klipstream-transcripts", "klipstream-chatlogs", "klipstream-analysis")


def make_pcm(path: Path, size: int) -> None:
    """Incompressible bytes in 1 MiB blocks (MD5 and transfer cost as for real audio)."""
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            left -= len(block)


def pipeline(pcm: Path, returned: dict[str, float]) -> list[Stage]:
    async def audio(ctx: StageContext) -> None:
        out = ctx.output_path("pcm")
        await asyncio.to_thread(os.link, pcm, out)
        ctx.add_artifact("pcm", out)
        returned[ctx.job_id] = time.perf_counter()

    async def transcribe(ctx: StageContext) -> None:
        ctx.input("pcm")

    return [
        Stage("audio", DisplayStage.PROCESSING_AUDIO, audio, provides=("pcm",), resource=Resource.CPU),
        Stage("transcribe", DisplayStage.TRANSCRIBING, transcribe, needs=("pcm",), resource=Resource.CPU),
    ]


async def completion_times(settings: Settings, pcm: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds from `audio` returning to `audio` stored as completed, per mode, alternating modes."""
    from klipstream.cli.local import run_job
    from klipstream.jobs.runtime import job_runtime

    returned: dict[str, float] = {}
    completed: dict[str, float] = {}

    def on_event(kind: str, job: Job) -> None:
        if (
            kind == "stage_changed"
            and job.job_id not in completed
            and job.stage("audio").status is StageStatus.COMPLETED
        ):
            completed[job.job_id] = time.perf_counter()

    times: dict[str, list[float]] = {"without": [], "with": []}
    async with job_runtime(settings, pipeline(pcm, returned)) as runtime:
        service = runtime.service
        gcs = service.deps.checkpoints
        assert isinstance(gcs, GcsCheckpoints)
        service.listen(on_event)
        for n in range(rounds):
            for mode in ("without", "with"):
                service.deps.checkpoints = gcs if mode == "with" else LocalCheckpoints()
                request = SubmitRequest(url=f"https://example.com/{mode}-{n}.mp4", options=JobOptions())
                job, _ = await run_job(service, request, stop=asyncio.Event())
                assert job.status.value == "completed", job.error
                times[mode].append(completed[job.job_id] - returned[job.job_id])
        service.deps.checkpoints = gcs
    return times


async def restore_times(settings: Settings, pcm: Path, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """(upload, restore, local copy) seconds of the PCM through GcsCheckpoints."""
    import aiohttp

    from klipstream.integrations.storage import GcsStorage

    uploads, restores, copies = [], [], []
    async with aiohttp.ClientSession() as http:
        storage = GcsStorage(settings, http)
        store = GcsCheckpoints(settings, storage)
        with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
            for n in range(rounds):
                job_id = f"bench{n:04d}"
                t0 = time.perf_counter()
                checkpoint = await store.save(job_id, "pcm", pcm)
                uploads.append(time.perf_counter() - t0)
                dest = Path(tmp) / f"restored-{n}.pcm"
                t0 = time.perf_counter()
                await store.restore(checkpoint, dest)
                restores.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await asyncio.to_thread(shutil.copyfile, pcm, Path(tmp) / f"copy-{n}.pcm")
                copies.append(time.perf_counter() - t0)
                await store.remove_job(job_id)
                dest.unlink()
                (Path(tmp) / f"copy-{n}.pcm").unlink()
        await storage.close()
    return uploads, restores, copies


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0, help="minutes of audio in the PCM file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = int(args.minutes * 60 * PCM_BYTES_PER_SECOND)
    proc, base = start_emulator(BUCKETS, project="bench")
    os.environ["STORAGE_EMULATOR_HOST"] = base
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            pcm = root / "source.pcm"
            make_pcm(pcm, size)
            settings = Settings.from_env({}, data_dir=root / "data", storage="gcs", log_level="warning")
            settings = replace(settings, max_running_jobs=1)
            times = asyncio.run(completion_times(settings, pcm, args.rounds))
            uploads, restores, copies = asyncio.run(restore_times(settings, pcm, args.rounds))
    finally:
        proc.terminate()
        proc.wait(10)
    mb = size / 1e6
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"PCM of {args.minutes:g} min: {mb:.1f} MB; {args.rounds} rounds, medians; emulator on loopback\n")
    print("| what | seconds | ratio to baseline |")
    print("|---|---|---|")
    print(f"| stage completion, data directory as checkpoint (baseline) | {without:.3f} | 1 |")
    print(f"| stage completion with the PCM checkpoint upload | {with_:.3f} | {with_ / without:.0f}x |")
    print(f"| added per completion | {with_ - without:.3f} | {mb / max(1e-9, with_ - without):.0f} MB/s |")
    up, down, copy = statistics.median(uploads), statistics.median(restores), statistics.median(copies)
    print(f"| local copy of the PCM (baseline) | {copy:.3f} | 1 |")
    print(f"| checkpoint upload alone | {up:.3f} | {up / copy:.1f}x ({mb / up:.0f} MB/s) |")
    print(f"| restore on a resuming instance | {down:.3f} | {down / copy:.1f}x ({mb / down:.0f} MB/s) |")
    print(f"\npeak RSS of the process: {peak_rss_mb():.0f} MB (PCM file: {mb:.0f} MB; compare runs of two sizes)")
    print(f"raw: {json.dumps({'completion': times, 'upload': uploads, 'restore': restores, 'copy': copies})}")


if __name__ == "__main__":
    main()
