"""The `klipstream` command.

`serve` runs the service; `analyze` runs one job in this process through the same JobService and
pipeline; `submit`, `status`, `watch`, `cancel` and `jobs` talk to a running server. Every failure
ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

from klipstream import __version__
from klipstream.config import ConfigError, Settings, env_table

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job failed or was cancelled by someone else
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_UNREACHABLE = 3  # the server could not be reached or refused the request
EXIT_INTERRUPTED = 130  # Ctrl-C
PRIORITIES = ("low", "normal", "high", "urgent")
EXIT_CODES_HELP = (
    "Exit codes: 0 completed, 1 job failed or cancelled, 2 usage or configuration error, "
    "3 server unreachable or request refused, 130 interrupted (Ctrl-C)."
)


class CliError(Exception):
    """A failure to report as one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_UNREACHABLE) -> None:
        super().__init__(message)
        self.code = code


# --- argument parsing ---
def default_server() -> str:
    return os.environ.get("KLIPSTREAM_SERVER") or f"http://127.0.0.1:{os.environ.get('PORT') or 8080}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klipstream",
        description="KlipStream Analysis: transcript, chat analytics and highlight moments of Twitch VODs.",
        epilog="Run `klipstream COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"klipstream {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(commands)
    _add_analyze(commands)
    remote = argparse.ArgumentParser(add_help=False)
    group = remote.add_argument_group("server connection")
    group.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="base URL of the service (default: $KLIPSTREAM_SERVER, else http://127.0.0.1:$PORT "
        "with PORT defaulting to 8080)",
    )
    group.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="API key sent as 'Authorization: Bearer KEY' (default: $KLIPSTREAM_API_KEY)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for each answer from the server (default: 30)",
    )
    _add_remote(commands, remote)
    return parser


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service with settings from the environment.",
        epilog="Environment variables:\n"
        + "\n".join(f"  {name} (default: {default!r})" for name, default, _ in env_table()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="listen address (overrides KLIPSTREAM_HOST)")
    serve.add_argument("--port", type=int, help="listen port (overrides PORT)")
    serve.add_argument("--data-dir", help="job store and artifacts directory (overrides KLIPSTREAM_DATA_DIR)")
    serve.set_defaults(func=cmd_serve)


def _add_analyze(commands: Any) -> None:
    analyze = commands.add_parser(
        "analyze",
        help="analyse one VOD or media file in this process, with live progress",
        description=(
            "Run one analysis job in this process with the same pipeline as the server: download (or read) the "
            "media, fetch or read the chat, transcribe, analyse, and find the highlights. Shows a live progress "
            "bar per stage, then the highlights and the files written. Ctrl-C cancels the job cleanly (child "
            "processes are stopped and partial files removed) and exits with 130."
        ),
        epilog=(
            "Settings not given as options come from the same environment variables as `klipstream serve` "
            "(e.g. KLIPSTREAM_WHISPER_DEVICE, KLIPSTREAM_TOP_HIGHLIGHTS, KLIPSTREAM_LLM_BASE_URL); local files and "
            "loopback URLs are always allowed here.\n" + EXIT_CODES_HELP
        ),
    )
    analyze.add_argument(
        "source", metavar="URL|FILE", help="a Twitch VOD URL, any URL yt-dlp understands, or a local media file"
    )
    analyze.add_argument(
        "--chat",
        metavar="FILE|URL",
        help="chat archive to use instead of Twitch's chat replay: TwitchDownloader JSON or CSV time,username,message",
    )
    analyze.add_argument(
        "--out", metavar="DIR", type=Path, help="directory for the artifacts (default: ./klipstream-<video id>)"
    )
    analyze.add_argument(
        "--priority",
        choices=PRIORITIES,
        default="normal",
        help="job priority (matters only with several jobs; default: normal)",
    )
    analyze.add_argument(
        "--model",
        metavar="NAME|DIR",
        help="faster-whisper model: a name or a local model directory "
        "(default: $KLIPSTREAM_WHISPER_MODEL, else the bundled tiny.en)",
    )
    analyze.add_argument("--language", metavar="CODE", help="spoken language, e.g. en (default: detected)")
    analyze.add_argument("--top", type=int, metavar="N", help="how many highlights to return (1-100)")
    analyze.add_argument("--video", action="store_true", help="also keep a video rendition")
    analyze.add_argument(
        "--json",
        action="store_true",
        help="print only the final job as JSON on stdout (results map each artifact to its file); "
        "progress is still drawn on stderr when it is a terminal",
    )
    analyze.add_argument("-v", "--verbose", action="store_true", help="show the service's log lines")
    analyze.set_defaults(func=cmd_analyze)


