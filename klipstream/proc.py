"""Child processes that are awaited, bounded in time, and killed with their children on cancel.

Work that would hold the GIL for long (parsing a 200 MB chat archive, scoring a million chat
messages) runs as `python -m <module>` in a child: the event loop never competes with it, and
cancelling kills it at once. Parent and child speak a line protocol on stdout: `KSPROGRESS
<fraction> <detail>`, `KSERROR <json>` for a classified failure, and one final `{"result": ...}`
JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from klipstream.errors import (
    ERROR_CLASSES,
    ErrorType,
    InsufficientResources,
    InternalError,
    KlipstreamError,
    ProcessingTimeout,
    classify,
)

PROGRESS_PREFIX = "KSPROGRESS"
ERROR_PREFIX = "KSERROR"

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


# --- the line protocol ---
def error_line(error: KlipstreamError) -> str:
    data = {"type": error.error_type.value, "message": error.message, "code": error.code}
    if error.suggested_action != error.default_action:
        data["action"] = error.suggested_action
    return ERROR_PREFIX + " " + json.dumps(data)


def parse_error_line(line: str, default: type[KlipstreamError] = InternalError) -> KlipstreamError | None:
    if not line.startswith(ERROR_PREFIX + " "):
        return None
    try:
        data = json.loads(line[len(ERROR_PREFIX) + 1 :])
        cls = ERROR_CLASSES.get(ErrorType(data["type"]), default)
        return cls(str(data["message"]), code=str(data.get("code") or "") or None, suggested_action=data.get("action"))
    except (ValueError, KeyError, TypeError):
        return None


def report(fraction: float, detail: str) -> None:
    """In a child: tell the parent how far the work is (one line on stdout)."""
    print(f"{PROGRESS_PREFIX} {min(1.0, max(0.0, fraction)):.4f} {detail}", flush=True)


def child_main(main: Callable[[list[str]], None], argv: list[str]) -> None:
    """Run a child's `main`; a failure leaves as one classified error line and exit code 1."""
    try:
        main(argv)
    except MemoryError:
        print(error_line(InsufficientResources("The server ran out of memory while processing this job.")), flush=True)
        sys.exit(1)
    except Exception as exc:
        error = classify(exc)
        if not isinstance(exc, KlipstreamError):
            traceback.print_exc(file=sys.stdout)  # reaches the parent's log through the output tail
        print(error_line(error), flush=True)
        sys.exit(1)
    sys.exit(0)


async def run_python(
    module: str,
    args: Sequence[str],
    *,
    timeout: float,
    on_progress: Callable[[float, str], None] | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    """Run `python -m module args` as a child speaking the line protocol; return its result.

    A classified error from the child is raised as the same class; a crash (signal, traceback)
    is an InternalError naming the last lines it printed.
    """
    result: list[Any] = []
    errors: list[KlipstreamError] = []

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_PREFIX + " "):
            _, fraction, *detail = line.split(" ", 2)
            with contextlib.suppress(ValueError):
                if on_progress is not None:
                    on_progress(float(fraction), detail[0] if detail else "")
        elif (error := parse_error_line(line)) is not None:
            errors.append(error)
        elif line.startswith('{"result"'):
            with contextlib.suppress(ValueError):
                result.append(json.loads(line)["result"])

    child_env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
    try:
        await run_process([sys.executable, "-m", module, *args], on_line=on_line, timeout=timeout, env=child_env)
    except ProcessFailed as exc:
        if errors:
            raise errors[-1] from None
        if exc.returncode < 0 and -exc.returncode == signal.SIGKILL:
            raise InsufficientResources(f"{module} was killed (out of memory?).") from None
        tail = " | ".join(line for line in exc.tail[-4:] if line.strip())
        raise InternalError(f"{module} failed (exit code {exc.returncode}): {tail[:400]}") from None
    if not result:
        raise InternalError(f"{module} finished without a result.")
    return result[-1]
