"""Resume anywhere: two real `klipstream serve` instances with separate data directories, one
throwaway PostgreSQL and gcp-storage-emulator as the shared artifact store. The instance running a
job is killed with `kill -9` after some stages completed; the other claims the job after its lease
and continues from the checkpoints in storage (no completed stage runs again), ending with the same
results. A checkpoint that is missing or corrupt makes its stage run again, with a warning."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from klipstream.errors import VideoNotFound
from klipstream.jobs.runner import FINAL_SAVE_DELAYS
from tests.pg_server import running_server
from tests.scheduler_stages import Recorder, simple_pipeline
from tests.serve_test_pipeline import _file_digest, _write_derived, output_size
from tests.test_api_basics import wait_status
from tests.test_cluster import member_env, post
from tests.test_process_lifecycle import ServerProcess, get_json, wait_for
from tests.test_storage_gcs import emulator  # noqa: F401  (the module-scoped emulator fixture)

URL = "https://example.com/resume.mp4"
JANITOR_URL = "https://example.com/janitor.mp4"
OUTAGE_URL = "https://example.com/outage.mp4"
FINAL_SAVE_WINDOW = sum(FINAL_SAVE_DELAYS) + 1.0
CHECKPOINT_BUCKET = "klipstream-vods-raw"  # the default: the raw bucket, under _checkpoints/
BIG = 6 * 1024 * 1024  # media and PCM stand-ins: above the resumable-upload threshold


class Peer(ServerProcess):
    """One instance with its OWN data directory; the stage marker logs are shared (they are the
    test's record of which process ran which stage)."""

    def __init__(self, name: str, root: Path, database_url: str, emulator_url: str) -> None:
        super().__init__(
            root,
            name=name,
            env={
                **member_env(name, database_url),
                "KLIPSTREAM_STORAGE": "gcs",
                "STORAGE_EMULATOR_HOST": emulator_url,
                "TEST_PIPELINE": "checkpoints",
                "TEST_INTERMEDIATE_BYTES": str(BIG),
                "TEST_STEP_SECONDS": "0.2",
            },
        )
        self.data_dir = root / f"data-{name}"


@pytest.fixture
async def peers(tmp_path: Path, postgres_url: str, emulator: str):  # noqa: F811
    made = [Peer(name, tmp_path, postgres_url, emulator) for name in ("a", "b")]
    try:
        await asyncio.gather(*(p.start() for p in made))
        yield made
    finally:
        for peer in made:
            peer.stop()


def expected_outputs(tmp: Path) -> dict[str, bytes]:
    """The bytes each artifact must have: the chain of tests/serve_test_pipeline.derived_stage,
    computed here in one process."""
    tmp.mkdir(parents=True, exist_ok=True)
    chain = [
        ("download", (), ("media",), BIG),
        ("audio", ("media",), ("pcm", "waveform"), BIG),
        ("transcribe", ("pcm",), ("transcript_json",), 64),
        ("highlights", ("transcript_json", "waveform"), ("highlights_json",), 64),
    ]
    paths: dict[str, Path] = {}
    for name, inputs, provides, size in chain:
        digest = hashlib.sha256(name.encode())
        for key in inputs:
            digest.update(_file_digest(paths[key]))
        for key in provides:
            paths[key] = tmp / key
            _write_derived(paths[key], hashlib.sha256(digest.digest() + key.encode()).digest(), output_size(key, size))
    return {key: path.read_bytes() for key, path in paths.items()}


async def gcs_read(http: aiohttp.ClientSession, base: str, uri: str) -> bytes:
    bucket, name = uri.removeprefix("gs://").split("/", 1)
    async with http.get(f"{base}/download/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media") as resp:
        assert resp.status == 200, uri
        return await resp.read()


async def gcs_names(http: aiohttp.ClientSession, base: str, bucket: str, prefix: str) -> list[str]:
    async with http.get(f"{base}/storage/v1/b/{bucket}/o", params={"prefix": prefix}) as resp:
        assert resp.status == 200
        return [item["name"] for item in (await resp.json()).get("items", [])]


def markers(root: Path, stage: str) -> list[str]:
    path = root / "markers" / f"{stage}.log"
    return path.read_text().split("\n")[:-1] if path.exists() else []


async def run_until_transcribing(http: aiohttp.ClientSession, a: Peer, b: Peer, root: Path) -> tuple[str, Peer, Peer]:
    """Submit, wait until download and audio completed and transcription runs: (job url, owner, survivor)."""
    status, first = await post(http, f"{a.base}/api/v1/analysis", json={"url": URL})
    assert status == 202, first
    job_url = f"/api/v1/analysis/{first['job_id']}"
    # the waveform's checkpoint is its published object, recorded once its upload finished; asked
    # of both instances, so the one not running the job answers from the stored row
    for peer in (a, b):
        await wait_for(
            http,
            f"{peer.base}{job_url}",
            lambda j: j["stages"][2]["status"] == "running" and set(j["checkpoints"]) == {"pcm", "waveform"},
            timeout=60,
        )
    owner_pid = int(markers(root, "transcribe")[0].split()[1])
    owner, survivor = (a, b) if owner_pid == a.proc.pid else (b, a)  # type: ignore[union-attr]
    return job_url, owner, survivor


def kill(peer: Peer) -> int:
    assert peer.proc is not None
    pid = peer.proc.pid
    os.kill(pid, signal.SIGKILL)
    peer.proc.wait()
    return pid


async def assert_same_results(http: aiohttp.ClientSession, emulator_url: str, job: dict[str, Any], tmp: Path) -> None:
    expected = expected_outputs(tmp / "expected")
    for key in ("waveform", "transcript_json", "highlights_json"):
        assert await gcs_read(http, emulator_url, job["result_uris"][key]) == expected[key], key


async def checkpoints_gone(http: aiohttp.ClientSession, emulator_url: str, job_id: str) -> None:
    async with asyncio.timeout(15):
        while await gcs_names(http, emulator_url, CHECKPOINT_BUCKET, f"_checkpoints/{job_id}/"):
            await asyncio.sleep(0.1)


async def test_kill_9_resumes_on_a_peer_with_its_own_data_dir_from_the_checkpoints(
    peers: list[Peer],
    tmp_path: Path,
    emulator: str,  # noqa: F811
):
    a, b = peers
    async with aiohttp.ClientSession() as http:
        job_url, owner, survivor = await run_until_transcribing(http, a, b, tmp_path)
        running = await get_json(http, f"{survivor.base}{job_url}")
        job_id = running["job_id"]
        # the job row says what can be restored: what transcription and highlights still read; the
        # media was dropped once the audio was decoded (its only reader)
        assert set(running["checkpoints"]) == {"pcm", "waveform"}, running["checkpoints"]
        assert running["checkpoints"]["pcm"]["size"] == BIG
        stored = await gcs_names(http, emulator, CHECKPOINT_BUCKET, f"_checkpoints/{job_id}/")
        # the unpublished PCM is copied under the job's prefix; the published waveform's checkpoint
        # is its published object (not a second upload)
        assert [n.rsplit("/", 1)[1] for n in stored] == [running["checkpoints"]["pcm"]["file"]]
        assert running["checkpoints"]["waveform"]["uri"] == running["result_uris"]["waveform"]

        owner_pid = kill(owner)
        done = await wait_for(
            http, f"{survivor.base}{job_url}", lambda j: j["status"] in ("completed", "failed"), timeout=90
        )
        assert done["status"] == "completed", done
        assert not done["warnings"], done["warnings"]
    survivor_pid = survivor.proc.pid  # type: ignore[union-attr]
    # no completed stage ran again: download and audio ran once, on the killed instance
    assert markers(tmp_path, "download") == [f"start {owner_pid}", f"end {owner_pid}"]
    assert markers(tmp_path, "audio") == [f"start {owner_pid}", f"end {owner_pid}"]
    assert markers(tmp_path, "transcribe") == [f"start {owner_pid}", f"start {survivor_pid}", f"end {survivor_pid}"]
    assert markers(tmp_path, "highlights") == [f"start {survivor_pid}", f"end {survivor_pid}"]
    assert not (survivor.data_dir / "jobs" / job_id / "source_resume.media").exists()
    async with aiohttp.ClientSession() as http:
        await assert_same_results(http, emulator, done, tmp_path)
        await checkpoints_gone(http, emulator, job_id)  # a completed job keeps none
    assert done["checkpoints"] == {}


# The corrupt variant (same size, other bytes: the MD5 check) is opt-in to keep the default suite short.
@pytest.mark.parametrize("damage", ["missing", pytest.param("corrupt", marks=pytest.mark.slow)])
async def test_a_missing_or_corrupt_checkpoint_makes_its_stage_run_again(
    peers: list[Peer],
    tmp_path: Path,
    emulator: str,  # noqa: F811
    damage: str,
):
    a, b = peers
    async with aiohttp.ClientSession() as http:
        job_url, owner, survivor = await run_until_transcribing(http, a, b, tmp_path)
        running = await get_json(http, f"{survivor.base}{job_url}")
        pcm = running["checkpoints"]["pcm"]["uri"].removeprefix(f"gs://{CHECKPOINT_BUCKET}/")
        owner_pid = kill(owner)
        target = f"{emulator}/storage/v1/b/{CHECKPOINT_BUCKET}/o/{quote(pcm, safe='')}"
        if damage == "missing":
            async with http.delete(target) as resp:
                assert resp.status in (200, 204), await resp.text()
        else:  # same name and size, other bytes: only the recorded MD5 can tell
            upload = f"{emulator}/upload/storage/v1/b/{CHECKPOINT_BUCKET}/o"
            params = {"uploadType": "media", "name": pcm}
            headers = {"Content-Type": "application/octet-stream"}
            async with http.post(upload, params=params, data=b"\0" * BIG, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
        done = await wait_for(
            http, f"{survivor.base}{job_url}", lambda j: j["status"] in ("completed", "failed"), timeout=90
        )
        assert done["status"] == "completed", done
        why = "does not exist" if damage == "missing" else "expected"  # the MD5 check names what it expected
        assert any("checkpoint of pcm could not be restored" in w and why in w for w in done["warnings"]), done[
            "warnings"
        ]
        await assert_same_results(http, emulator, done, tmp_path)
    survivor_pid = survivor.proc.pid  # type: ignore[union-attr]
    # the PCM's stage ran again on the survivor; the media it reads had been dropped after the
    # audio was decoded, so the download ran again too
    assert markers(tmp_path, "audio") == [
        f"start {owner_pid}",
        f"end {owner_pid}",
        f"start {survivor_pid}",
        f"end {survivor_pid}",
    ]
    assert markers(tmp_path, "download")[-2:] == [f"start {survivor_pid}", f"end {survivor_pid}"]


async def test_a_failed_job_keeps_its_checkpoints_for_a_retry_until_the_janitor_retention(
    make_client,
    make_settings,
    monkeypatch: pytest.MonkeyPatch,
    emulator: str,  # noqa: F811
):
    """In one process (the service's own SQLite store): a job that fails after its audio stage
    keeps the PCM checkpoint (a retry elsewhere would restore it); the janitor removes it once the
    failed job is older than KLIPSTREAM_RETAIN_WORKDIRS_SECONDS."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    recorder = Recorder()
    recorder.failures["transcribe"] = [VideoNotFound("gone")]
    settings = make_settings(storage="gcs", janitor_interval_seconds=0.2, retain_workdirs_seconds=2.0)
    client = await make_client(settings, simple_pipeline(recorder))
    job_id = (await (await client.post("/api/v1/analysis", json={"url": JANITOR_URL})).json())["job_id"]
    failed = await wait_status(client, job_id, {"failed", "completed"})
    assert failed["status"] == "failed", failed
    # the media was dropped once decoded; the PCM transcription needs stays, listed in the job
    # (published outputs are listed too when their publication finished before the failure)
    assert "pcm" in failed["checkpoints"] and "media" not in failed["checkpoints"], failed["checkpoints"]
    async with aiohttp.ClientSession() as http:
        kept = await gcs_names(http, emulator, CHECKPOINT_BUCKET, f"_checkpoints/{job_id}/")
        assert [n.rsplit("/", 1)[1] for n in kept] == [failed["checkpoints"]["pcm"]["file"]]
        await checkpoints_gone(http, emulator, job_id)  # swept 2 s after the job ended
        # published outputs serving as checkpoints are results, not the janitor's to remove
        for key in set(failed["checkpoints"]) - {"pcm"}:
            assert await gcs_read(http, emulator, failed["checkpoints"][key]["uri"])


async def test_a_stage_that_completes_during_a_database_outage_is_stored_when_the_database_is_back(
    make_client, make_settings
):
    """The download finishes while PostgreSQL is down: the job neither fails nor runs the stage
    again; its completion is written once the database is back, and the job completes."""
    with running_server() as server:
        recorder = Recorder()
        settings = make_settings(database_url=server.create_database(), database_timeout_seconds=3)
        client = await make_client(settings, simple_pipeline(recorder, download=True))
        resp = await client.post("/api/v1/analysis", json={"url": OUTAGE_URL})
        assert resp.status == 202
        job_id = (await resp.json())["job_id"]
        async with asyncio.timeout(20):
            while "start" not in recorder.events("download"):
                await asyncio.sleep(0.05)
        await asyncio.to_thread(server.stop, "fast")
        recorder.gate("download").set()  # the stage completes while the database is down
        async with asyncio.timeout(10):
            while "end" not in recorder.events("download"):
                await asyncio.sleep(0.05)
        await asyncio.sleep(FINAL_SAVE_WINDOW)  # longer than a failed job's own final-save retries
        await asyncio.to_thread(server.start)
        done = await wait_status(client, job_id, {"completed", "failed"})
        assert done["status"] == "completed", done
        assert recorder.events("download") == ["start", "end"]  # not run again
        assert done["stages"][0]["attempts"] == 1
