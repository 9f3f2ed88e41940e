"""Clip stage speed and memory on a 1-hour 720p VOD, against plain ffmpeg in the same run.

Generates a Twitch-like VOD once into a cache folder (720p30 H.264 with 2 s closed GOPs and
B-frames, AAC 48 kHz, MPEG-TS; a 2-minute piece with moving, noisy content repeated to an hour),
then times, for the same 10 spans of 30 s (starting between keyframes):

- baseline: `ffmpeg -ss S -i vod -t 30 -c copy` per span (keyframe-aligned, not frame-accurate);
- full re-encode: `ffmpeg -ss S -i vod -t 30 -c:v libx264 -preset veryfast` per span (frame-accurate);
- the clips stage's child process (klipstream.clips.worker) cutting the same spans frame-accurately;
- the same child making 1080x1920 vertical versions with word-by-word captions.

Peak memory is the largest summed RSS of the child's whole process group (ffmpeg included),
sampled every 20 ms in runs of their own (the sampling takes CPU the timed runs must not lose).
Rounds are interleaved and the median is reported.

    python bench/bench_clips.py            # 1 h VOD, 10 x 30 s, 3 rounds
    python bench/bench_clips.py --quick    # 10 min VOD, 3 x 30 s, 1 round
    python bench/bench_clips.py --compare /tmp/old   # vertical: this checkout vs another, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "klipstream-bench"
PIECE_SECONDS = 120


def make_vod(seconds: int) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"vod_720p30_{seconds}s.ts"
    done = CACHE / (path.name + ".done")
    if path.exists() and done.exists():
        return path
    print(f"generating a {seconds / 3600:.2f} h 720p VOD into {path} (once) ...", file=sys.stderr, flush=True)
    piece = CACHE / "piece_720p30.ts"
    if not (CACHE / (piece.name + ".done")).exists():
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
             "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30,noise=alls=6:allf=t,format=yuv420p",
             "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=48000,volume=0.4",
             "-t", str(PIECE_SECONDS), "-c:v", "libx264", "-preset", "superfast", "-b:v", "3000k",
             "-x264-params", "keyint=60:min-keyint=60:scenecut=0:bframes=2:open-gop=0",
             "-c:a", "aac", "-b:a", "160k", "-ac", "2", "-f", "mpegts", str(piece)],
            check=True,
        )  # fmt: skip
        (CACHE / (piece.name + ".done")).touch()
    listing = CACHE / "concat.txt"
    listing.write_text("".join(f"file '{piece}'\n" for _ in range(-(-seconds // PIECE_SECONDS))))
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing),
         "-t", str(seconds), "-c", "copy", "-f", "mpegts", str(path)],
        check=True,
    )  # fmt: skip
    done.touch()
    return path


def spans(count: int, duration: float, seconds: float) -> list[tuple[float, float]]:
    """`count` spans spread over the VOD, each starting between two keyframes."""
    step = (duration - seconds - 60) / count
    return [(30.37 + i * step + (i % 3) * 0.41, 30.37 + i * step + (i % 3) * 0.41 + seconds) for i in range(count)]


class PeakRss:
    """Largest summed RSS (bytes) of every process in one process group, sampled in a thread.

    Scanning /proc every 20 ms costs about as much CPU as the clips themselves on 2 cores, so
    timed runs go without it and memory is measured in runs of its own."""

    def __init__(self, pgid: int, interval: float = 0.02) -> None:
        self.pgid, self.peak, self.interval, self._stop = pgid, 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total = 0
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    if int(fields[2]) == self.pgid:  # field 5: pgrp
                        with open(f"/proc/{entry}/statm") as f:
                            total += int(f.read().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    continue
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ffmpeg_per_span(vod: Path, out: Path, cuts: list[tuple[float, float]], codec: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ffmpeg run per span."""
    started, cpu = time.perf_counter(), _child_cpu()
    for i, (start, end) in enumerate(cuts):
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-ss", f"{start:.3f}", "-i", str(vod),
             "-t", f"{end - start:.3f}", *codec, "-movflags", "+faststart", str(out / f"ff_{i}.mp4")],
            check=True,
        )  # fmt: skip
    return time.perf_counter() - started, _child_cpu() - cpu


