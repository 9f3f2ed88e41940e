"""What every `klipstream` command shares: exit codes and the one-line error."""

from __future__ import annotations

from typing import Any

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


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
