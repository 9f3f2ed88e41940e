"""The `klipstream` command line: argument parsing, `serve`, and the entry point.

`serve` runs the service; `analyze` runs one job in this process through the same JobService and
pipeline (klipstream.cli.local); `submit`, `status`, `watch`, `cancel` and `jobs` talk to a running
server (klipstream.cli.remote); `db upgrade` applies the schema migrations and `db copy` moves an SQLite
store into PostgreSQL (klipstream.cli.db).
Every failure ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from klipstream import __version__
from klipstream.cli.common import EXIT_CODES_HELP, EXIT_INTERRUPTED, EXIT_USAGE, PRIORITIES, CliError
from klipstream.cli.local import cmd_analyze
from klipstream.cli.remote import cmd_cancel, cmd_jobs, cmd_status, cmd_submit, cmd_watch
from klipstream.config import ConfigError, Settings, env_table
from klipstream.errors import DatabaseUnavailable
from klipstream.models import JobStatus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klipstream",
        description="KlipStream Analysis: transcript, chat analytics and highlight moments of Twitch VODs.",
        epilog="Run `klipstream COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"klipstream {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(commands)
    _add_db(commands)
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


def _add_clip_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clips",
        action="store_true",
        help="cut an MP4 clip, thumbnail and captions per highlight, plus EDL/FCP XML/OTIO edit lists "
        "(fetches the video)",
    )
    parser.add_argument(
        "--vertical", action="store_true", help="with --clips: also a 9:16 version with burned-in captions"
    )
    parser.add_argument(
        "--fill", choices=["blur", "crop"], default="blur", help="vertical layout: blurred fill or centre crop"
    )


def clip_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """`options.clips` from the clip flags; --vertical alone implies --clips."""
    if not (getattr(args, "clips", False) or getattr(args, "vertical", False)):
        return None
    return {"vertical": bool(args.vertical), "fill": args.fill}


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


def _add_db(commands: Any) -> None:
    db = commands.add_parser(
        "db",
        help="manage the job database",
        description="Manage the job database: KLIPSTREAM_DATABASE_URL, else the SQLite file in the data directory.",
    )
    actions = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = actions.add_parser(
        "upgrade",
        help="apply the schema migrations",
        description="Bring the database's schema to this version's (the server also does this at start).",
    )
    upgrade.set_defaults(func=_cmd_db_upgrade)
    copy = actions.add_parser(
        "copy",
        help="copy an SQLite job store into PostgreSQL",
        description=(
            "Copy the jobs (with their results and stages), idempotency keys and stage timings of an SQLite job "
            "store into PostgreSQL, in one transaction, after bringing both schemas to this version's. Running "
            "jobs arrive queued, to be claimed by any instance. Rows the target holds already are left as they "
            "are, so running the copy again copies only what is missing. Stop the server using the SQLite file "
            "first: the copy refuses a file that is in use."
        ),
        epilog="Exit codes: 0 copied, 2 usage error (bad source file, file in use), 3 database unreachable or refused.",
    )
    copy.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="FILE",
        help="the SQLite file (klipstream.sqlite3 in the data directory)",
    )
    copy.add_argument(
        "--to", metavar="URL", help="the PostgreSQL database, postgresql://… (default: $KLIPSTREAM_DATABASE_URL)"
    )
    copy.set_defaults(func=_cmd_db_copy)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from klipstream.cli.db import cmd_db_upgrade  # asyncpg is imported only by the commands that use it

    return cmd_db_upgrade(args)


def _cmd_db_copy(args: argparse.Namespace) -> int:
    from klipstream.cli.db import cmd_db_copy

    return cmd_db_copy(args)


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
    _add_clip_flags(analyze)
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
    _add_clip_flags(submit)
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
    jobs.add_argument("--status", choices=[s.value for s in JobStatus])
    jobs.add_argument("--limit", type=int, default=20, help="how many (1-200, default 20)")
    jobs.add_argument("--json", action="store_true", help="print the page as JSON")
    jobs.set_defaults(func=cmd_jobs)


# --- serve ---
def cmd_serve(args: argparse.Namespace) -> int:
    from klipstream.logs import configure_logging
    from klipstream.server import StartupError, preflight, run_server

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "data_dir": args.data_dir}.items() if v}
    if "data_dir" in overrides:
        overrides["data_dir"] = Path(overrides["data_dir"])
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    try:
        preflight(settings)
        run_server(settings)
    except StartupError as exc:
        print(f"klipstream: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseUnavailable as exc:  # e.g. PostgreSQL down at start: one line, exit 3
        raise CliError(f"cannot start: {exc.message}") from None
    return 0


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
