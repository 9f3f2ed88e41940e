"""Speed and peak memory of the single audio pass (klipstream.acquisition.audio_pass) on long synthetic VOD audio.

Generates Twitch-like audio once (AAC, 48 kHz stereo, 128 kb/s, in MPEG-TS) into a cache folder,
then runs the whole pass (decode, 16 kHz PCM, MP3, waveform, features) in a fresh child process
pinned to one CPU core, and prints a markdown table: real-time factor (from CPU time and from wall
time) and peak RSS.

    python bench/bench_audio_pass.py              # 1 h and 3 h
    python bench/bench_audio_pass.py --hours 0.25 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np

RATE = 48_000
CACHE = Path(tempfile.gettempdir()) / "klipstream-bench"


def synth_chunk(start: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Two channels of speech-like bursts over a soft chord, with the odd quiet stretch."""
    t = (start + np.arange(n)) / RATE
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t) * np.sin(2 * np.pi * 0.37 * t), 0, None)
    voice = rng.standard_normal(n) * 0.15 * syllables
    voice += 0.2 * syllables * np.sin(2 * np.pi * (140 + 30 * np.sin(2 * np.pi * 0.5 * t)) * t)
    chord = 0.05 * (np.sin(2 * np.pi * 220 * t) + np.sin(2 * np.pi * 277.2 * t) + np.sin(2 * np.pi * 329.6 * t))
    quiet = (np.sin(2 * np.pi * t / 600) > 0.95).astype(np.float64)  # ~5% of the time near silence
    mono = (voice + chord) * (1 - 0.97 * quiet)
    return np.stack([mono, 0.9 * mono + 0.02 * rng.standard_normal(n)]).astype(np.float32)


def synthetic_media(seconds: float) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"synthetic_{int(seconds)}s.ts"
    if path.exists() and (CACHE / (path.name + ".done")).exists():
        return path
    print(f"generating {seconds / 3600:.2f} h of synthetic AAC into {path} (once) ...", file=sys.stderr, flush=True)
    rng = np.random.default_rng(1)
    started = time.monotonic()
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("aac", rate=RATE, layout="stereo")
        stream.bit_rate = 128_000
        step = 4 * RATE
        for start in range(0, int(seconds * RATE), step):
            frame = av.AudioFrame.from_ndarray(synth_chunk(start, step, rng), format="fltp", layout="stereo")
            frame.sample_rate = RATE
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    (CACHE / (path.name + ".done")).touch()
    print(f"  done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return path


def child(source: str) -> None:
    """Run one pass in this process, pinned to one core; print the measurements as JSON."""
    from klipstream.acquisition.audio_pass import AudioPassOutputs, playback_format, run_audio_pass

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    fmt = playback_format()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        outputs = AudioPassOutputs(out / "a.pcm", out / f"a.{fmt.ext}", out / "w.json", out / "f.npz")
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_audio_pass(Path(source), outputs, cancelled=threading.Event())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        sizes = {k: getattr(outputs, k).stat().st_size for k in ("pcm", "audio", "waveform", "features")}
    print(
        json.dumps(
            {
                "seconds": result.duration_seconds,
                "wall": wall,
                "cpu": cpu,
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "sizes": sizes,
                "playback": f"{fmt.codec} {fmt.bit_rate // 1000} kb/s mono 16 kHz",
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    for hours in args.hours:
        source = synthetic_media(hours * 3600)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(source)], env=env, capture_output=True, text=True, check=True
        )
        rows.append((hours, source, json.loads(done.stdout.strip().splitlines()[-1])))
    # CPU time is the figure that counts on a shared machine: the child is pinned to one core, so
    # its CPU time is the core-seconds the pass needs; wall time also counts other tenants' load.
    print(
        "| input | audio | CPU (1 core) | x real time (CPU) | wall | x real time (wall) | peak RSS "
        "| PCM | playback | waveform | features |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for hours, source, m in rows:
        s = m["sizes"]
        print(
            f"| {hours:g} h AAC 48 kHz stereo 128 kb/s MPEG-TS ({source.stat().st_size / 1e6:.0f} MB) "
            f"| {m['seconds'] / 3600:.2f} h | {m['cpu']:.1f} s | {m['seconds'] / m['cpu']:.0f}x "
            f"| {m['wall']:.1f} s | {m['seconds'] / m['wall']:.0f}x | {m['maxrss_mb']:.0f} MB "
            f"| {s['pcm'] / 1e6:.0f} MB "
            f"| {s['audio'] / 1e6:.0f} MB ({m['playback']}) | {s['waveform'] / 1e3:.0f} kB "
            f"| {s['features'] / 1e6:.1f} MB |"
        )


if __name__ == "__main__":
    main()
