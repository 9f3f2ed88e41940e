"""`klipstream analyze` and the help of every command.

The job runs in this process through JobService with a small test-only pipeline that does real,
checkable work on a generated WAV file (waveform, loudest moments as highlights), so the tests can
assert on what the command shows and writes. The real pipeline is exercised by the slow test at
the end once it imports.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from klipstream import cli
from klipstream.cli import local as local_run
from klipstream.errors import VideoUnavailable
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage, VideoInfo
from klipstream.proc import run_process

ROOT = Path(__file__).resolve().parent.parent
RATE = 8000
WAVEFORM_POINTS = 20_000


# --- test-only pipeline and fixture -------------------------------------------------------------
def make_wav(path: Path, seconds: float = 8.0, bursts: tuple[float, ...] = (2.0, 5.5)) -> Path:
    """Quiet noise with a loud one-second tone at each of `bursts` (seconds)."""
    rng = np.random.default_rng(7)
    n = int(seconds * RATE)
    signal_ = rng.normal(0, 0.02, n)
    t = np.arange(RATE) / RATE
    for start in bursts:
        i = int(start * RATE)
        signal_[i : i + RATE] += 0.8 * np.sin(2 * math.pi * 440 * t[: n - i])
    pcm = (np.clip(signal_, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(pcm.tobytes())
    return path


def _read_wav(path: Path) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as src:
            frames = src.readframes(src.getnframes())
    except (wave.Error, EOFError) as exc:
        raise VideoUnavailable(f"The media is not a WAV file ({exc}).") from None
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def demo_pipeline(hold_pid_file: Path | None = None) -> list[Stage]:
    """fetch -> decode (waveform, audio) -> transcript; moments from the waveform.

    With `hold_pid_file`, decode starts a long child process (its pid written to that file) after
    writing a partial file, so a test can interrupt a job with real children and partial files.
    """

    async def fetch(ctx: StageContext) -> None:
        dest = ctx.output_path("media")
        if ctx.url.startswith("http"):
            async with ctx.http.get(ctx.url) as resp:
                resp.raise_for_status()
                total = resp.content_length or 0
                done = 0
                with dest.open("wb") as out:
                    async for chunk in resp.content.iter_chunked(16384):
                        out.write(chunk)
                        done += len(chunk)
                        ctx.progress(done / total if total else 0.5, f"{done} bytes")
        else:
            await ctx.to_thread(shutil.copyfile, ctx.url, dest)
        ctx.add_artifact("media", dest)

    async def decode(ctx: StageContext) -> None:
        samples = await ctx.to_thread(_read_wav, ctx.input("media"))
        ctx.set_video(VideoInfo(title="Generated test stream", duration_seconds=len(samples) / RATE))
        if hold_pid_file is not None:
            ctx.workdir.joinpath("partial.tmp").write_bytes(b"half-written")

            def record_pid(line: str) -> None:
                if line.strip().isdigit():
                    hold_pid_file.write_text(line.strip())

            await run_process(["sh", "-c", "echo $$; exec sleep 60"], on_line=record_pid, timeout=120)
        # equal-length blocks on a linear time axis (array_split would make the first ones longer)
        edges = np.linspace(0, len(samples), WAVEFORM_POINTS + 1).astype(int)
        starts, ends = edges[:-1], np.minimum(np.maximum(edges[1:], edges[:-1] + 1), len(samples))
        total = np.concatenate([[0.0], np.cumsum(np.abs(samples), dtype=np.float64)])
        levels = (total[ends] - total[starts]) / np.maximum(ends - starts, 1)
        levels = levels / levels.max() if levels.max() > 0 else levels
        ctx.output_path("waveform").write_text(json.dumps([round(float(v), 4) for v in levels]))
        ctx.add_artifact("waveform")
        audio = ctx.output_path("audio", "wav")
        shutil.copyfile(ctx.input("media"), audio)
        ctx.add_artifact("audio", audio)
        ctx.progress(1.0, "decoded")

    async def transcript(ctx: StageContext) -> None:
        duration = ctx.video.duration_seconds if ctx.video and ctx.video.duration_seconds else 8.0
        lines = [
            "welcome back everyone",
            "oh my god that was insane",
            "okay let us keep going",
            "no way did that just happen",
            "thanks for watching",
        ]
        step = duration / len(lines)
        segments = [
            {"id": i, "start": round(i * step, 2), "end": round((i + 1) * step, 2), "text": " " + text, "words": []}
            for i, text in enumerate(lines)
        ]
        ctx.output_path("transcript_json").write_text(
            json.dumps({"language": "en", "duration": duration, "model": "test", "segments": segments})
        )
        ctx.add_artifact("transcript_json")

    async def moments(ctx: StageContext) -> None:
        levels = np.array(json.loads(ctx.input("waveform").read_text()))
        duration = ctx.video.duration_seconds if ctx.video and ctx.video.duration_seconds else 1.0
        seconds = int(duration)
        per_second = np.array(
            [
                levels[int(s / duration * len(levels)) : int((s + 1) / duration * len(levels))].mean()
                for s in range(seconds)
            ]
        )
        highlights = []
        for rank, second in enumerate(np.argsort(-per_second)[:3], start=1):
            highlights.append(
                {
                    "rank": rank,
                    "start_time": float(second),
                    "end_time": float(second + 1),
                    "score": round(float(per_second[second]), 4),
                    "dominant_emotion": "excitement",
                    "reason": f"the audio level was {per_second[second]:.2f} of the loudest second",
                }
            )
        ctx.set_highlights(highlights)
        ctx.output_path("highlights_json").write_text(json.dumps({"highlights": highlights}))
        ctx.add_artifact("highlights_json")

    return [
        Stage("fetch", DisplayStage.DOWNLOADING, fetch, provides=("media",), resource=Resource.NETWORK),
        Stage("decode", DisplayStage.PROCESSING_AUDIO, decode, needs=("media",), provides=("waveform", "audio")),
        Stage(
            "transcript",
            DisplayStage.TRANSCRIBING,
            transcript,
            needs=("waveform",),
            provides=("transcript_json",),
            resource=Resource.TRANSCRIPTION,
        ),
        Stage(
            "moments",
            DisplayStage.FINDING_HIGHLIGHTS,
            moments,
            needs=("waveform",),
            uses=("transcript_json",),
            provides=("highlights_json",),
        ),
    ]


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_run, "default_stages", demo_pipeline)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("KLIPSTREAM_") or name in ("PORT", "CONVEX_URL"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# --- help -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["serve", "analyze", "submit", "status", "watch", "cancel", "jobs"]),
        (["serve"], ["--port", "KLIPSTREAM_DATA_DIR", "KLIPSTREAM_API_KEYS"]),
        (["analyze"], ["URL|FILE", "--chat", "--out", "--priority", "--model", "--json", "Ctrl-C", "Exit codes"]),
        (["submit"], ["--chat-url", "--callback-url", "--priority", "--server", "--api-key", "KLIPSTREAM_API_KEY"]),
        (["status"], ["JOB_ID", "--server", "--json"]),
        (["watch"], ["JOB_ID", "Last-Event-ID", "--server", "--api-key"]),
        (["cancel"], ["JOB_ID"]),
        (["jobs"], ["--status", "--limit"]),
    ],
)
def test_help_is_complete(command: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in expected:
        assert needle in text, needle


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == cli.EXIT_USAGE
    assert "COMMAND" in capsys.readouterr().out


# --- analyze in-process ------------------------------------------------------------------------------
def test_analyze_shows_highlights_and_writes_artifacts(
    demo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_wav(tmp_path / "stream.wav")
    out = tmp_path / "out"
    assert cli.main(["analyze", str(source), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "Highlights" in text and "completed" in text
    # the two planted bursts are the top moments, shown as HH:MM:SS ranges
    assert "00:00:02–00:00:03" in text
    assert "00:00:05–00:00:06" in text or "00:00:06–00:00:07" in text
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".klipstream-")], names  # scratch data removed
    assert any(n.endswith("_waveform.json") for n in names)
    assert any(n.endswith("_highlights.json") for n in names)
    assert any(n.startswith("audio_") and n.count("_") == 1 for n in names)  # the playback audio
    waveform = json.loads(next(out.glob("*_waveform.json")).read_text())
    assert len(waveform) == WAVEFORM_POINTS and max(waveform) == 1.0
    for name in names:
        assert name in text  # the artifacts table lists every file written
    # progress went to stderr, with one row per stage
    for stage in ("fetch", "decode", "transcript", "moments", "Overall"):
        assert stage in captured.err


def test_analyze_json_prints_only_the_job(demo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_wav(tmp_path / "stream.wav")
    out = tmp_path / "json-out"
    assert cli.main(["analyze", str(source), "--out", str(out), "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "completed"
    assert job["progress"]["percentage"] == 100.0
    assert [h["rank"] for h in job["highlights"]] == [1, 2, 3]
    assert job["highlights"][0]["start_time"] in (2.0, 5.0, 6.0)
    assert set(job["results"]) == {"waveform", "audio", "transcript_json", "highlights_json"}
    for path in job["results"].values():
        assert Path(path).is_file() and Path(path).parent == out.resolve()


def test_analyze_default_out_dir_is_per_video(demo: None, tmp_path: Path) -> None:
    source = make_wav(tmp_path / "stream.wav")
    assert cli.main(["analyze", str(source), "--json"]) == 0
    (made,) = [p for p in tmp_path.iterdir() if p.name.startswith("klipstream-")]
    assert any(made.glob("*_highlights.json"))


def test_analyze_failed_job_reports_error_and_action(
    demo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "not-audio.wav"
    source.write_text("this is not a wav file")
    assert cli.main(["analyze", str(source), "--out", str(tmp_path / "o")]) == cli.EXIT_JOB_FAILED
    text = " ".join(capsys.readouterr().out.split())
    assert "failed" in text
    assert "in stage decode" in text and "not a WAV file" in text
    assert "What to do:" in text


def test_analyze_rejects_missing_file_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze", "no/such/file.mp4"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a URL nor an existing file" in err
    assert "Traceback" not in err


def test_analyze_rejects_bad_url_and_bad_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["analyze", "ftp://example.com/v.mp4"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("klipstream: ") and err.count("\n") == 1
    monkeypatch.setenv("KLIPSTREAM_MAX_RUNNING_JOBS", "zero")
    assert cli.main(["analyze", "https://www.twitch.tv/videos/1"]) == cli.EXIT_USAGE
    assert "KLIPSTREAM_MAX_RUNNING_JOBS" in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_ctrl_c_cancels_kills_children_and_removes_partial_files(tmp_path: Path) -> None:
    source = make_wav(tmp_path / "stream.wav")
    out = tmp_path / "out"
    pid_file = tmp_path / "child.pid"
    driver = (
        "import sys; from pathlib import Path\n"
        "from klipstream import cli\nfrom klipstream.cli import local as local_run\n"
        "from tests.test_cli import demo_pipeline\n"
        f"local_run.default_stages = lambda: demo_pipeline(hold_pid_file=Path({str(pid_file)!r}))\n"
        f"sys.exit(cli.main(['analyze', {str(source)!r}, '--out', {str(out)!r}]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never started its child process"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert _alive(child)
        assert list(out.glob(".klipstream-*/jobs/*/partial.tmp"))
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert "Cancelling" in stderr and "partial files were removed" in stderr
    assert "cancelled" in stdout
    assert not _alive(child)
    assert not out.exists()  # the run created it, and nothing is left in it


# --- the real pipeline ---------------------------------------------------------------------------------
def _real_pipeline_available() -> bool:
    try:
        local_run.default_stages()
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _real_pipeline_available(), reason="the shipped pipeline is not complete yet")
def test_analyze_real_pipeline_on_speech_fixture(tmp_path: Path) -> None:
    source = ROOT / "tests" / "fixtures" / "speech" / "speech.ogg"
    out = tmp_path / "real"
    proc = subprocess.run(
        [sys.executable, "-m", "klipstream", "analyze", str(source), "--out", str(out), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    job: dict[str, Any] = json.loads(proc.stdout)
    assert job["status"] == "completed"
    assert {"waveform", "transcript_json", "highlights_json"} <= set(job["results"])
    for path in job["results"].values():
        assert Path(path).is_file()