def _add_remote(commands: Any, remote: argparse.ArgumentParser) -> None:
    submit = commands.add_parser(
        "submit",
        parents=[remote],
        help="submit a VOD to a running server",
        description="Submit a VOD URL to a running KlipStream server and print the new job's id.",
        epilog="Follow the job with `klipstream watch JOB_ID`. " + EXIT_CODES_HELP,
    )
    submit.add_argument("url", help="Twitch VOD URL or any media URL the server accepts")
    submit.add_argument("--chat-url", metavar="URL", help="chat archive URL (TwitchDownloader JSON or CSV)")
    submit.add_argument("--callback-url", metavar="URL", help="URL that receives signed webhooks for this job")
    submit.add_argument("--priority", choices=PRIORITIES, default="normal", help="queue priority (default: normal)")
    submit.add_argument("--force", action="store_true", help="run even if the same video is already queued/running")
    submit.add_argument("--idempotency-key", metavar="KEY", help="makes retrying this command safe")
    submit.add_argument("--watch", action="store_true", help="follow the job's progress after submitting")
    submit.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser(
        "status",
        parents=[remote],
        help="show one job",
        description="Show a job's status, stages, error, highlights and artifact URLs.",
        epilog=EXIT_CODES_HELP,
    )
    status.add_argument("job_id", metavar="JOB_ID", help="the job's id, as printed by `klipstream submit`")
    status.add_argument("--json", action="store_true", help="print the whole job as JSON")
    status.set_defaults(func=cmd_status)

    watch = commands.add_parser(
        "watch",
        parents=[remote],
        help="follow a job live until it ends",
        description=(
            "Follow a job's Server-Sent-Events stream with a progress bar per stage, reconnecting (with "
            "Last-Event-ID) when the connection drops, then print its highlights and artifact URLs. Ctrl-C "
            "stops watching; the job keeps running on the server."
        ),
        epilog=EXIT_CODES_HELP,
    )
    watch.add_argument("job_id", metavar="JOB_ID", help="the job's id, as printed by `klipstream submit`")
    watch.add_argument("--json", action="store_true", help="print only the final job as JSON")
    watch.set_defaults(func=cmd_watch)

    cancel = commands.add_parser(
        "cancel",
        parents=[remote],
        help="cancel a job",
        description="Cancel a queued or running job.",
        epilog=EXIT_CODES_HELP,
    )
    cancel.add_argument("job_id", metavar="JOB_ID", help="the job's id, as printed by `klipstream submit`")
    cancel.set_defaults(func=cmd_cancel)

    jobs = commands.add_parser(
        "jobs",
        parents=[remote],
        help="list recent jobs",
        description="List jobs, newest first.",
        epilog=EXIT_CODES_HELP,
    )
    jobs.add_argument("--status", choices=("queued", "running", "completed", "failed", "cancelled"))
    jobs.add_argument("--limit", type=int, default=20, help="how many (1-200, default 20)")
    jobs.add_argument("--json", action="store_true", help="print the page as JSON")
    jobs.set_defaults(func=cmd_jobs)


# --- serve ---
def cmd_serve(args: argparse.Namespace) -> int:
    from klipstream.logs import configure_logging
    from klipstream.server import run_server

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "data_dir": args.data_dir}.items() if v}
    if "data_dir" in overrides:
        overrides["data_dir"] = Path(overrides["data_dir"])
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    run_server(settings)
    return 0


