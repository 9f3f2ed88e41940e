"""The transcription service: a small pool of model-holding worker processes, driven from asyncio.

Why not concurrent.futures.ProcessPoolExecutor: the requirements need to kill *one* worker (the
one busy on a cancelled job's chunk, or a hung one) and replace it while the others keep
working. ProcessPoolExecutor can neither terminate a single worker nor survive one dying: any
worker death marks the whole pool broken (BrokenProcessPool) and fails every job's pending work.
So this module keeps the design the issue asks for (spawn start method, because CTranslate2 is
not fork-safe; each worker loads the model once at start, like an executor initializer) but
owns its processes: each worker has a task pipe and a result pipe, a reader thread per worker
turns blocking `recv` into event-loop callbacks (results are unpickled off the loop), and all
scheduling state lives on the event loop thread.

Scheduling: one FIFO of tasks shared by all jobs, so one job's chunks spread over every idle
worker and an earlier job finishes first (lowest mean completion time) while a later one still
gets any worker the first cannot use. A job is first split into VAD blocks (also pool tasks, so
faster_whisper is never imported here), then into chunks cut at silences (transcription/vad.py).
Chunks joined by a cut inside speech form a chain decoded in order (see `_chains`); chains run in
parallel.

Failure handling:
- cancelled job: its queued tasks are dropped at once; a worker busy on it gets SIGKILL (it is
  inside C++ code, nothing gentler is prompt) and a fresh worker is spawned in its place.
- a worker dies (killed, OOM, segfault): replaced; its task is retried once, then the job fails
  with TranscriptionError. Other jobs' tasks are untouched.
- a task runs past `timeout_base + timeout_factor x its audio seconds`: the worker is killed and
  replaced, the task retried once, then ProcessingTimeout.
- a worker that cannot load the model (missing model, bad compute type) fails every waiting task
  with the loader's message instead of respawning forever; the next job tries again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from klipstream.config import Settings
from klipstream.errors import InternalError, KlipstreamError, ProcessingTimeout, TranscriptionError
from klipstream.transcript import Segment, Transcript
from klipstream.transcription.vad import BLOCK_SECONDS, SAMPLE_RATE, Chunk, plan_chunks, sample_count, vad_blocks
from klipstream.transcription.worker import ChunkResult, ChunkTask, EngineInfo, VadTask, WorkerConfig, serve

log = logging.getLogger(__name__)

WHISPER_WINDOW_SECONDS = 30.0  # what Whisper sees at once

ProgressCallback = Callable[[float, float, str], None]  # (seconds done, seconds total, detail)


@dataclass(eq=False)
class _Job:
    id: int
    cancelled: bool = False


@dataclass(eq=False)
class _Task:
    id: int
    job: _Job
    kind: str  # "vad" | "transcribe"
    payload: VadTask | ChunkTask
    timeout: float
    future: asyncio.Future[Any]
    on_progress: Callable[[float], None] | None = None
    attempts: int = 0  # runs that ended with the worker dead or killed for a timeout


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing SpawnProcess
    tasks: Connection
    results: Connection
    started: float
    ready: bool = False
    task: _Task | None = None
    timer: asyncio.TimerHandle | None = None
    kill_reason: str | None = None  # why we killed it: "cancelled" | "timeout" | "ready_timeout" | "closing"
    init_error: str | None = None
    ready_timer: asyncio.TimerHandle | None = None
    info: EngineInfo | None = field(default=None)

    @property
    def pid(self) -> int:
        return int(self.process.pid)


def _join(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The pieces of `a`, then of `b`; where a cut joins them (a ends where b starts) as one piece."""
    if a and b and a[-1][1] == b[0][0]:
        return (*a[:-1], (a[-1][0], b[0][1]), *b[1:])
    return (*a, *b)


