"""A job's progress: the weighted percentage that never goes backwards, the stage shown to users,
and the ETA along the critical path of the stage graph.

Nothing here is a constant guess: stages not yet started are predicted from their measured
history (klipstream.jobs.timings), and with no history the ETA is null.
"""

from __future__ import annotations

import time

from klipstream.jobs.stage import Stage
from klipstream.jobs.timings import StageTimings
from klipstream.models import DisplayStage, Job, JobStatus, Progress, StageState, StageStatus


def initial_stage_states(stages: list[Stage]) -> list[StageState]:
    return [StageState(name=s.name, display=s.display) for s in stages]


def compute_progress(
    job: Job, stages: list[Stage], timings: StageTimings, started: dict[str, float] | None = None
) -> Progress:
    """Weighted progress that never goes backwards, and an ETA along the critical path."""
    previous = job.progress
    total_weight = sum(s.weight for s in stages) or 1.0
    done_weight = 0.0
    completed = 0
    for stage in stages:
        state = job.stage(stage.name)
        if state.status.done:
            completed += 1
            done_weight += stage.weight
        elif state.status is StageStatus.RUNNING:
            done_weight += stage.weight * state.progress
    if job.status is JobStatus.COMPLETED:
        percentage = 100.0
    else:
        percentage = min(99.9, max(previous.percentage, round(100.0 * done_weight / total_weight, 1)))
    return Progress(
        percentage=percentage,
        current_stage=current_display(job, stages),
        stages_completed=completed,
        total_stages=len(stages),
        estimated_completion_seconds=estimate_remaining(job, stages, timings, started or {}),
    )


def current_display(job: Job, stages: list[Stage]) -> DisplayStage:
    terminal = {
        JobStatus.COMPLETED: DisplayStage.COMPLETED,
        JobStatus.FAILED: DisplayStage.FAILED,
        JobStatus.CANCELLED: DisplayStage.CANCELLED,
        JobStatus.QUEUED: DisplayStage.QUEUED,
    }
    if job.status in terminal:
        return terminal[job.status]
    for wanted in (StageStatus.RUNNING, StageStatus.PENDING):
        for stage in stages:
            if job.stage(stage.name).status is wanted:
                return stage.display
    return DisplayStage.FINDING_HIGHLIGHTS


def estimate_remaining(job: Job, stages: list[Stage], timings: StageTimings, started: dict[str, float]) -> float | None:
    """Seconds until the last stage ends: measured rates of running stages, history for the rest."""
    if job.status.terminal:
        return 0.0 if job.status is JobStatus.COMPLETED else None
    media_seconds = job.video.duration_seconds if job.video else None
    producers = {key: s.name for s in stages for key in s.provides}
    finish: dict[str, float] = {}
    now = time.monotonic()
    for stage in stages:
        state = job.stage(stage.name)
        if state.status.done:
            finish[stage.name] = 0.0
            continue
        if state.status is StageStatus.RUNNING and stage.name in started:
            elapsed = now - started[stage.name]
            if state.progress >= 0.02 and elapsed >= 1.0:
                remaining: float | None = elapsed * (1.0 - state.progress) / state.progress
            else:
                history = timings.estimate(stage.name, media_seconds)
                remaining = None if history is None else max(0.0, history - elapsed)
        else:
            remaining = timings.estimate(stage.name, media_seconds)
        if remaining is None:
            return None
        deps = [producers[k] for k in (*stage.needs, *stage.uses) if k in producers]
        finish[stage.name] = max((finish.get(d, 0.0) for d in deps), default=0.0) + remaining
    return round(max(finish.values(), default=0.0), 1)
