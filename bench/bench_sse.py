"""SSE fan-out: 5,000 concurrent subscribers on one job.

The server (bench/sse_server.py: `klipstream.server.serve` plus publication timestamps) runs on
core 0. A client process on core 1 opens every stream with raw asyncio sockets (HTTP/1.1, chunked
decoding and SSE framing by hand, so the client costs microseconds per event), and only when
every subscriber holds its snapshot is the paused queue resumed and the job allowed to run. Then:

* every subscriber must receive every `stage` event and exactly one terminal event;
* delivery lag = receipt time (client) - publication time (server, when the broadcaster appended
  the event), both CLOCK_REALTIME on this machine;
* memory per subscriber = server VmRSS growth from before the first connection to all connected.

Run: `python bench/bench_sse.py [--subscribers 5000] [--pipeline real|bench]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BENCH,
    CLIENT_CORE,
    ROOT,
    ServerProcess,
    free_port,
    machine_note,
    percentile,
    pinned,
    raise_nofile,
    real_pipeline_available,
    request,
    rss_kib,
    service_env,
    table,
    verdict,
)

TERMINAL = {"completed", "failed", "cancelled"}
PIPELINE_NOTE = {
    "real": "shipped default_pipeline on a 31 s speech file served on loopback",
    "bench": "BENCH-ONLY stages from bench/sse_server.py (real file work)",
}
SPEECH = ROOT / "tests" / "fixtures" / "speech" / "speech.ogg"


# --- the client process ---
@dataclass
class Subscriber(asyncio.Protocol):
    """One event stream: HTTP/1.1 response head, chunked body, SSE frames separated by CRLF CRLF."""

    request: bytes
    on_snapshot: Any
    done: asyncio.Future[None]
    events: list[tuple[int, str, float]] = field(default_factory=list)
    error: str | None = None
    ended: bool = False
    _head: bytes | None = None
    _raw: bytearray = field(default_factory=bytearray)
    _sse: bytearray = field(default_factory=bytearray)

    def connection_made(self, transport: Any) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self._raw += data
        if self._head is None:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head = bytes(self._raw[:end]).lower()
            del self._raw[: end + 4]
            if not self._head.startswith(b"http/1.1 200") or b"text/event-stream" not in self._head:
                self.error = self._head.split(b"\r\n", 1)[0].decode()
        self._dechunk()
        while (end := self._sse.find(b"\r\n\r\n")) >= 0:
            frame = bytes(self._sse[:end])
            del self._sse[: end + 4]
            self._frame(frame, now)

    def _dechunk(self) -> None:
        while True:
            line_end = self._raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self._raw[:line_end]).split(b";")[0] or b"0", 16)
            if size == 0:  # the last chunk: the server ended the stream (the socket may stay alive)
                self._raw.clear()
                self.ended = True
                if not self.done.done():
                    self.done.set_result(None)
                return
            if len(self._raw) < line_end + 2 + size + 2:
                return
            self._sse += self._raw[line_end + 2 : line_end + 2 + size]
            del self._raw[: line_end + 2 + size + 2]

    def _frame(self, frame: bytes, now: float) -> None:
        event_id, event_type = -1, "message"
        for line in frame.split(b"\r\n"):
            if line.startswith(b"id:"):
                event_id = int(line[3:])
            elif line.startswith(b"event:"):
                event_type = line[6:].strip().decode()
        if event_id < 0:
            return  # a comment (heartbeat) or a bare retry hint
        self.events.append((event_id, event_type, now))
        if event_type == "snapshot" and len(self.events) == 1:
            self.on_snapshot()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = repr(exc)
        if not self.done.done():
            self.done.set_result(None)


async def client_main(port: int, path: str, count: int, out: Path, patience: float) -> None:
    loop = asyncio.get_running_loop()
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    ready = loop.create_future()
    snapshots = 0

    def snapshot() -> None:
        nonlocal snapshots
        snapshots += 1
        if snapshots == count and not ready.done():
            ready.set_result(None)

    subscribers: list[Subscriber] = []
    connecting = asyncio.Semaphore(100)  # stay under the server's listen backlog

    async def connect() -> None:
        sub = Subscriber(head, snapshot, loop.create_future())
        subscribers.append(sub)
        async with connecting:
            try:
                await loop.create_connection(lambda: sub, "127.0.0.1", port)
            except OSError as exc:
                sub.error = f"connect: {exc!r}"
                sub.done.set_result(None)

    started = time.monotonic()
    await asyncio.gather(*(connect() for _ in range(count)))
    try:
        await asyncio.wait_for(asyncio.shield(ready), patience)
    except TimeoutError:
        pass
    connect_seconds = time.monotonic() - started
    print(f"READY {snapshots} {connect_seconds:.2f}", flush=True)
    await asyncio.wait([s.done for s in subscribers], timeout=patience)
    result = {
        "connect_seconds": connect_seconds,
        "subscribers": [{"events": s.events, "error": s.error, "ended": s.ended} for s in subscribers],
    }
    out.write_text(json.dumps(result))  # noqa: ASYNC240 - once, after the measurement


# --- the orchestrating process ---
def serve_media(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A plain static file server on loopback for the job's media URL (its own process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(directory), str(port)]
    proc = subprocess.Popen(
        pinned(cmd, CLIENT_CORE), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if request("GET", f"http://127.0.0.1:{port}/", timeout=1)[0] == 200:
                return proc, port
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("media server did not start")


def make_media(directory: Path, pipeline: str, megabytes: int) -> str:
    if pipeline == "real":
        target = directory / "speech.ogg"
        target.write_bytes(SPEECH.read_bytes())
        return target.name
    target = directory / "media.bin"
    with target.open("wb") as out:
        for i in range(megabytes):  # compressible but not trivially: varied text blocks
            out.write((f"block {i} " * 120_000)[: 1 << 20].encode())
    return target.name


def orchestrate(args: argparse.Namespace) -> int:
    raise_nofile(max(20000, args.subscribers * 2 + 1000))
    pipeline = args.pipeline or ("real" if real_pipeline_available() else "bench")
    with tempfile.TemporaryDirectory(prefix="bench-sse-") as tmp:
        tmpdir = Path(tmp)
        media_dir = tmpdir / "media"
        media_dir.mkdir()
        media_name = make_media(media_dir, pipeline, args.megabytes)
        media_proc, media_port = serve_media(media_dir)
        port = free_port()
        env = service_env(tmpdir / "data", port, KLIPSTREAM_BENCH_PIPELINE=pipeline, KLIPSTREAM_MAX_RUNNING_JOBS="1")
        server = ServerProcess([sys.executable, str(BENCH / "sse_server.py")], env, port)
        try:
            with server:
                return run_bench(args, server, f"http://127.0.0.1:{media_port}/{media_name}", tmpdir, pipeline)
        finally:
            media_proc.terminate()
            media_proc.wait(10)


def run_bench(args: argparse.Namespace, server: ServerProcess, media_url: str, tmpdir: Path, pipeline: str) -> int:
    base = server.base
    assert request("POST", base + "/api/v1/queue/pause")[0] == 200
    status, job = request("POST", base + "/api/v1/analysis", {"url": media_url})
    assert status == 202, job
    job_id = job["job_id"]
    stream_path = f"/api/v1/analysis/{job_id}/stream"
    time.sleep(0.5)
    rss_before = rss_kib(server.pid)
    out = tmpdir / "client.json"
    client_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        "--port",
        str(server.port),
        "--path",
        stream_path,
        "--subscribers",
        str(args.subscribers),
        "--out",
        str(out),
        "--timeout",
        str(args.timeout),
    ]
    client = subprocess.Popen(pinned(client_cmd, CLIENT_CORE), stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    line = client.stdout.readline().split()
    connected, connect_seconds = int(line[1]), float(line[2])
    time.sleep(1.0)  # let the server settle after the connection storm
    rss_connected = rss_kib(server.pid)
    _, info = request("GET", f"{base}/bench/published/{job_id}")
    server_side = info["subscribers"]
    spy = None
    if args.py_spy:  # sample the server while the job runs and events fan out
        spy_cmd = ["py-spy", "record", "-p", str(server.pid), "-r", "100", "-f", "raw", "-o", str(args.py_spy)]
        spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    resumed = time.time()
    assert request("POST", base + "/api/v1/queue/resume")[0] == 200
    client.wait(args.timeout + 60)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    rss_after = rss_kib(server.pid)
    _, published = request("GET", f"{base}/bench/published/{job_id}")
    _, final = request("GET", f"{base}/api/v1/analysis/{job_id}")
    result = json.loads(out.read_text())
    report(
        args,
        pipeline,
        result,
        published["events"],
        final,
        connected=connected,
        server_side=server_side,
        connect_seconds=connect_seconds,
        resumed=resumed,
        rss=(rss_before, rss_connected, rss_after),
    )
    return 0


def report(
    args: argparse.Namespace,
    pipeline: str,
    result: dict[str, Any],
    published: dict[str, list[Any]],
    final: dict[str, Any],
    *,
    connected: int,
    server_side: int,
    connect_seconds: float,
    resumed: float,
    rss: tuple[int, int, int],
) -> None:
    pub = {int(k): (v[0], v[1]) for k, v in published.items()}
    subs = result["subscribers"]
    snapshot_ids = {s["events"][0][0] for s in subs if s["events"]}
    first_after = min(snapshot_ids) if snapshot_ids else 0
    must = {i for i, (kind, _) in pub.items() if i > first_after and (kind == "stage" or kind in TERMINAL)}
    progress_ids = {i for i, (kind, _) in pub.items() if i > first_after and kind == "progress"}
    complete = one_terminal = 0
    lags: list[float] = []
    stage_lags: list[float] = []
    progress_seen = 0
    errors: Counter[str] = Counter()
    for sub in subs:
        if sub["error"]:
            errors[sub["error"][:80]] += 1
        events = sub["events"]
        ids = {e[0] for e in events[1:]}
        complete += must <= ids
        one_terminal += sum(1 for e in events if e[1] in TERMINAL) == 1
        progress_seen += len(ids & progress_ids)
        for event_id, kind, received in events[1:]:
            if event_id in pub:
                lag = (received - pub[event_id][1]) * 1000
                lags.append(lag)
                if kind != "progress":
                    stage_lags.append(lag)
    n = args.subscribers
    ended = sum(1 for sub in subs if sub["ended"])
    job_seconds = max((t for kind, t in pub.values() if kind in TERMINAL), default=float("nan")) - resumed
    per_sub_kib = (rss[1] - rss[0]) / max(1, connected)
    p99 = percentile(lags, 99)
    kinds = Counter(kind for i, (kind, _) in pub.items() if i > first_after)
    print(f"\n### SSE fan-out: {n:,} subscribers on one job\n")
    print(
        f"Machine: {machine_note()}. Server on core 0, client (raw asyncio sockets, one process) on core 1. "
        f"Pipeline: {PIPELINE_NOTE[pipeline]}; "
        f"job ended `{final.get('status')}` after {job_seconds:.1f} s. Events published after the snapshot: "
        + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + ".\n"
    )
    print(
        table(
            ["measure", "value"],
            [
                [
                    "subscribers holding a snapshot before the job ran",
                    f"{connected:,} (server counted {server_side:,})",
                ],
                ["time to connect all and receive snapshots", f"{connect_seconds:.1f} s"],
                ["received every stage event and the terminal event", f"{complete:,} / {n:,}"],
                ["received exactly one terminal event", f"{one_terminal:,} / {n:,}"],
                ["streams ended by the server after the terminal event", f"{ended:,} / {n:,}"],
                [
                    "progress events received (coalesced, may be skipped)",
                    f"{progress_seen:,} of {len(progress_ids) * n:,}",
                ],
                [
                    "delivery lag p50 / p99 / max, all events",
                    f"{percentile(lags, 50):.1f} / {p99:.1f} / {max(lags, default=float('nan')):.1f} ms",
                ],
                ["delivery lag p99, stage + terminal events", f"{percentile(stage_lags, 99):.1f} ms"],
                [
                    "server VmRSS before / all connected / after the job",
                    f"{rss[0] / 1024:.1f} / {rss[1] / 1024:.1f} / {rss[2] / 1024:.1f} MiB",
                ],
                ["memory growth per subscriber", f"{per_sub_kib:.1f} KiB"],
                ["client errors", ", ".join(f"{k} x{v}" for k, v in errors.items()) or "none"],
            ],
        )
    )
    print()
    print(
        table(
            ["target", "measured", "goal", "verdict"],
            [
                [
                    "all receive every stage + terminal event",
                    f"{complete:,}/{n:,}",
                    f"{n:,}/{n:,}",
                    verdict(complete == n and one_terminal == n),
                ],
                ["p99 delivery lag", f"{p99:.1f} ms", "≤ 250 ms", verdict(p99 <= 250)],
                [
                    "server memory per subscriber",
                    f"{per_sub_kib:.1f} KiB",
                    "≤ 15 KB",
                    verdict(per_sub_kib * 1.024 <= 15),
                ],
            ],
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=5000)
    parser.add_argument("--pipeline", choices=("real", "bench"), help="default: real when it imports")
    parser.add_argument("--megabytes", type=int, default=48, help="media size for the bench pipeline")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--py-spy", type=Path, help="write a py-spy raw profile of the server during the job")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        import uvloop

        raise_nofile(args.subscribers + 1000)
        uvloop.run(client_main(args.port, args.path, args.subscribers, args.out, args.timeout))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
