"""Terminal rendering shared by `klipstream analyze` (in-process) and `klipstream watch` (SSE).

Both feed the same job JSON shapes: a whole job (in-process snapshots, SSE `snapshot` and
terminal events), a `stage` event (every stage) or a `progress` event (only the running stages).
So one board draws a bar per stage, with the stage's rate and ETA measured from its own progress,
plus an overall bar whose ETA is the server's (which knows the critical path).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TaskProgressColumn, TextColumn
from rich.table import Column, Table
from rich.text import Text

from klipstream.models import TERMINAL_STATUSES

ICONS = {
    "pending": ("·", "dim"),
    "running": ("▶", "cyan"),
    "completed": ("✓", "green"),
    "failed": ("✗", "red"),
    "unavailable": ("–", "yellow"),
    "skipped": ("↷", "dim"),
    "cancelled": ("■", "magenta"),
    "queued": ("·", "dim"),
}


def hms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:  # None, NaN or negative
        return "-:--:--"
    whole = round(seconds)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _epoch(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class RateColumn(ProgressColumn):
    """How fast a stage advances: times real time when the media length is known, else %/s."""

    def __init__(self, board: JobBoard) -> None:
        super().__init__(table_column=Column(no_wrap=True, min_width=10, justify="right"))
        self.board = board

    def render(self, task: Task) -> Text:
        if task.fields.get("overall") or task.fields.get("status") != "running" or not task.speed:
            return Text("")
        duration = self.board.media_seconds
        if duration:
            return Text(f"{task.speed * duration / 100:.1f}× rt", style="progress.data.speed")
        return Text(f"{task.speed:.2f} %/s", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """Remaining time: the server's estimate for the whole job, the measured rate for a stage."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True, min_width=12))

    def render(self, task: Task) -> Text:
        status = task.fields.get("status")
        if task.fields.get("overall"):
            if status in TERMINAL_STATUSES:
                return Text("")
            return Text(f"ETA {hms(task.fields.get('eta'))}", style="progress.remaining")
        if status != "running":
            return Text("")
        return Text(f"ETA {hms(task.time_remaining)}", style="progress.remaining")


class ElapsedColumn(ProgressColumn):
    """Wall time of a stage from its own timestamps, so a board opened mid-job shows the truth."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True, min_width=8))

    def render(self, task: Task) -> Text:
        started = task.fields.get("started")
        if started is None:
            return Text("")
        finished = task.fields.get("finished") or time.time()
        return Text(hms(max(0.0, finished - started)), style="progress.elapsed")


class StatusColumn(ProgressColumn):
    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True, min_width=22))

    def render(self, task: Task) -> Text:
        icon, style = ICONS.get(task.fields.get("status", "pending"), ("?", ""))
        return Text(f"{icon} {task.description:<20}", style=style if not task.fields.get("overall") else "bold")


class JobBoard:
    """Live bars for one job. Use as a context manager around the updates."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.media_seconds: float | None = None
        wide = console.width >= 100  # narrow terminals keep the bar, percentage, ETA and message
        columns: list[ProgressColumn] = [
            StatusColumn(),
            BarColumn(bar_width=16, table_column=Column(no_wrap=True, min_width=16)),
            TaskProgressColumn(table_column=Column(no_wrap=True, min_width=5, justify="right")),
        ]
        if wide:
            columns += [ElapsedColumn(), RateColumn(self)]
        columns += [
            EtaColumn(),
            TextColumn(
                "{task.fields[detail]}",
                style="dim",
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=48),
            ),
        ]
        self.progress = Progress(
            *columns,
            console=console,
            refresh_per_second=8,
            speed_estimate_period=20.0,
        )
        self.overall: TaskID = self.progress.add_task(
            "Overall", total=100, overall=True, status="queued", eta=None, detail="", started=None, finished=None
        )
        self.stages: dict[str, TaskID] = {}
        self.status = "queued"

    def __enter__(self) -> JobBoard:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.refresh()
        self.progress.stop()

    # --- feeding ---
    def update_job(self, job: Mapping[str, Any]) -> None:
        """A whole job document (or a `stage` event, which carries every stage)."""
        video = job.get("video") or {}
        if video.get("duration_seconds"):
            self.media_seconds = float(video["duration_seconds"])
        self.update_stages(job.get("stages") or [])
        self._update_overall(job)

    def update_stages(self, stages: Iterable[Mapping[str, Any]]) -> None:
        for stage in stages:
            self._update_stage(stage)

    def on_event(self, event: str, data: Mapping[str, Any]) -> None:
        """One SSE event from the job stream."""
        if event in ("snapshot", "stage", *TERMINAL_STATUSES):
            self.update_job(data)
        elif event == "progress":
            self.update_stages(data.get("stages") or [])
            self._update_overall(data)

    # --- internals ---
    def _update_overall(self, job: Mapping[str, Any]) -> None:
        progress = job.get("progress") or {}
        self.status = str(job.get("status") or self.status)
        detail = progress.get("current_stage") or ""
        self.progress.update(
            self.overall,
            completed=float(progress.get("percentage") or 0.0),
            status=self.status,
            eta=progress.get("estimated_completion_seconds"),
            detail=detail,
        )

    def _update_stage(self, stage: Mapping[str, Any]) -> None:
        name = str(stage.get("name"))
        status = str(stage.get("status") or "running")  # progress events list running stages only
        fraction = float(stage.get("progress") or 0.0)
        completed = 100.0 if status == "completed" else 100.0 * fraction
        detail = stage.get("message") or ""
        if status == "failed" and stage.get("error"):
            detail = stage["error"].get("message", detail)
        task_id = self.stages.get(name)
        fields: dict[str, Any] = {"status": status, "detail": _clip(str(detail), 60)}
        if "started_at" in stage:
            fields["started"] = _epoch(stage.get("started_at"))
            fields["finished"] = _epoch(stage.get("finished_at"))
        if task_id is None:
            fields.setdefault("started", time.time() if status == "running" else None)
            fields.setdefault("finished", None)
            label = name.replace("_", " ")
            self.stages[name] = self.progress.add_task(label, total=100, completed=completed, overall=False, **fields)
            return
        task = self.progress.tasks[task_id]
        if completed < task.completed:  # a retried stage starts again: old rate samples are void
            self.progress.reset(task_id, total=100, completed=completed, **fields)
        else:
            self.progress.update(task_id, completed=completed, **fields)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- summaries after the job ---
