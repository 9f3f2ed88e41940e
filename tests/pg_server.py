"""A throwaway PostgreSQL server for tests and benchmarks: Debian's binaries, a temporary directory.

`PostgresServer` runs `initdb` once per process into a template directory, copies it for each
server it starts (a copy takes milliseconds, initdb a second or two), and starts `postgres` with
`pg_ctl` on a free loopback port. Durability settings are those of the SQLite store's WAL with
synchronous=NORMAL: every commit is written to the operating system before it is acknowledged
(`synchronous_commit=on`), nothing is fsynced (`fsync=off`), so a killed server loses nothing and
only a power loss could.

initdb and postgres refuse to run as root. As root (CI), the server's files belong to the
`postgres` account the Debian package creates (else `nobody`) and its programs run under that
account through `runuser`; the client side (the tests) stays root and connects over TCP.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "postgres"
START_TIMEOUT = 60.0

SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


class PostgresUnavailable(RuntimeError):
    """Debian's PostgreSQL server binaries are not installed (`apt-get install postgresql`)."""


def bindir() -> Path:
    """The directory of initdb/pg_ctl: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [Path(p) for p in versions]
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (pg_config --bindir, /usr/lib/postgresql/*/bin); "
        "install Debian's `postgresql` package"
    )


def _service_account() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root and neither a `postgres` nor a `nobody` account exists")


def _as_owner(cmd: list[str]) -> list[str]:
    account = _service_account()
    return cmd if account is None else ["runuser", "-u", account.pw_name, "--", *cmd]


def _chown_tree(path: Path) -> None:
    account = _service_account()
    if account is None:
        return
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)
    os.chown(path, account.pw_uid, account.pw_gid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_template_lock = threading.Lock()
_template: Path | None = None


def _template_dir() -> Path:
    """An initdb'd data directory, made once per process and copied for every server."""
    global _template
    with _template_lock:
        if _template is None or not (_template / "PG_VERSION").is_file():
            base = Path(tempfile.mkdtemp(prefix="klipstream-pg-template-"))
            os.chmod(base, 0o755)
            data = base / "data"
            data.mkdir(mode=0o700)
            _chown_tree(base)
            done = subprocess.run(
                _as_owner(
                    [
                        str(bindir() / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        SUPERUSER,
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--no-sync",
                    ]
                ),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
            _template = data
            atexit.register(shutil.rmtree, base, True)
        return _template


@dataclass
class PostgresServer:
    """One postgres process on 127.0.0.1:port with its own data directory."""

    root: Path
    port: int = field(default_factory=_free_port)
    settings: dict[str, str] = field(default_factory=lambda: dict(SERVER_SETTINGS))
    _counter: int = 0

    @classmethod
    def create(cls, **settings: str) -> PostgresServer:
        root = Path(tempfile.mkdtemp(prefix="klipstream-pg-"))
        os.chmod(root, 0o755)  # the service account must reach its data directory inside
        shutil.copytree(_template_dir(), root / "data", symlinks=True)
        os.chmod(root / "data", 0o700)
        _chown_tree(root)
        server = cls(root)
        server.settings.update(settings)
        return server

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self, core: str | None = None) -> PostgresServer:
        """Start postgres and wait until it accepts connections; `core` pins it (taskset) to CPUs."""
        options = " ".join(f"-c {key}={value!s}" for key, value in self.settings.items())
        options += f" -p {self.port}"
        pin = ["taskset", "-c", core] if core is not None and shutil.which("taskset") else []
        done = subprocess.run(
            pin
            + _as_owner(
                [
                    str(bindir() / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log_file),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(START_TIMEOUT)),
                ]
            ),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 10,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()}\n{self.log_tail()}")
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(bindir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-t", "2"],
                capture_output=True,
                timeout=10,
            )
            if done.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not accept connections within {START_TIMEOUT:.0f} s\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` rolls back open transactions, `immediate` is a crash."""
        if not (self.data / "postmaster.pid").exists():
            return
        subprocess.run(
            _as_owner([str(bindir() / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30"]),
            capture_output=True,
            timeout=40,
        )

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [str(bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.url(database)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its URL."""
        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}"
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(RuntimeError):
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def running_server(core: str | None = None, **settings: str) -> Iterator[PostgresServer]:
    server = PostgresServer.create(**settings).start(core)
    try:
        yield server
    finally:
        server.remove()
