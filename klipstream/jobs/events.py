"""The events of a job's event stream, as rows of the `job_events` table.

Every change of a job that a stream shows (started, a stage change, progress, the end, a retry or
a shutdown's re-queue) becomes one row, numbered by the job's own sequence (`Job.event_seq`), and
is written in the same transaction as the job change itself (the store's `Effects`): the event
exists if and only if the change does. The row's sequence is the SSE `id` on every instance.

Once the write has committed, the instance that made it hands the rows to its broadcaster (the
live path, in memory); other instances read them from the table when LISTEN/NOTIFY (or their
polling) says there are new ones (klipstream.jobs.cluster), and any instance replays them for a
stream reopened with Last-Event-ID.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from klipstream.jobs.broadcaster import Broadcaster
from klipstream.jobs.store import NO_EFFECTS, Effects, EventRow
from klipstream.models import TERMINAL_STATUSES, Job

# Job change kinds (the runner's and the service's) that streams show as a `stage` event.
STAGE_KINDS = frozenset({"started", "stage_changed", "queued", "requeued"})


def event_type(kind: str | None) -> str | None:
    """The SSE type of a job change, None for changes a stream does not show."""
    if kind is None:
        return None
    if kind in STAGE_KINDS:
        return "stage"
    if kind == "progress" or kind in TERMINAL_STATUSES:
        return kind
    return None


class StreamEvents:
    """Produces the stream's rows of a job change (one of the JobService's effects producers), and
    publishes them to this instance's broadcaster once they have committed.

    `document` renders the terminal event's job (the API's job document); the event is stored and
    encoded once for every subscriber on every instance, so it names no subscriber."""

    def __init__(self, broadcaster: Broadcaster | None = None, document: Callable[[Job], str] | None = None) -> None:
        self.broadcaster = broadcaster
        self.document = document or (lambda job: job.model_dump_json())

    def effects(self, kind: str | None, job: Job) -> Effects:
        type_ = event_type(kind)
        if type_ is None:
            return NO_EFFECTS
        assert kind is not None
        if type_ == "progress":
            data = progress_payload(job)
        elif type_ == "stage":
            data = stage_payload(kind, job)
        else:
            data = self.document(job)
        if self.broadcaster is not None:
            self.broadcaster.writing(job.job_id, job.event_seq)
        job.event_seq += 1  # before the job is encoded: its row names its last event
        return Effects(events=(EventRow(job.job_id, job.event_seq, type_, data),))

    def committed(self, job: Job, effects: Effects) -> None:
        if self.broadcaster is not None and effects.events:
            self.broadcaster.publish(effects.events)


def progress_payload(job: Job) -> str:
    running = [
        {"name": s.name, "display": s.display, "progress": s.progress, "message": s.message}
        for s in job.stages
        if s.status.value == "running"
    ]
    return json.dumps(
        {
            "job_id": job.job_id,
            "status": job.status.value,
            "progress": job.progress.model_dump(mode="json"),
            "stages": running,
        }
    )


def stage_payload(kind: str, job: Job) -> str:
    return json.dumps(
        {
            "job_id": job.job_id,
            "kind": kind,
            "status": job.status.value,
            "progress": job.progress.model_dump(mode="json"),
            "stages": [s.model_dump(mode="json", exclude_none=True) for s in job.stages],
            "video": job.video.model_dump(mode="json") if job.video else None,
        }
    )