def worker(
    vod: Path,
    out: Path,
    cuts: list[tuple[float, float]],
    *,
    vertical: bool,
    memory: bool = False,
    root: Path = ROOT,
) -> tuple[float, float, int, dict]:
    """Run the clips stage's child on a plan like the stage writes: (wall s, CPU s, peak RSS, manifest).

    `memory`: sample the process group's RSS (a run of its own: the sampling takes CPU; peak 0 otherwise).
    `root`: the checkout whose `klipstream` the child runs (`python -m` puts its cwd first on the path)."""
    from klipstream.clips.worker import ClipTask, Plan, VerticalPlan

    transcript = None
    if vertical:  # a word every 0.35 s, so the burned-in captions change as often as fast speech
        words = [
            {"start": s + k * 0.35, "end": s + k * 0.35 + 0.3, "word": f" word{k % 50}", "probability": 0.9}
            for s, e in cuts
            for k in range(int((e - s) / 0.35))
        ]
        transcript = out / "transcript.json"
        transcript.write_text(json.dumps({"segments": [{"id": 0, "start": 0, "end": 1, "text": "", "words": words}]}))
    plan = Plan(
        video=str(vod),
        directory=str(out),
        height=720,
        codec="libx264",
        preset=os.environ.get("KLIPSTREAM_CLIP_PRESET", "veryfast"),
        vertical_preset=os.environ.get("KLIPSTREAM_VERTICAL_PRESET", "superfast"),
        crf=21,
        manifest="clips.json",
        otio="e.otio",
        edl="e.edl",
        fcpxml="e.xml",
        source_name=vod.name,
        captions_srt="all.srt" if vertical else None,
        captions_vtt="all.vtt" if vertical else None,
        transcript=str(transcript) if transcript else None,
        vertical=VerticalPlan(1080, 1920, "blur") if vertical else None,
        clips=[
            ClipTask(i + 1, i + 1, s, e, (s + e) / 2, f"H{i + 1}", f"c{i}.mp4", f"t{i}.jpg",
                     f"v{i}.mp4" if vertical else None, f"c{i}.srt" if vertical else None,
                     f"c{i}.vtt" if vertical else None)
            for i, (s, e) in enumerate(cuts)
        ],
    )  # fmt: skip
    (out / "plan.json").write_text(plan.to_json())
    started, cpu = time.perf_counter(), _child_cpu()
    proc = subprocess.Popen(
        [sys.executable, "-m", "klipstream.clips.worker", str(out / "plan.json")],
        cwd=root,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    sampler = PeakRss(proc.pid) if memory else None
    code = proc.wait()
    seconds, cpu = time.perf_counter() - started, _child_cpu() - cpu  # ffmpeg was waited for by the worker
    peak = sampler.stop() if sampler else 0
    if code != 0:
        raise SystemExit(f"the clips worker failed (exit {code})")
    return seconds, cpu, peak, json.loads((out / "clips.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 min VOD, 3 spans, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-vertical", action="store_true")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="CHECKOUT",
        help="also time the vertical run of another checkout (e.g. `git worktree add /tmp/old main`), "
        "interleaved with this one for --rounds rounds, and print both",
    )
    args = parser.parse_args()
    duration = 600 if args.quick else 3600
    count = 3 if args.quick else 10
    rounds = args.rounds or (1 if args.quick else 3)
    vod = make_vod(duration)
    cuts = spans(count, duration, 30.0)
    runs: dict[str, list[tuple[float, float]]] = {"copy": [], "clips": [], "reencode": []}
    peaks: list[int] = []
    reencode = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "21", "-c:a", "copy"]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-clips-") as tmp:
        out = Path(tmp)
        for r in range(rounds):
            runs["copy"].append(ffmpeg_per_span(vod, out, cuts, ["-c", "copy"]))
            wall, cpu, _, manifest = worker(vod, out, cuts, vertical=False)
            runs["clips"].append((wall, cpu))
            if r == 0:  # an order of magnitude away; once is enough to place it
                runs["reencode"].append(ffmpeg_per_span(vod, out, cuts, reencode))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s" for k, v in runs.items()), file=sys.stderr)
        peaks.append(worker(vod, out, cuts, vertical=False, memory=True)[2])
        methods = sorted({c["method"] for c in manifest["clips"]})
        encoded = sum(c["encoded_frames"] for c in manifest["clips"]) / sum(c["frames"] for c in manifest["clips"])
        vertical_row = None
        compared: dict[str, list[tuple[float, float, float]]] = {"this": [], "other": []}
        if not args.no_vertical:
            for r in range(rounds if args.compare else 1):
                pairs = [("this", ROOT), ("other", args.compare)] if args.compare else [("this", ROOT)]
                for key, root in pairs if r % 2 == 0 else pairs[::-1]:  # alternate who goes first
                    wall, cpu, _, v_manifest = worker(vod, out, cuts, vertical=True, root=root)
                    v_out = sum(c["duration"] for c in v_manifest["clips"])
                    compared[key].append((v_out, wall, cpu))
                    print(f"vertical round {r + 1} ({key}): {v_out / wall:.2f}x real time", file=sys.stderr)
            v_peak = worker(vod, out, cuts, vertical=True, memory=True)[2]
            v_out, wall, cpu = (statistics.median(run[i] for run in compared["this"]) for i in range(3))
            vertical_row = (v_out, wall, cpu, v_peak)
        load = max(load, os.getloadavg()[0])

    def med(key: str, i: int) -> float:
        return statistics.median(run[i] for run in runs[key])

    cores = os.cpu_count() or 1
    print(
        f"\n{count} clips of 30 s from a {duration / 3600:.2f} h 720p30 VOD on {cores} cores (load average up to "
        f"{load:.1f}), median of {rounds} interleaved round(s)\n"
    )
    print("| what | wall s | ratio (wall) | CPU s | ratio (CPU) | peak RSS |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("`ffmpeg -ss … -t … -c copy` per span (baseline; starts on a keyframe)", "copy", ""),
        (f"clips stage, frame-accurate ({', '.join(methods)}; {encoded:.0%} of frames re-encoded)", "clips",
         f"{max(peaks) / 2**20:.0f} MB"),
        ("`ffmpeg -ss … -t …` full re-encode, libx264 veryfast (frame-accurate; first round only)", "reencode", ""),
    ]  # fmt: skip
    for label, key, peak_text in rows:
        print(
            f"| {label} | {med(key, 0):.2f} | {med(key, 0) / med('copy', 0):.1f}× | {med(key, 1):.2f} "
            f"| {med(key, 1) / med('copy', 1):.1f}× | {peak_text} |"
        )
    if vertical_row:
        v_out, wall, cpu, v_peak = vertical_row
        print(
            f"\nvertical 1080x1920, blurred fill, word-by-word captions, {v_out:.0f} s of video (whole run: cuts, "
            f"thumbnails, captions, vertical, edit lists): {wall:.1f} s wall = **{v_out / wall:.2f}× real time**; "
            f"{cpu:.1f} CPU s = {v_out / (cpu / cores):.2f}× real time on {cores} otherwise idle cores; "
            f"peak RSS {v_peak / 2**20:.0f} MB"
        )
    if args.compare and compared["other"]:
        cpu_this, cpu_other = (statistics.median(c for *_, c in compared[k]) for k in ("this", "other"))
        this = [v / w for v, w, _ in compared["this"]]
        other = [v / w for v, w, _ in compared["other"]]
        print(
            f"\nvertical, this checkout vs {args.compare} (median of {rounds} interleaved rounds): "
            f"{statistics.median(this):.2f}× vs {statistics.median(other):.2f}× real time; per round "
            f"{', '.join(f'{a / b:.3f}' for a, b in zip(this, other, strict=True))} times as fast; CPU s "
            f"{cpu_this:.1f} vs {cpu_other:.1f}"
        )


if __name__ == "__main__":
    main()