# --- analyze ---
def _source(value: str, what: str) -> str:
    """URLs pass through; anything else must be an existing file, sent as an absolute path."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise CliError(f"{what} {value!r} is neither a URL nor an existing file", EXIT_USAGE)
    return str(path.resolve())


def cmd_analyze(args: argparse.Namespace) -> int:
    from rich.console import Console

    from klipstream.errors import InvalidVideoUrl
    from klipstream.models import JobOptions, SubmitRequest
    from klipstream.server import validate_urls
    from klipstream.urls import video_id_for

    overrides: dict[str, Any] = {"log_format": "text"}
    if args.model:
        overrides["whisper_model"] = args.model
    base = Settings.from_env(**overrides)
    options: dict[str, Any] = {"force": True, "include_video": args.video}
    if args.top is not None:
        options["top_n"] = args.top
    if args.language:
        options["language"] = args.language
    try:
        request = SubmitRequest(
            url=_source(args.source, "source"),
            chat_url=_source(args.chat, "--chat") if args.chat else None,
            priority=args.priority,
            options=JobOptions(**options),
        )
        from klipstream.local_run import local_settings

        validate_urls(request, local_settings(base, base.data_dir))
    except InvalidVideoUrl as exc:
        raise CliError(exc.message, EXIT_USAGE) from None
    except ValueError as exc:  # pydantic's ValidationError
        raise CliError(_pydantic_message(exc), EXIT_USAGE) from None
    out_dir = args.out or Path(f"klipstream-{video_id_for(request.url)}")
    err = Console(stderr=True)
    _configure_cli_logging(err, args.verbose)
    show_progress = not args.json or err.is_terminal
    return asyncio.run(_analyze(base, request, out_dir, args.json, show_progress, err))


def _pydantic_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        field_name = ".".join(str(p) for p in first["loc"])
        return f"invalid {field_name}: {first['msg']}"
    return str(exc)


def _configure_cli_logging(console: Any, verbose: bool) -> None:
    """Log lines go above the live bars (through rich), and only errors unless --verbose."""
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def _analyze(base: Settings, request: Any, out_dir: Path, as_json: bool, show_progress: bool, err: Any) -> int:
    from rich.console import Console

    from klipstream.cli_progress import JobBoard, print_summary
    from klipstream.local_run import analyze

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        if not stop.is_set():
            err.print("[yellow]Cancelling the job…[/yellow]")
        stop.set()

    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' proactor loop
        loop.add_signal_handler(signal.SIGINT, interrupt)
        loop.add_signal_handler(signal.SIGTERM, interrupt)
    board = JobBoard(err) if show_progress else None
    watch: Callable[[Any], None] | None = None
    if board is not None:
        board_ref = board

        def watch(job: Any) -> None:
            board_ref.update_job(job.model_dump(mode="json", include={"status", "progress", "stages", "video"}))

    try:
        with board if board is not None else contextlib.nullcontext():
            result = await analyze(base, request, out_dir, stop=stop, watch=watch)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
    job = result.job.model_dump(mode="json")
    job["results"] = {key: str(path.resolve()) for key, path in result.files.items()}
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        files = {key: _display_path(path) for key, path in result.files.items()}
        print_summary(Console(), job, files, f"Artifacts in {_display_path(out_dir)}")
    if result.interrupted:
        err.print("Cancelled; partial files were removed.")
        return EXIT_INTERRUPTED
    return EXIT_OK if job["status"] == "completed" else EXIT_JOB_FAILED


def _display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


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
    if args.force:
        body["options"] = {"force": True}
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None

    async def work(remote: Remote) -> int:
        answer = await remote.call("POST", "/api/v1/analysis", body, headers)
        if args.json and not args.watch:
            print(json.dumps(answer, indent=2))
            return EXIT_OK
        note = " (already queued or running: this is the existing job)" if answer.get("deduplicated") else ""
        position = f", position {answer['queue_position']} in the queue" if answer.get("queue_position") else ""
        err = _stderr_console()
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

    from klipstream.cli_progress import ICONS, hms, print_summary

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

    from klipstream.cli_progress import JobBoard, print_summary

    job = await remote.call("GET", _job_path(job_id))
    err = _stderr_console()
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


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# --- Server-Sent Events ---
MAX_EVENT_BYTES = 16 * 1024 * 1024  # a whole job document with highlights fits many times over
MAX_RECONNECTS = 20  # consecutive failed connection attempts before giving up
STREAM_READ_TIMEOUT = 45.0  # the server sends a heartbeat every 15 s


@dataclass
class SseEvent:
    event: str
    data: str
    id: str | None = None
    retry: int | None = None


@dataclass
class SseParser:
    """Incremental text/event-stream parser (the WHATWG rules: fields, comments, blank-line dispatch).

    Fed raw chunks rather than lines, because aiohttp's line reader refuses lines over 64 KiB and
    a finished job's document can be longer.
    """

    buffer: bytearray = field(default_factory=bytearray)
    data: list[str] = field(default_factory=list)
    event: str = ""
    last_id: str | None = None  # of the last dispatched event: what Last-Event-ID sends
    id_buffer: str | None = None  # the id field seen so far; counts only once its event is complete
    retry: int | None = None

    def __post_init__(self) -> None:
        self.id_buffer = self.last_id

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self.buffer += chunk
        out: list[SseEvent] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_EVENT_BYTES:
                    raise CliError("the event stream sent a line longer than 16 MiB")
                return out
            line = self.buffer[:end].rstrip(b"\r").decode("utf-8", "replace")
            del self.buffer[: end + 1]
            event = self._line(line)
            if event is not None:
                out.append(event)

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            self.last_id = self.id_buffer
            if not self.data:
                self.event = ""
                return None
            event = SseEvent(self.event or "message", "\n".join(self.data), self.last_id, self.retry)
            self.data, self.event = [], ""
            return event
        if line.startswith(":"):
            return None  # a comment: the server's heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "id" and "\0" not in value:
            self.id_buffer = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


TERMINAL_EVENTS = ("completed", "failed", "cancelled")


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
                    for event in parser.feed(chunk):
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
                        if event.event in TERMINAL_EVENTS:
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


# --- entry point ---
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"klipstream: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"klipstream: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