class Transcriber:
    """One per process; created with the settings, started on first use, closed at shutdown."""

    def __init__(
        self,
        settings: Settings,
        *,
        timeout_base: float = 60.0,
        timeout_factor: float = 10.0,
        ready_timeout: float = 300.0,
    ) -> None:
        self.settings = settings
        self.size = settings.transcribe_workers
        self.chunk_seconds = settings.chunk_seconds
        self.timeout_base = timeout_base
        self.timeout_factor = timeout_factor
        self.ready_timeout = ready_timeout
        self._config = WorkerConfig(
            model=settings.whisper_model,
            device=settings.whisper_device,
            compute_type=settings.whisper_compute_type,
            cpu_threads=max(1, (os.cpu_count() or 1) // self.size),
            batch_size=settings.whisper_batch_size,
            batched=settings.whisper_batched,
        )
        self._mp = multiprocessing.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[_Worker] = []
        self._pending: collections.deque[_Task] = collections.deque()
        self._ids = itertools.count(1)
        self._closing = False
        self._broken: str | None = None  # last model-load failure, until a job tries again
        self._info: EngineInfo | None = None
        self._all_exited = asyncio.Event()

    # --- public API ---
    async def start(self) -> None:
        """Spawn the workers (idempotent). Does not wait for the model to load."""
        if self._closing:
            raise TranscriptionError("The transcription service is shutting down.", retry_after=10)
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise InternalError("the transcription pool is bound to the event loop that first used it")
        self._broken = None
        while len(self._workers) < self.size:
            self._spawn()

    async def transcribe(
        self,
        pcm_path: Path,
        *,
        language: str | None = None,
        initial_prompt: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Transcript:
        """Transcribe a 16 kHz mono s16le PCM file. Cancelling the awaiting task cancels the job."""
        await self.start()
        job = _Job(next(self._ids))
        total_samples = sample_count(pcm_path)
        total = total_samples / SAMPLE_RATE
        report = on_progress or (lambda *_: None)
        try:
            probs = await self._find_speech(job, pcm_path, total_samples, report)
            chunks = await asyncio.to_thread(plan_chunks, probs, total_samples, self.chunk_seconds)
            del probs
            results = await self._transcribe_chunks(job, pcm_path, chunks, language, initial_prompt, total, report)
        except BaseException:
            self._cancel_job(job)
            raise
        return self._assemble(chunks, results, language, total)

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def busy(self) -> list[tuple[int, str]]:
        """(pid, task kind) of workers running a task: for tests, metrics and readiness."""
        return [(w.pid, w.task.kind) for w in self._workers if w.task is not None]

    def stats(self) -> dict[str, Any]:
        return {
            "workers": len(self._workers),
            "ready": sum(w.ready for w in self._workers),
            "busy": sum(w.task is not None for w in self._workers),
            "queued_tasks": len(self._pending),
            "model": self._info.model if self._info else None,
            "device": self._info.device if self._info else None,
            "error": self._broken,
        }

    async def close(self, grace: float = 3.0) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones are killed."""
        self._closing = True
        self._fail_pending(TranscriptionError("The transcription service is shutting down.", retry_after=10))
        for worker in list(self._workers):
            if worker.task is None and worker.ready:
                worker.kill_reason = "closing"
                with contextlib.suppress(OSError, ValueError):
                    worker.tasks.send(("stop",))
            else:
                self._kill(worker, "closing")
        if self._workers:
            self._all_exited.clear()
            try:
                async with asyncio.timeout(grace):
                    await self._all_exited.wait()
            except TimeoutError:
                for worker in list(self._workers):
                    self._kill(worker, "closing")

    # --- job phases ---
    async def _find_speech(self, job: _Job, pcm_path: Path, total_samples: int, report: ProgressCallback) -> np.ndarray:
        blocks = vad_blocks(total_samples)
        total = total_samples / SAMPLE_RATE
        futures = [
            self._submit(job, "vad", VadTask(str(pcm_path), s, e), self.timeout_base + (e - s) / SAMPLE_RATE)
            for s, e in blocks
        ]
        done = 0
        report(0.0, total, "finding speech")
        for next_done in asyncio.as_completed(futures):
            await next_done
            done += 1
            report(
                0.0, total, f"finding speech: {min(done * BLOCK_SECONDS, total) / 60:.1f} min of {total / 60:.1f} min"
            )
        parts = [f.result() for f in futures]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    async def _transcribe_chunks(
        self,
        job: _Job,
        pcm_path: Path,
        chunks: list[Chunk],
        language: str | None,
        initial_prompt: str | None,
        total: float,
        report: ProgressCallback,
    ) -> list[ChunkResult]:
        speech = sum(c.speech_seconds for c in chunks)
        silence = max(0.0, total - speech)  # silence is done once the VAD has found it
        done_per_chunk = [0.0] * len(chunks)

        def progress(index: int, seconds: float) -> None:
            done_per_chunk[index] = max(done_per_chunk[index], min(seconds, chunks[index].speech_seconds))
            done = silence + sum(done_per_chunk)
            report(done, total, f"{done / 60:.1f} min of {total / 60:.1f} min")

        report(silence, total, f"{silence / 60:.1f} min of {total / 60:.1f} min")

        def finished(index: int, future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is None:
                progress(index, chunks[index].speech_seconds)

        def chunk_progress(index: int, carried: float, done: float) -> None:
            progress(index, done - carried)

        async def run_chain(chain: list[Chunk]) -> list[ChunkResult]:
            """The chunks of one chain, in order, each continuing where the one before left off."""
            results: list[ChunkResult] = []
            carry: tuple[tuple[int, int], ...] = ()  # the last window of the chunk before, decoded again
            prompt: tuple[int, ...] = ()
            for i, chunk in enumerate(chain):
                if job.cancelled:
                    raise asyncio.CancelledError()
                pieces = _join(carry, chunk.pieces)
                task = ChunkTask(str(pcm_path), pieces, language, initial_prompt, i + 1 < len(chain), prompt)
                seconds = sum(e - s for s, e in pieces) / SAMPLE_RATE
                timeout = self.timeout_base + self.timeout_factor * seconds
                carried = seconds - chunk.speech_seconds  # progress counts this chunk's own speech only
                on_progress = functools.partial(chunk_progress, chunk.index, carried)
                future = self._submit(job, "transcribe", task, timeout, on_progress)
                future.add_done_callback(functools.partial(finished, chunk.index))
                result: ChunkResult = await future
                results.append(result)
                if result.resume is not None:
                    carry = tuple((max(s, result.resume), e) for s, e in pieces if e > result.resume)
                    prompt = result.prompt
                else:
                    carry, prompt = (), ()
            return results

        runs = [asyncio.ensure_future(run_chain(chain)) for chain in self._chains(chunks)]
        try:
            per_chain = await asyncio.gather(*runs)
        except BaseException:
            # The first failure ends the job; the caller cancels its other chunks in the pool.
            for run in runs:
                run.cancel()
            raise
        return [result for results in per_chain for result in results]

    def _chains(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        """Chunks that must be decoded in order, one after the other.

        A chunk that ends at a cut inside speech (where the next chunk starts) is continued by the
        next: the next chunk starts at the cut-short last Whisper window of the one before, with its
        previous text as prompt, which is what one faster-whisper call over both would do. Chunks
        separated by silence (the VAD's 2 s) start fresh, as faster-whisper would after its own
        VAD, so separate chains still run on every idle worker at once. Only the sequential
        decoder carries anything over, and only chunks longer than a Whisper window have a last
        window to hand over; otherwise every chunk is its own chain."""
        batched = self._info is not None and self._info.batched
        if batched or self.chunk_seconds <= WHISPER_WINDOW_SECONDS:
            return [[chunk] for chunk in chunks]
        chains: list[list[Chunk]] = []
        for chunk in chunks:
            if chains and chains[-1][-1].end == chunk.start:
                chains[-1].append(chunk)
            else:
                chains.append([chunk])
        return chains

    def _assemble(
        self, chunks: list[Chunk], results: list[ChunkResult], language: str | None, total: float
    ) -> Transcript:
        segments: list[Segment] = []
        for result in results:
            for seg in result.segments:
                segments.append(seg._replace(id=len(segments)))
        if language is None:
            weight: dict[str, float] = collections.defaultdict(float)
            for chunk, result in zip(chunks, results, strict=True):
                weight[result.language] += chunk.speech_seconds
            if weight:
                language = max(weight, key=weight.__getitem__)
            elif self._info is not None and not self._info.multilingual:
                language = "en"
        model = self._info.model if self._info else (self.settings.whisper_model or "tiny.en")
        return Transcript(language=language, duration=round(total, 3), model=model, segments=segments)

    # --- pool mechanics (event loop thread only) ---
    def _submit(
        self,
        job: _Job,
        kind: str,
        payload: VadTask | ChunkTask,
        timeout: float,
        on_progress: Callable[[float], None] | None = None,
    ) -> asyncio.Future[Any]:
        assert self._loop is not None
        if self._broken is not None:
            raise TranscriptionError(self._broken)
        future: asyncio.Future[Any] = self._loop.create_future()
        # A job that fails on one task drops the rest; mark their errors as seen so asyncio does
        # not log "exception was never retrieved" for them.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append(_Task(next(self._ids), job, kind, payload, timeout, future, on_progress))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not self._pending:
                return
            if not worker.ready or worker.task is not None or worker.kill_reason is not None:
                continue
            task = self._pending.popleft()
            try:
                worker.tasks.send((task.kind, task.id, task.payload))
            except (OSError, ValueError):
                self._pending.appendleft(task)  # the worker is dying; its exit handler replaces it
                continue
            worker.task = task
            assert self._loop is not None
            worker.timer = self._loop.call_later(task.timeout, self._on_task_timeout, worker, task)

    def _spawn(self) -> None:
        assert self._loop is not None
        task_reader, task_writer = self._mp.Pipe(duplex=False)
        result_reader, result_writer = self._mp.Pipe(duplex=False)
        process = self._mp.Process(
            target=serve, args=(self._config, task_reader, result_writer), name="klipstream-whisper", daemon=True
        )
        process.start()
        # Close our copies of the child's ends: the result pipe then reports EOF the moment the
        # child dies, which is how deaths are noticed.
        task_reader.close()
        result_writer.close()
        worker = _Worker(process, task_writer, result_reader, self._loop.time())
        worker.ready_timer = self._loop.call_later(self.ready_timeout, self._on_ready_timeout, worker)
        self._workers.append(worker)
        threading.Thread(target=self._read, args=(worker, self._loop), name="whisper-reader", daemon=True).start()
        log.info("transcription worker %d starting", worker.pid)

    def _read(self, worker: _Worker, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: blocking recv (and unpickling) off the event loop."""
        while True:
            try:
                message = worker.results.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # an unpicklable result: report it against the task
                message = ("broken_message", f"{type(exc).__name__}: {exc}")
            try:
                loop.call_soon_threadsafe(self._on_message, worker, message)
            except RuntimeError:
                break  # the loop is closed
        worker.process.join(10)  # reap, so the pid is gone when the exit is handled
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit, worker)

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            worker.info = self._info = message[1]
            if worker.ready_timer is not None:
                worker.ready_timer.cancel()
            log.info(
                "transcription worker %d ready (%s on %s, %s)",
                worker.pid,
                worker.info.model,
                worker.info.device,
                worker.info.compute_type,
            )
            self._dispatch()
        elif kind == "init_error":
            worker.init_error = message[1]
        elif kind == "progress":
            task = worker.task
            if task is not None and task.id == message[1] and task.on_progress is not None:
                task.on_progress(message[2])
        elif kind in ("done", "failed", "broken_message"):
            task = worker.task
            if task is None or (kind != "broken_message" and task.id != message[1]):
                return
            self._finish(worker)
            if not task.future.done():
                if kind == "done":
                    task.future.set_result(message[2])
                else:
                    task.future.set_exception(
                        TranscriptionError(f"The speech model failed on this audio: {message[-1]}")
                    )
            self._dispatch()

    def _finish(self, worker: _Worker) -> None:
        worker.task = None
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None

    def _on_exit(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        if worker.ready_timer is not None:
            worker.ready_timer.cancel()
        task = worker.task
        self._finish(worker)
        reason = worker.kill_reason
        code = worker.process.exitcode
        if reason == "closing":
            if task is not None and not task.future.done():
                task.future.set_exception(
                    TranscriptionError("The transcription service is shutting down.", retry_after=10)
                )
            self._after_exit()
            return
        if reason != "cancelled":
            log.warning("transcription worker %d exited (code %s, %s)", worker.pid, code, reason or "died")
        if not worker.ready and reason != "cancelled":
            # Never became ready: a model-load failure fails the waiting work instead of looping.
            self._broken = worker.init_error or (
                f"A transcription worker died while loading the Whisper model (exit code {code}); "
                "the server may be out of memory."
            )
            self._fail_pending(TranscriptionError(self._broken))
            if task is not None and not task.future.done():
                task.future.set_exception(TranscriptionError(self._broken))
            self._after_exit()
            return
        if task is not None and not task.future.done() and not task.job.cancelled:
            task.attempts += 1
            if task.attempts <= 1:
                log.warning("retrying %s task %d after worker %d ended (%s)", task.kind, task.id, worker.pid, reason)
                self._pending.appendleft(task)
            elif reason == "timeout":
                task.future.set_exception(
                    ProcessingTimeout(
                        f"Transcribing a part of the audio took longer than {task.timeout:.0f} s twice.",
                        code="transcription_timeout",
                    )
                )
            else:
                task.future.set_exception(
                    TranscriptionError(
                        f"The transcription worker died twice on the same part of the audio (exit code {code}).",
                        code="worker_died",
                    )
                )
        self._after_exit()

    def _after_exit(self) -> None:
        if self._closing:
            if not self._workers:
                self._all_exited.set()
            return
        if self._broken is None:
            while len(self._workers) < self.size:
                self._spawn()
        self._dispatch()

    def _kill(self, worker: _Worker, reason: str) -> None:
        worker.kill_reason = worker.kill_reason or reason
        with contextlib.suppress(ProcessLookupError, OSError, AttributeError):
            worker.process.kill()

    def _on_task_timeout(self, worker: _Worker, task: _Task) -> None:
        if worker.task is task:
            log.warning("%s task %d exceeded %.0f s on worker %d", task.kind, task.id, task.timeout, worker.pid)
            self._kill(worker, "timeout")

    def _on_ready_timeout(self, worker: _Worker) -> None:
        if not worker.ready:
            worker.init_error = f"The Whisper model did not load within {self.ready_timeout:.0f} s."
            self._kill(worker, "ready_timeout")

    def _cancel_job(self, job: _Job) -> None:
        job.cancelled = True
        kept = [t for t in self._pending if t.job is not job]
        for task in self._pending:
            if task.job is job:
                task.future.cancel()
        self._pending = collections.deque(kept)
        for worker in self._workers:
            if worker.task is not None and worker.task.job is job:
                worker.task.future.cancel()
                self._kill(worker, "cancelled")

    def _fail_pending(self, error: KlipstreamError) -> None:
        while self._pending:
            task = self._pending.popleft()
            if not task.future.done():
                task.future.set_exception(error)
