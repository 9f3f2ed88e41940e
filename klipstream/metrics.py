"""Prometheus metrics and the event-loop lag monitor.

A private registry keeps tests (several apps in one process) from colliding on metric names.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from klipstream.models import TERMINAL_STATUSES, Job, Priority

log = logging.getLogger(__name__)
LAG_WARN_SECONDS = 0.1


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter("klipstream_jobs_submitted", "Jobs accepted", ["priority"], registry=r)
        # Looked up once: labels() takes a lock and hashes its arguments on every call.
        self.submitted_by_priority = {p: self.jobs_submitted.labels(p.value) for p in Priority}
        self.jobs_finished = Counter("klipstream_jobs_finished", "Jobs that ended, by status", ["status"], registry=r)
        self.queue_depth = Gauge("klipstream_queue_depth", "Jobs waiting in the queue", registry=r)
        self.running_jobs = Gauge("klipstream_running_jobs", "Jobs being processed", registry=r)
        self.stage_seconds = Histogram(
            "klipstream_stage_duration_seconds",
            "Wall time of finished stages",
            ["stage"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=r,
        )
        self.sse_subscribers = Gauge("klipstream_sse_subscribers", "Open event streams", registry=r)
        self.loop_lag = Histogram(
            "klipstream_event_loop_lag_seconds",
            "How late the event loop ran a timer",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self._observed: set[tuple[str, str, int]] = set()

    def job_event(self, kind: str, job: Job) -> None:
        if kind in TERMINAL_STATUSES:
            self.jobs_finished.labels(kind).inc()
        if kind == "stage_changed":
            for state in job.stages:
                if state.status.value == "completed" and state.started_at and state.finished_at:
                    key = (job.job_id, state.name, state.attempts)
                    if key not in self._observed:
                        self._observed.add(key)
                        seconds = (state.finished_at - state.started_at).total_seconds()
                        self.stage_seconds.labels(state.name).observe(seconds)
        if job.status.terminal:
            self._observed = {k for k in self._observed if k[0] != job.job_id}


class LoopLagMonitor:
    """Schedules a tick every `interval` and records how late it ran."""

    def __init__(self, metrics: Metrics, interval: float = 0.1, keep: int = 6000) -> None:
        self.metrics = metrics
        self.interval = interval
        self.samples: list[float] = []
        self.keep = keep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="loop-lag")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - before - self.interval)
            self.metrics.loop_lag.observe(lag)
            self.samples.append(lag)
            if len(self.samples) > self.keep:
                del self.samples[: len(self.samples) - self.keep]
            if lag > LAG_WARN_SECONDS:
                log.warning("event loop lag %.0f ms", lag * 1000, extra={"lag_ms": round(lag * 1000)})

    def percentile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
