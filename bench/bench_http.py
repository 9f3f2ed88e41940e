"""HTTP throughput and latency of `klipstream serve` against a bare aiohttp handler, same run.

The server under test is pinned to core 0 and wrk (C, Debian's package) to core 1, so the load
generator never competes with the server. Measured:

* status polling: GET /api/v1/analysis/{id}/status of a queued job (the full 200 body with ETag;
  the 304 path is shown for reference);
* job submission: POST /api/v1/analysis with a different Twitch URL every request (a counter in
  the Lua script, so deduplication never turns a submission into a lookup), durable SQLite write
  included, queue paused so no job runs, 64 connections;
* the bare handler (bench/bare_server.py) for GET and for POST with the same bodies.

With `--postgres` the service uses a throwaway PostgreSQL server (tests/pg_server.py: Debian's
postgresql, initdb in a temporary directory, on loopback, not pinned: its work may take the
server's core as SQLite's writer thread does; fsync off and synchronous_commit on, the durability
of the SQLite store's WAL with synchronous=NORMAL) instead of SQLite, and the goals are
issue 14's; a second service on SQLite takes its submission turn in the same rounds, for reference.

Run: `python bench/bench_http.py [--seconds 3] [--rounds 9] [--connections 64] [--postgres]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ServerProcess,
    WrkResult,
    bare_server,
    klipstream_server,
    machine_note,
    real_pipeline_available,
    request,
    run_wrk,
    sched_seconds,
    table,
    verdict,
)

# A new Twitch VOD URL per request: run nonce, wrk thread number, per-thread counter. These must
# be globals: thread:set() writes a thread's globals, which a `local` of the same name would shadow
# (every thread then numbered itself 0 and half the "submissions" were deduplicated lookups).
SUBMIT_LUA = """
counter = 0
thread_no = 0
nonce = "1"

setup = function(thread)
  thread:set("thread_no", thread_no)
  thread_no = thread_no + 1
end

init = function(args)
  nonce = args[1] or "1"
end

request = function()
  counter = counter + 1
  local video = nonce .. thread_no .. string.format("%09d", counter)
  local body = '{"url":"https://www.twitch.tv/videos/' .. video .. '","priority":"normal"}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""

# Conditional polling, as a client holding the last ETag does.
ETAG_LUA = """
init = function(args)
  wrk.headers["If-None-Match"] = args[1]
end
"""


def write_script(text: str) -> Path:
    handle = tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-", delete=False)
    handle.write(text)
    handle.close()
    return Path(handle.name)


@dataclass
class Run:
    """One wrk run and how much of its core the server used meanwhile."""

    wrk: WrkResult
    core_use: float  # on-CPU seconds of all the server's threads / wall seconds of the run


