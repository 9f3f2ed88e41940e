"""The `klipstream` command: `serve`, `analyze` (one job in this process) and the remote commands."""

from klipstream.cli.common import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from klipstream.cli.main import main

__all__ = ["EXIT_INTERRUPTED", "EXIT_JOB_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "main"]