def highlights_table(highlights: list[Mapping[str, Any]]) -> Table:
    table = Table(title="Highlights", title_justify="left", expand=False, show_lines=False)
    table.add_column("#", justify="right", style="bold")
    table.add_column("Time", no_wrap=True)
    table.add_column("Score", justify="right")
    table.add_column("Emotion")
    table.add_column("Why", overflow="fold", ratio=1)
    for item in highlights:
        start, end = item.get("start_time"), item.get("end_time")
        score = item.get("score", item.get("highlight_score"))
        table.add_row(
            str(item.get("rank", "")),
            f"{hms(_float(start))}–{hms(_float(end))}",
            f"{score:.3f}" if isinstance(score, int | float) else "",
            str(item.get("dominant_emotion") or ""),
            str(item.get("reason") or item.get("why") or ""),
        )
    return table


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def artifacts_table(files: Mapping[str, str], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("Artifact")
    table.add_column("Location", overflow="fold")
    for key, where in sorted(files.items()):
        table.add_row(key, where)
    return table


_CLIP_FILES = ("clip", "vertical", "thumbnail", "clip_srt", "clip_vtt")  # in the order a person wants them


def split_clip_files(files: Mapping[str, str]) -> tuple[dict[int, dict[str, str]], dict[str, str]]:
    """Per-highlight files ({n: {family: where}}) apart from the rest, so each clip gets one row."""
    per: dict[int, dict[str, str]] = {}
    rest: dict[str, str] = {}
    families = ("clip_srt", "clip_vtt", "clip", "vertical", "thumbnail")
    for key, where in files.items():
        family, _, number = key.rpartition("_")
        if family in families and number.isdigit():
            per.setdefault(int(number), {})[family] = where
        else:
            rest[key] = where
    return per, rest


def clips_table(per: Mapping[int, Mapping[str, str]], highlights: list[Mapping[str, Any]]) -> Table:
    """One row per highlight, its files one per line (clip, vertical, thumbnail, captions)."""
    spans = {h.get("rank"): h for h in highlights}
    table = Table(title="Clips", title_justify="left")
    table.add_column("#", justify="right", style="bold")
    table.add_column("Time", no_wrap=True)
    table.add_column("Files", overflow="fold")
    for n in sorted(per):
        h = spans.get(n, {})
        when = f"{hms(_float(h.get('start_time')))}–{hms(_float(h.get('end_time')))}" if h else ""
        table.add_row(str(n), when, "\n".join(per[n][family] for family in _CLIP_FILES if family in per[n]))
    return table


def print_summary(console: Console, job: Mapping[str, Any], files: Mapping[str, str], files_title: str) -> None:
    """What a person wants after a job: its outcome, the highlights, where everything is."""
    status = job.get("status")
    video = job.get("video") or {}
    title = video.get("title") or job.get("url", "")
    console.print(f"[bold]{title}[/bold]  job {job.get('job_id')}  [bold]{status}[/bold]")
    for warning in job.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if status == "failed" and job.get("error"):
        error = job["error"]
        where = f" in stage {error['stage']}" if error.get("stage") else ""
        console.print(f"[red]Failed{where}:[/red] {error.get('message')} ({error.get('error_type')})")
        if error.get("suggested_action"):
            console.print(f"[bold]What to do:[/bold] {error['suggested_action']}")
    highlights = job.get("highlights") or []
    if highlights:
        console.print(highlights_table(highlights))
    elif status == "completed":
        console.print("No highlights were found.")
    per_clip, files = split_clip_files(files)
    if per_clip:
        console.print(clips_table(per_clip, highlights))
    if files:
        console.print(artifacts_table(files, files_title))
