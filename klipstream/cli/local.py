"""`klipstream analyze`: one job run in this process, without HTTP.

It builds the same objects the server builds at start-up (store, storage, runner dependencies,
integrations, `JobService`) so a local run goes through exactly the server's queue, runner,
checkpoints and cancellation. The only differences are where files go (a scratch data directory
inside the output directory, so publishing is a hard link and the final move is a rename) and that
nothing is mirrored to Convex.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from klipstream.cli.common import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, CliError
from klipstream.config import Settings
from klipstream.jobs.runtime import job_runtime
from klipstream.jobs.service import JobService
from klipstream.jobs.stage import Stage
from klipstream.models import TERMINAL_STATUSES, Job, SubmitRequest

CANCEL_WAIT_SECONDS = 15.0  # the runner stops stages within ~2 s; this bounds a misbehaving one
WATCH_INTERVAL = 0.1  # how often the progress callback sees the job (the runner emits far more often)


def default_stages() -> list[Stage]:
    from klipstream.stages import default_pipeline

    return default_pipeline()


@contextlib.asynccontextmanager
async def job_service(settings: Settings, stages: list[Stage]) -> AsyncIterator[JobService]:
    """The server's job machinery (klipstream.jobs.runtime), started and torn down around a block."""
    async with job_runtime(settings, stages) as runtime:
        yield runtime.service


@dataclass
class LocalResult:
    job: Job
    files: dict[str, Path] = field(default_factory=dict)  # artifact key -> file in the output directory
    interrupted: bool = False  # cancelled because the user asked (Ctrl-C)


async def run_job(
    service: JobService,
    request: SubmitRequest,
    *,
    stop: asyncio.Event,
    watch: Callable[[Job], None] | None = None,
) -> tuple[Job, bool]:
    """Submit one job and wait for its terminal state; `stop` cancels it through the service.

    `watch` sees the live job every WATCH_INTERVAL, not on every runner event, so rendering costs
    the same whatever the stages report.
    """
    done = asyncio.Event()
    job_id: str | None = None

    def on_event(kind: str, job: Job) -> None:
        if job.job_id == job_id and kind in TERMINAL_STATUSES:
            done.set()

    service.listen(on_event, new_jobs=False)  # it waits for the terminal event only
    outcome = await service.submit(request)
    job_id = outcome.job_id
    job = await service.get(job_id)
    if job.status.terminal:
        done.set()
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(done.wait())]
    interrupted = False
    try:
        while not done.is_set():
            if watch is not None:
                watch(job)
            await asyncio.wait(waiters, timeout=WATCH_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and not done.is_set():
                interrupted = True
                await service.cancel(job_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), CANCEL_WAIT_SECONDS)
                break
    finally:
        for waiter in waiters:
            waiter.cancel()
        service.unlisten(on_event)
    job = await service.get(job_id)
    if watch is not None:
        watch(job)
    return job, interrupted


def local_settings(base: Settings, data_dir: Path) -> Settings:
    """The settings of a local run: local files and loopback URLs allowed, no Convex mirror, and
    the run's own SQLite store even when KLIPSTREAM_DATABASE_URL names a shared database (a local
    job must not appear in a cluster's queue)."""
    from dataclasses import replace

    return replace(
        base,
        data_dir=data_dir,
        allow_local_files=True,
        allow_private_urls=True,
        storage="local",
        public_url="",
        convex_url="",
        database_url="",
        max_running_jobs=max(1, base.max_running_jobs),  # an API-only setting would never run it
    )


async def analyze(
    base: Settings,
    request: SubmitRequest,
    out_dir: Path,
    *,
    stop: asyncio.Event,
    stages: list[Stage] | None = None,
    watch: Callable[[Job], None] | None = None,
) -> LocalResult:
    """Run one job and move its published artifacts into `out_dir`.

    The scratch data directory lives inside `out_dir` (same file system: publishing links, the
    final move renames) and is removed whatever happens, so a cancelled run leaves no partial
    files; an output directory this run created is removed again if it ends up empty.
    """
    created, scratch = await asyncio.to_thread(_make_scratch, out_dir)
    try:
        settings = local_settings(base, scratch)
        async with job_service(settings, stages if stages is not None else default_stages()) as service:
            job, interrupted = await run_job(service, request, stop=stop, watch=watch)
        files = {} if interrupted else await asyncio.to_thread(_collect, settings, job, out_dir)
        return LocalResult(job=job, files=files, interrupted=interrupted)
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
        if created:
            await asyncio.to_thread(_remove_if_empty, out_dir)


def _make_scratch(out_dir: Path) -> tuple[bool, Path]:
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    return created, Path(tempfile.mkdtemp(prefix=".klipstream-", dir=out_dir))


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()  # fails, as wanted, when anything is in it


def _collect(settings: Settings, job: Job, out_dir: Path) -> dict[str, Path]:
    """Move each published artifact from local storage into the output directory."""
    files: dict[str, Path] = {}
    source_dir = settings.artifacts_dir / job.video_id
    for key, url in sorted(job.results.items()):
        name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        source = source_dir / name
        if not name or not source.is_file():
            continue
        dest = out_dir / name
        os.replace(source, dest)
        files[key] = dest
    return files


# --- the `analyze` command ---
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
    from klipstream.network import validate_urls, video_id_for

    overrides: dict[str, Any] = {"log_format": "text"}
    if args.model:
        overrides["whisper_model"] = args.model
    base = Settings.from_env(**overrides)
    options: dict[str, Any] = {"force": True, "include_video": args.video}
    from klipstream.cli.main import clip_options

    if (clips := clip_options(args)) is not None:
        options["clips"] = clips
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
        from klipstream.cli.local import local_settings

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

    from klipstream.cli.local import analyze
    from klipstream.cli.progress import JobBoard, print_summary

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
