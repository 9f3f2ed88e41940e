"""Child processes that are awaited, bounded in time, and killed with their children on cancel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence

from klipstream.errors import ProcessingTimeout

# What a child process may inherit: locale, paths, the interpreter's environment, TLS trust and
# proxies. Nothing else: the service's keys and secrets stay in this process.
CHILD_ENV_ALLOWED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "SYSTEMROOT",
    }
)


def child_env(**extra: str) -> dict[str, str]:
    """A minimal environment for a child process (plus `extra`)."""
    env = {k: v for k, v in os.environ.items() if k in CHILD_ENV_ALLOWED or k.startswith("LC_")}
    env.update(extra)
    return env


class ProcessFailed(Exception):
    def __init__(self, returncode: int, tail: list[str]) -> None:
        super().__init__(f"exit code {returncode}")
        self.returncode = returncode
        self.tail = tail


async def run_process(
    args: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    keep_lines: int = 40,
) -> list[str]:
    """Run `args`, feed each output line (stdout and stderr merged) to `on_line`.

    The child gets `env`, or else the minimal `child_env()`, never this process's whole environment.
    Returns the last `keep_lines` lines. Raises ProcessFailed on a non-zero exit and
    ProcessingTimeout past `timeout`. The child runs in its own process group so that cancelling
    kills whatever it started too.
    """
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        env=child_env() if env is None else env,
        cwd=cwd,
        start_new_session=True,
    )
    tail: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                tail.append(line)
                del tail[:-keep_lines]
                if on_line is not None:
                    on_line(line)
            returncode = await proc.wait()
    except TimeoutError:
        await kill_process_group(proc)
        raise ProcessingTimeout(f"{os.path.basename(args[0])} did not finish within {timeout:.0f} s") from None
    except BaseException:
        await kill_process_group(proc)
        raise
    if returncode != 0:
        raise ProcessFailed(returncode, tail)
    return tail


async def kill_process_group(proc: asyncio.subprocess.Process, grace: float = 0.5) -> None:
    """SIGTERM the group, SIGKILL what is left after `grace` seconds, and reap the child."""
    if proc.returncode is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), wait)
            return
        except TimeoutError:
            continue
