"""The commands that talk to a running server: submit, status, watch, cancel, jobs.

`watch` (and `submit --watch`) follow the job's event stream, reconnecting with Last-Event-ID, and
draw the same board as `klipstream analyze`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

from klipstream import __version__
from klipstream.cli.common import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, CliError, stderr_console
from klipstream.models import TERMINAL_STATUSES
from klipstream.sse import EventTooLarge, SseParser


def default_server() -> str:
    return os.environ.get("KLIPSTREAM_SERVER") or f"http://127.0.0.1:{os.environ.get('PORT') or 8080}"


# --- talking to a server ---
@dataclass
class Remote:
    """One server: its base URL, the API key, and an aiohttp session."""

    base: str
    api_key: str | None
    timeout: float
    session: Any = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Remote:
        base = (args.server or default_server()).rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise CliError(f"--server must be an http(s) URL, got {base!r}", EXIT_USAGE)
        return cls(base, args.api_key or os.environ.get("KLIPSTREAM_API_KEY") or None, args.timeout)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Remote]:
        import aiohttp

        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
        ) as self.session:
            yield self

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"klipstream-cli/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {**headers, **(extra or {})}

    def url(self, path: str) -> str:
        return urljoin(self.base + "/", path)

    async def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        import aiohttp

        try:
            async with self.session.request(method, self.url(path), json=body, headers=self.headers(headers)) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise CliError(
                f"cannot reach the server at {self.base} ({exc.os_error or exc}); is `klipstream serve` "
                "running? Use --server URL to point elsewhere."
            ) from None
        except aiohttp.ClientError as exc:
            raise CliError(f"the connection to {self.base} failed: {exc}") from None
        except TimeoutError:
            raise CliError(f"the server at {self.base} did not answer within {self.timeout:g} s") from None
        data = _json_or_none(text)
        if status >= 400:
            raise CliError(_problem_line(status, data, text, self))
        return data


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _problem_line(status: int, data: Any, text: str, remote: Remote) -> str:
    if isinstance(data, dict) and "title" in data:
        line = f"{data['title']} (HTTP {status})"
        if data.get("detail"):
            line += f": {data['detail']}"
        for item in data.get("errors") or []:
            line += f" [{item.get('field')}: {item.get('message')}]"
    else:
        line = f"the server answered HTTP {status}: {' '.join(text.split())[:200]}"
    if status == 401:
        line += " Pass --api-key or set KLIPSTREAM_API_KEY." if not remote.api_key else " Check the API key."
    return line


def _job_path(job_id: str) -> str:
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise CliError(f"{job_id!r} is not a job id", EXIT_USAGE)
    return f"/api/v1/analysis/{quote(job_id)}"


def _remote(args: argparse.Namespace, work: Callable[[Remote], Any]) -> int:
    remote = Remote.from_args(args)

    async def main() -> int:
        async with remote.open():
            return int(await work(remote))

    return asyncio.run(main())


def cmd_submit(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"url": _submit_url(args.url), "priority": args.priority}
    if args.chat_url:
        body["chat_url"] = args.chat_url
    if args.callback_url:
        body["callback_url"] = args.callback_url
    options: dict[str, Any] = {}
    if args.force:
        options["force"] = True
    from klipstream.cli.main import clip_options

    if (clips := clip_options(args)) is not None:
        options["clips"] = clips
    if options:
        body["options"] = options
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None

    async def work(remote: Remote) -> int:
        answer = await remote.call("POST", "/api/v1/analysis", body, headers)
        if args.json and not args.watch:
            print(json.dumps(answer, indent=2))
            return EXIT_OK
        note = " (already queued or running: this is the existing job)" if answer.get("deduplicated") else ""
        position = f", position {answer['queue_position']} in the queue" if answer.get("queue_position") else ""
        err = stderr_console()
        err.print(f"Submitted job [bold]{answer['job_id']}[/bold] ({answer['status']}{position}){note}")
        if not args.watch:
            print(answer["job_id"])
            err.print(f"Follow it with: klipstream watch {answer['job_id']}")
            return EXIT_OK
        return await _watch(remote, answer["job_id"], args.json)

    return _remote(args, work)


def _submit_url(value: str) -> str:
    if "://" not in value and Path(value).expanduser().is_file():
        return str(Path(value).expanduser().resolve())  # only accepted by servers that allow local files
    return value


def cmd_status(args: argparse.Namespace) -> int:
    async def work(remote: Remote) -> int:
        job = await remote.call("GET", _job_path(args.job_id))
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            _print_status(remote, job)
        return _exit_for(job["status"], finished_only=False)

    return _remote(args, work)


def _exit_for(status: str, *, finished_only: bool = True) -> int:
    if status == "completed" or (not finished_only and status in ("queued", "running")):
        return EXIT_OK
    return EXIT_JOB_FAILED


def _print_status(remote: Remote, job: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from klipstream.cli.progress import ICONS, hms, print_summary

    console = Console()
    progress = job.get("progress") or {}
    if job["status"] in ("queued", "running"):
        eta = progress.get("estimated_completion_seconds")
        where = f", position {job['queue_position']}" if job.get("queue_position") else ""
        console.print(
            f"{job['status']}{where}: {progress.get('percentage', 0):.1f}% "
            f"({progress.get('current_stage')}), ETA {hms(eta)}"
        )
    table = Table(title="Stages", title_justify="left")
    for column in ("Stage", "Status", "Progress", "Note"):
        table.add_column(column)
    for stage in job.get("stages") or []:
        icon, style = ICONS.get(stage["status"], ("?", ""))
        note = (stage.get("error") or {}).get("message") or stage.get("message") or ""
        table.add_row(stage["name"], f"[{style}]{icon} {stage['status']}[/]", f"{100 * stage['progress']:.0f}%", note)
    console.print(table)
    files = {key: remote.url(url) for key, url in (job.get("results") or {}).items()}
    print_summary(console, job, files, "Artifacts")


def cmd_watch(args: argparse.Namespace) -> int:
    return _remote(args, lambda remote: _watch(remote, args.job_id, args.json))


async def _watch(remote: Remote, job_id: str, as_json: bool) -> int:
    from rich.console import Console

    from klipstream.cli.progress import JobBoard, print_summary

    job = await remote.call("GET", _job_path(job_id))
    err = stderr_console()
    final: tuple[str, dict[str, Any]] | None = None
    show = not as_json or err.is_terminal
    board = JobBoard(err) if show else None
    interrupted = False
    try:
        with board if board is not None else contextlib.nullcontext():
            if board is not None:
                board.update_job(job)
            final = await follow_stream(remote, remote.url(job["stream_url"]), board.on_event if board else None)
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
    if interrupted or final is None:
        err.print(f"Stopped watching; job {job_id} goes on on the server.")
        return EXIT_INTERRUPTED
    kind, document = final
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        files = {key: remote.url(url) for key, url in (document.get("results") or {}).items()}
        print_summary(Console(), document, files, "Artifacts")
    return EXIT_OK if kind == "completed" else EXIT_JOB_FAILED


# --- Server-Sent Events ---
MAX_RECONNECTS = 20  # consecutive failed connection attempts before giving up
STREAM_READ_TIMEOUT = 45.0  # the server sends a heartbeat every 15 s


async def follow_stream(
    remote: Remote,
    stream_url: str,
    on_event: Callable[[str, dict[str, Any]], None] | None,
) -> tuple[str, dict[str, Any]]:
    """Follow a job stream to its terminal event, reconnecting with Last-Event-ID.

    The server replays what was missed from its buffer (or sends a fresh snapshot), so a dropped
    connection or a `reconnect` event during a server restart loses nothing.
    """
    import aiohttp

    parser = SseParser()
    retry_seconds = 3.0
    failures = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(remote.timeout, 15.0), sock_read=STREAM_READ_TIMEOUT)
    while True:
        headers = remote.headers({"Accept": "text/event-stream", "Cache-Control": "no-cache"})
        if parser.last_id:
            headers["Last-Event-ID"] = parser.last_id
        try:
            async with remote.session.get(stream_url, headers=headers, timeout=timeout) as resp:
                if resp.status == 503:
                    retry_seconds = float(resp.headers.get("Retry-After", retry_seconds))
                    raise ConnectionError("server is restarting")
                if resp.status >= 400:
                    raise CliError(_problem_line(resp.status, _json_or_none(await resp.text()), "", remote))
                failures = 0
                async for chunk in resp.content.iter_any():
                    try:
                        events = parser.feed(chunk)
                    except EventTooLarge as exc:
                        raise CliError(str(exc)) from None
                    for event in events:
                        if event.retry:
                            retry_seconds = event.retry / 1000
                        data = _json_or_none(event.data)
                        if not isinstance(data, dict):
                            continue
                        if event.event == "reconnect":
                            retry_seconds = data.get("retry_ms", retry_seconds * 1000) / 1000
                            raise ConnectionResetError(data.get("reason", "server asked to reconnect"))
                        if on_event is not None:
                            on_event(event.event, data)
                        if event.event in TERMINAL_STATUSES:
                            return event.event, data
                raise ConnectionResetError("stream ended early")
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            failures += 1
            if failures > MAX_RECONNECTS:
                raise CliError(f"lost the event stream from {remote.base} and could not reconnect: {exc}") from None
        parser = SseParser(last_id=parser.last_id)  # a half-received event is discarded, as browsers do
        await asyncio.sleep(min(30.0, retry_seconds))


def cmd_cancel(args: argparse.Namespace) -> int:
    async def work(remote: Remote) -> int:
        job = await remote.call("DELETE", _job_path(args.job_id))
        state = "cancelled" if job["status"] == "cancelled" else f"{job['status']} (cancellation requested)"
        print(f"{job['job_id']}: {state}")
        return EXIT_OK

    return _remote(args, work)


def cmd_jobs(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 200:
        raise CliError("--limit must be between 1 and 200", EXIT_USAGE)

    async def work(remote: Remote) -> int:
        from rich.console import Console
        from rich.table import Table

        query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
        page = await remote.call("GET", "/api/v1/jobs" + query)
        if args.json:
            print(json.dumps(page, indent=2))
            return EXIT_OK
        table = Table(title="Jobs", title_justify="left")
        for column in ("Job", "Video", "Status", "Progress", "Stage", "Updated"):
            table.add_column(column, no_wrap=column in ("Job", "Video", "Status"))
        for job in page["jobs"]:
            progress = job["progress"]
            table.add_row(
                job["job_id"],
                job["video_id"],
                job["status"],
                f"{progress['percentage']:.0f}%",
                progress["current_stage"],
                job["updated_at"][:19].replace("T", " "),
            )
        Console().print(table)
        return EXIT_OK

    return _remote(args, work)
