"""Shared helpers for the service benchmarks: server processes pinned to a core, wrk runs and
their parsing, /proc readings, and the markdown table every script prints.

The benchmarks measure the real `klipstream serve`. While `klipstream.stages.default_pipeline()`
does not import yet (other stages still being written) they fall back to `bench/sse_server.py`,
which serves the same app with bench-only stages that do real file work; every table says which.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SERVER_CORE = "0"
CLIENT_CORE = "1"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def raise_nofile(wanted: int = 20000) -> int:
    """Lift the soft open-files limit towards `wanted` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd: Sequence[str], core: str | None) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return list(cmd)
    return ["taskset", "-c", core, *cmd]


def real_pipeline_available() -> bool:
    """True when the shipped pipeline imports, checked in a child so a broken import stays there."""
    probe = "from klipstream.stages import default_pipeline; default_pipeline()"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, timeout=120)
    return done.returncode == 0


def request(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def sched_seconds(pid: int) -> tuple[float, float]:
    """(on-CPU, waiting-for-CPU) seconds summed over the process's threads, from schedstat.

    The waiting share shows how much other load on the machine stole from the server in a run."""
    run = wait = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError):
            on_cpu, queued, _ = stat.read_text().split()
            run += int(on_cpu)
            wait += int(queued)
    return run / 1e9, wait / 1e9


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class ServerProcess:
    """A server child process: the real `klipstream serve`, the bench entry or the bare handler."""

    cmd: list[str]
    env: dict[str, str]
    port: int
    ready_path: str = "/health/ready"
    core: str | None = SERVER_CORE
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> ServerProcess:
        fd, name = tempfile.mkstemp(prefix="bench-server-", suffix=".log")
        self.log_path = Path(name)
        self.proc = subprocess.Popen(
            pinned(self.cmd, self.core),
            env=self.env,
            cwd=ROOT,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = request("GET", self.base + self.ready_path, timeout=2)
                if status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)


def service_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(
        PORT=str(port),
        KLIPSTREAM_HOST="127.0.0.1",
        KLIPSTREAM_DATA_DIR=str(data_dir),
        KLIPSTREAM_ALLOW_PRIVATE_URLS="true",
        KLIPSTREAM_LOG_LEVEL="warning",
        KLIPSTREAM_LOG_FORMAT="text",
        PYTHONPATH=str(ROOT),
    )
    env.pop("KLIPSTREAM_ADMIN_TOKEN", None)
    env["KLIPSTREAM_ADMIN_LOOPBACK"] = "true"  # the benches read the queue stats from loopback
    env.pop("KLIPSTREAM_API_KEYS", None)
    env.update(extra)
    return env


@contextlib.contextmanager
def klipstream_server(*, real: bool, core: str | None = SERVER_CORE, **extra: str) -> Iterator[ServerProcess]:
    """The service on a fresh data directory: `python -m klipstream serve` with the shipped pipeline,
    or the bench entry with bench-only stages when `real` is false."""
    with tempfile.TemporaryDirectory(prefix="klipstream-bench-") as tmp:
        port = free_port()
        env = service_env(Path(tmp) / "data", port, **extra)
        if real:
            cmd = [sys.executable, "-m", "klipstream", "serve"]
        else:
            cmd = [sys.executable, str(BENCH / "sse_server.py")]
        with ServerProcess(cmd, env, port, core=core) as server:
            yield server


@contextlib.contextmanager
def bare_server(core: str | None = SERVER_CORE) -> Iterator[ServerProcess]:
    port = free_port()
    env = service_env(Path(tempfile.gettempdir()), port)
    cmd = [sys.executable, str(BENCH / "bare_server.py"), str(port)]
    with ServerProcess(cmd, env, port, ready_path="/bare", core=core) as server:
        yield server


# --- wrk ---
@dataclass
class WrkResult:
    requests_per_second: float
    requests: int
    errors: int  # socket errors: connect, read, write, timeout
    non_2xx: int
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50", "75", "90", "99"
    raw: str = ""


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if not rps or not total:
        raise RuntimeError(f"wrk output not understood:\n{output}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        errors = sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    latency = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.MULTILINE)}
    return WrkResult(
        float(rps.group(1)), int(total.group(1)), errors, int(non2xx.group(1)) if non2xx else 0, latency, output
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    seconds: int,
    threads: int = 2,
    script: Path | None = None,
    script_args: Sequence[str] = (),
    core: str | None = CLIENT_CORE,
) -> WrkResult:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency", "--timeout", "10s"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    if script_args:
        cmd += ["--", *script_args]
    done = subprocess.run(pinned(cmd, core), capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    return parse_wrk(done.stdout)


# --- statistics and output ---
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(len(ordered), rank) - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "pass" if ok else "**MISS**"


def machine_note() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"