def measure(
    server: ServerProcess, url: str, conns: int, seconds: int, script: Path | None = None, args: tuple[str, ...] = ()
) -> Run:
    run0, _ = sched_seconds(server.pid)
    started = time.monotonic()
    result = run_wrk(url, connections=conns, seconds=seconds, threads=1, script=script, script_args=args)
    wall = time.monotonic() - started
    run1, _ = sched_seconds(server.pid)
    return Run(result, (run1 - run0) / wall)


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wrk.requests_per_second)[len(runs) // 2]


def median_ratio(runs: list[Run], baseline: list[Run]) -> float:
    """Median over rounds of run / baseline, each pair measured back to back, so that the speed
    of this shared machine, which drifts by a third within minutes, cancels out."""
    ratios = sorted(r.wrk.requests_per_second / b.wrk.requests_per_second for r, b in zip(runs, baseline, strict=True))
    return ratios[len(ratios) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Many short rounds: this machine's speed drifts within seconds, and a ratio is only as good
    # as the two runs behind it being measured under the same conditions.
    parser.add_argument("--seconds", type=int, default=3, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds; medians are reported")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--postgres", action="store_true", help="store jobs in a throwaway PostgreSQL server")
    parser.add_argument(
        "--postgres-core", default="any", help="CPU list to pin the PostgreSQL server to (default: not pinned)"
    )
    args = parser.parse_args()
    seconds, conns = args.seconds, args.connections
    submit_lua, etag_lua = write_script(SUBMIT_LUA), write_script(ETAG_LUA)
    real = real_pipeline_available()
    runs: dict[str, list[Run]] = {}
    # Video ids are <run tag><wrk thread><counter>; the tag is 3 digits of this run and 2 of the
    # round (00 for the warm-up), so no two wrk runs can submit the same URL.
    run_tag = f"{time.time_ns() % 1000:03d}"
    try:
        # Both servers stay up on core 0 and each measured run sits next to the bare run it is
        # compared with, so background load on this shared machine hits both alike.
        with contextlib.ExitStack() as stack:
            store_env = {}
            rows: Callable[[], int] = lambda: 0  # noqa: E731
            if args.postgres:
                from tests.pg_server import running_server

                pg_core = None if args.postgres_core == "any" else args.postgres_core
                database = stack.enter_context(running_server(core=pg_core))
                store_env["KLIPSTREAM_DATABASE_URL"] = database_url = database.create_database("bench")
                db_name = database_url.rsplit("/", 1)[1]
                rows = lambda: int(database.psql("SELECT count(*) FROM jobs", db_name))  # noqa: E731
            bare = stack.enter_context(bare_server())
            svc = stack.enter_context(klipstream_server(real=real, KLIPSTREAM_MAX_QUEUED_JOBS="100000000", **store_env))
            status, _ = request("POST", svc.base + "/api/v1/queue/pause")
            assert status == 200, f"pause answered {status}"
            status, job = request(
                "POST", svc.base + "/api/v1/analysis", {"url": "https://www.twitch.tv/videos/1000000001"}
            )
            assert status == 202, f"submit answered {status}: {job}"
            status_url = f"{svc.base}/api/v1/analysis/{job['job_id']}/status"
            etag = _etag(status_url)
            # Phase 1, one queued job: polling. Phase 2: submissions, which fill the queue and so
            # must not run before phase 1.
            polling: list[tuple[str, ServerProcess, str, Path | None, tuple[str, ...]]] = [
                ("bare GET", bare, bare.base + "/bare", None, ()),
                ("status 200", svc, status_url, None, ()),
                ("status 304", svc, status_url, etag_lua, (etag,)),
            ]
            submitting: list[tuple[str, ServerProcess, str, Path | None, tuple[str, ...]]] = [
                ("bare POST", bare, bare.base + "/bare", submit_lua, (f"{run_tag}00",)),
                ("submit", svc, svc.base + "/api/v1/analysis", submit_lua, (f"{run_tag}00",)),
            ]
            if args.postgres:  # the SQLite store in the same rounds, for reference
                lite = stack.enter_context(klipstream_server(real=real, KLIPSTREAM_MAX_QUEUED_JOBS="100000000"))
                status, _ = request("POST", lite.base + "/api/v1/queue/pause")
                assert status == 200, f"pause answered {status}"
                submitting.append(("submit, SQLite", lite, lite.base + "/api/v1/analysis", submit_lua, ("",)))
            for phase in (polling, submitting):
                for _name, _server, url, script, script_args in phase:  # warm-up, not counted
                    run_wrk(url, connections=conns, seconds=1, threads=1, script=script, script_args=script_args)
                _, before = request("GET", svc.base + "/api/v1/queue/stats")
                rows_before = rows()
                for round_no in range(args.rounds):
                    for name, server, url, script, script_args in phase:
                        if name.startswith("submit"):
                            script_args = (f"{run_tag}{round_no + 1:02d}",)
                        runs.setdefault(name, []).append(measure(server, url, conns, seconds, script, script_args))
            time.sleep(0.5)
            _, after = request("GET", svc.base + "/api/v1/queue/stats")
            accepted = after["queued_total"] - before["queued_total"]
            if args.postgres:  # every accepted job must be a row in the database, not only in memory
                accepted = min(accepted, rows() - rows_before)
            depth = after["queued_total"]
            runs[f"status 200, {depth:,} queued"] = [measure(svc, status_url, conns, seconds)]
    finally:
        submit_lua.unlink(missing_ok=True)
        etag_lua.unlink(missing_ok=True)

    submitted = sum(r.wrk.requests for r in runs["submit"])
    failed = sum(r.wrk.non_2xx + r.wrk.errors for r in runs["submit"])
    print_report(runs, accepted, submitted, failed, conns, seconds, args.rounds, real, args.postgres)
    return 0


def _etag(url: str) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return resp.headers["ETag"]


def print_report(
    runs: dict[str, list[Run]],
    accepted: int,
    submitted: int,
    failed: int,
    conns: int,
    seconds: int,
    rounds: int,
    real: bool,
    postgres: bool = False,
) -> None:
    baseline = {
        "status 200": "bare GET",
        "status 304": "bare GET",
        "submit": "bare POST",
        "submit, SQLite": "bare POST",
    }
    rows = []
    for name, name_runs in runs.items():
        r = median_run(name_runs).wrk
        against = baseline.get(name)
        ratio = f"{median_ratio(name_runs, runs[against]):.2f}× {against}" if against else ""
        rows.append(
            [
                name,
                r.requests_per_second,
                ratio,
                r.latency_ms.get("50", 0.0),
                r.latency_ms.get("99", 0.0),
                r.non_2xx + r.errors,
                f"{100 * median_run(name_runs).core_use:.0f}%",
            ]
        )
    polling = median_ratio(runs["status 200"], runs["bare GET"])
    submit_ratio = median_ratio(runs["submit"], runs["bare POST"])
    p99s = sorted(r.wrk.latency_ms.get("99", float("nan")) for r in runs["submit"])
    reference = []
    if "submit, SQLite" in runs:
        lite_p99s = sorted(r.wrk.latency_ms.get("99", float("nan")) for r in runs["submit, SQLite"])
        lite_ratio = median_ratio(runs["submit, SQLite"], runs["bare POST"])
        reference = [
            [
                "for reference: SQLite store, same rounds",
                f"{lite_ratio:.2f}× bare POST, p99 {lite_p99s[len(lite_p99s) // 2]:.1f} ms",
                "≥ 0.3×, ≤ 20 ms",
                "",
            ]
        ]
    p99 = p99s[len(p99s) // 2]
    print(
        f"\n### HTTP ({conns} connections, {rounds} interleaved rounds of {seconds} s runs, medians; "
        "server on core 0, wrk on core 1)\n"
    )
    print(
        f"Machine: {machine_note()}. Pipeline loaded by the server: "
        f"{'shipped default_pipeline' if real else 'bench-only stages (default_pipeline not importable)'}. "
        f"Job store: {'PostgreSQL 15 on loopback' if postgres else 'SQLite'}. "
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.\n"
    )
    submit_goal, p99_goal = (0.25, 25.0) if postgres else (0.3, 20.0)
    headers = ["run", "req/s", "ratio (median per round)", "p50 ms", "p99 ms", "errors/non-2xx", "core 0 used"]
    print(table(headers, rows))
    print(
        "\nEach ratio is taken per round against the bare handler serving the same request (GET, or "
        "POST of the same body) in the run just before, then the median over rounds. The polling rows "
        "run while one job is queued, before any submission run; the last row polls the same job "
        "after the submission runs have filled the queue.\n"
        "\n*core 0 used*: on-CPU time of all the server's threads over the run's wall time; 100% means "
        "the server had its core to itself and used all of it.\n"
    )
    print(
        table(
            ["target", "measured", "goal", "verdict"],
            [
                ["status polling throughput", f"{polling:.2f}× bare GET", "≥ 0.6×", verdict(polling >= 0.6)],
                [
                    "submission throughput",
                    f"{submit_ratio:.2f}× bare POST",
                    f"≥ {submit_goal}×",
                    verdict(submit_ratio >= submit_goal),
                ],
                [
                    f"submission p99 at {conns} clients",
                    f"{p99:.1f} ms (median round)",
                    f"≤ {p99_goal:g} ms",
                    verdict(p99 <= p99_goal),
                ],
                [
                    "submissions durably accepted",
                    f"{accepted:,} new queued jobs for {submitted:,} answered requests, {failed} errors",
                    "all",
                    verdict(failed == 0 and accepted >= submitted),
                ],
                *reference,
            ],
        )
    )


if __name__ == "__main__":
    sys.exit(main())
