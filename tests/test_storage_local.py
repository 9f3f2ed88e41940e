"""LocalStorage: artifacts land under data/artifacts/{video_id}/{file} with files-route URLs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from klipstream.artifacts import spec
from klipstream.config import Settings
from klipstream.errors import InternalError, StorageError
from klipstream.integrations.storage import LocalStorage, create_storage


def _same(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b)


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings.from_env({}, data_dir=tmp_path / "data", **kw)


async def test_put_links_into_the_artifacts_dir(tmp_path: Path):
    settings = _settings(tmp_path, public_url="https://klip.example/")
    src = tmp_path / "job" / "audio_42_segments.csv"
    src.parent.mkdir()
    src.write_text("start,end,text\n0,60,hi\n")
    storage = create_storage(settings, None)  # type: ignore[arg-type]
    assert isinstance(storage, LocalStorage)
    stored = await storage.put("42", spec("segments_csv"), src)
    dest = settings.artifacts_dir / "42" / "audio_42_segments.csv"
    assert dest.read_text() == src.read_text()
    assert _same(dest, src)  # same file system: a hard link, no copy
    assert stored.url == "https://klip.example/files/42/audio_42_segments.csv"
    assert stored.uri == dest.resolve().as_uri()
    assert stored.size == src.stat().st_size
    assert stored.md5_base64 is None


async def test_root_relative_url_without_public_url(tmp_path: Path):
    src = tmp_path / "w.json"
    src.write_text("[]")
    stored = await LocalStorage(_settings(tmp_path)).put("42", spec("waveform"), src)
    assert stored.url == "/files/42/audio_42_waveform.json"


async def test_copy_when_links_are_impossible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_link(*_a, **_k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    src = tmp_path / "chat.csv"
    src.write_bytes(b"a,b\n" * 1000)
    storage = LocalStorage(_settings(tmp_path))
    stored = await storage.put("42", spec("chat_csv"), src)
    dest = Path(stored.uri.removeprefix("file://"))
    assert _read(dest) == _read(src)
    assert not _same(dest, src)


async def test_republish_replaces_and_leaves_no_temp_files(tmp_path: Path):
    storage = LocalStorage(_settings(tmp_path))
    src = tmp_path / "x.csv"
    src.write_text("one")
    await storage.put("42", spec("chat_csv"), src)
    src.unlink()
    src.write_text("two")
    await storage.put("42", spec("chat_csv"), src)
    folder = tmp_path / "data" / "artifacts" / "42"
    assert [p.name for p in folder.iterdir()] == ["42_chat.csv"]
    assert (folder / "42_chat.csv").read_text() == "two"


async def test_list_objects(tmp_path: Path):
    storage = LocalStorage(_settings(tmp_path))
    src = tmp_path / "x.csv"
    src.write_text("x")
    await storage.put("1", spec("chat_csv"), src)
    await storage.put("1", spec("words_csv"), src)
    await storage.put("2", spec("chat_csv"), src)
    assert [o.url for o in await storage.list_objects("1")] == ["/files/1/1_chat.csv", "/files/1/audio_1_words.csv"]
    assert len(await storage.list_objects()) == 3
    assert await storage.list_objects("nope") == []
    assert await storage.list_objects("../etc") == []


async def test_refuses_unsafe_ids_and_internal_artifacts(tmp_path: Path):
    storage = LocalStorage(_settings(tmp_path))
    src = tmp_path / "x"
    src.write_text("x")
    with pytest.raises(InternalError):
        await storage.put("../../etc", spec("chat_csv"), src)
    with pytest.raises(InternalError):
        await storage.put("42", spec("pcm"), src)


async def test_missing_source_is_a_storage_error(tmp_path: Path):
    with pytest.raises(StorageError):
        await LocalStorage(_settings(tmp_path)).put("42", spec("chat_csv"), tmp_path / "missing.csv")
