"""The three analysis stages on generated streams: artifact shapes, and degraded inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import aiohttp
import pytest

from klipstream.analysis.chat_scoring import CHAT_SENTIMENT_COLUMNS
from klipstream.analysis.transcript_windows import SENTIMENT_COLUMNS
from klipstream.stages.chat_analysis import CHAT_ANALYSIS
from klipstream.stages.highlights import HIGHLIGHTS, TOP_HIGHLIGHTS_COLUMNS
from klipstream.stages.transcript_analysis import TRANSCRIPT_ANALYSIS
from tests import synthetic
from tests.stage_helpers import make_context

HIGHLIGHT_KEYS = {"rank", "start_time", "end_time", "score", "dominant_emotion", "contributions", "reason"}


@pytest.fixture(scope="module")
def stream() -> synthetic.SyntheticStream:
    return synthetic.generate(seed=7, duration=900.0)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


async def _run_all(tmp_path: Path, files: dict[str, Path], **options: object) -> tuple[dict[str, Path], list]:
    inputs = dict(files)
    async with aiohttp.ClientSession() as http:
        if "chat_json" in files:
            ctx, _ = make_context(CHAT_ANALYSIS, tmp_path / "job", http, inputs=inputs)
            await CHAT_ANALYSIS.run(ctx)
            inputs.update(ctx.outputs)
        if "segments_csv" in files:
            ctx, _ = make_context(TRANSCRIPT_ANALYSIS, tmp_path / "job", http, inputs=inputs)
            await TRANSCRIPT_ANALYSIS.run(ctx)
            inputs.update(ctx.outputs)
        ctx, sink = make_context(HIGHLIGHTS, tmp_path / "job", http, inputs=inputs, options=dict(options))
        await HIGHLIGHTS.run(ctx)
        inputs.update(ctx.outputs)
    return inputs, sink.highlights


async def test_all_stages_write_their_artifacts(tmp_path: Path, stream: synthetic.SyntheticStream) -> None:
    files = stream.write(tmp_path / "in")
    out, highlights = await _run_all(tmp_path, files, top_n=5)

    columns, rows = _read_csv(out["chat_sentiment_csv"])
    assert tuple(columns) == CHAT_SENTIMENT_COLUMNS
    assert columns[:11] == [
        "start_time", "end_time", "message_count", "avg_sentiment", "avg_highlight", "avg_excitement",
        "avg_funny", "avg_happiness", "avg_anger", "avg_sadness", "avg_neutral",
    ]  # fmt: skip
    assert float(rows[0]["start_time"]) == 0.0 and float(rows[1]["start_time"]) == 30.0  # anchored at 0
    assert sum(int(r["message_count"]) for r in rows) > 0

    columns, rows = _read_csv(out["sentiment_csv"])
    assert tuple(columns) == SENTIMENT_COLUMNS
    assert {r["model"] for r in rows} <= {"vader-lexicon-1", "no-speech"}
    for r in rows:
        assert -1 <= float(r["sentiment_score"]) <= 1
        for k in ("excitement", "funny", "happiness", "anger", "sadness", "neutral", "highlight_score"):
            assert 0 <= float(r[k]) <= 1
        assert 0 <= float(r["relative_intensity"]) <= 1 and 0 <= float(r["absolute_intensity"]) <= 1
    as_json = json.loads(out["sentiment_json"].read_text())
    assert isinstance(as_json, list) and list(as_json[0]) == list(SENTIMENT_COLUMNS)

    integrated = json.loads(out["integrated_json"].read_text())
    assert integrated["windows"] and set(integrated["signals"]) == {
        "loudness", "flux", "speech", "voice", "chat_surge",
    }  # fmt: skip
    assert all(0 <= w["highlight_score"] <= 1 for w in integrated["windows"])

    doc = json.loads(out["highlights_json"].read_text())
    assert len(doc["highlights"]) == 5
    columns, rows = _read_csv(out["top_highlights_csv"])
    assert tuple(columns) == TOP_HIGHLIGHTS_COLUMNS
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["start_timestamp"].count(":") == 2

    assert len(highlights) == 5
    for h in highlights:
        assert HIGHLIGHT_KEYS <= set(h)
        assert h["reason"].startswith("Picked because") and h["reason"].endswith(".")
        assert abs(sum(h["contributions"].values()) - h["score"]) < 1e-3
        assert isinstance(h["chat_samples"], list) and isinstance(h["transcript_excerpt"], str)
    scores = [h["score"] for h in highlights]
    assert scores == sorted(scores, reverse=True)
    # The top pick is a planted moment, and it comes with its evidence.
    top = highlights[0]
    assert any(top["start_time"] < e.end + 20 and top["end_time"] > e.start - 20 for e in stream.moments)
    assert top["chat_samples"] and top["transcript_excerpt"]


async def test_highlights_without_chat(tmp_path: Path, stream: synthetic.SyntheticStream) -> None:
    files = stream.write(tmp_path / "in")
    del files["chat_json"]
    out, highlights = await _run_all(tmp_path, files)
    assert "chat_surge" not in json.loads(out["integrated_json"].read_text())["signals"]
    assert len(highlights) == 10
    assert all(h["chat_samples"] == [] and "chat_surge" not in h["contributions"] for h in highlights)
    _, rows = _read_csv(out["top_highlights_csv"])
    assert all(r["audience_reaction"] == "" for r in rows)


async def test_highlights_without_speech(tmp_path: Path) -> None:
    silent = synthetic.generate(seed=3, duration=900.0, speech=False)
    files = silent.write(tmp_path / "in")
    out, highlights = await _run_all(tmp_path, files)
    _, rows = _read_csv(out["sentiment_csv"])
    assert rows and all(r["model"] == "no-speech" and r["text"] == "" for r in rows)
    assert "speech" not in json.loads(out["integrated_json"].read_text())["signals"]
    assert highlights and all(h["transcript_excerpt"] == "" for h in highlights)
    hits = [
        m
        for m in silent.moments
        if any(h["start_time"] < m.end + 20 and h["end_time"] > m.start - 20 for h in highlights)
    ]
    assert len(hits) >= 2  # chat alone still finds the moments viewers reacted to


async def test_highlights_with_audio_only(tmp_path: Path, stream: synthetic.SyntheticStream) -> None:
    files = stream.write(tmp_path / "in")
    out, highlights = await _run_all(tmp_path, {"features": files["features"]}, top_n=3)
    assert len(highlights) == 3
    assert set(json.loads(out["integrated_json"].read_text())["signals"]) == {"loudness", "flux", "voice"}


def test_stage_declarations() -> None:
    assert CHAT_ANALYSIS.name == "chat_analysis" and CHAT_ANALYSIS.needs == ("chat_json",)
    assert "chat_sentiment_csv" in CHAT_ANALYSIS.provides
    assert TRANSCRIPT_ANALYSIS.needs == ("segments_csv", "features")
    assert TRANSCRIPT_ANALYSIS.provides == ("sentiment_csv", "sentiment_json")
    assert HIGHLIGHTS.needs == ("features",)
    assert HIGHLIGHTS.provides == ("integrated_json", "highlights_json", "top_highlights_csv")


def test_analysis_stops_when_cancelled(stream: synthetic.SyntheticStream, tmp_path: Path) -> None:
    import threading

    from klipstream.acquisition.chat_archive import iter_chat
    from klipstream.analysis.cancel import Cancelled
    from klipstream.analysis.pipeline import analyze_messages

    path = tmp_path / "chat.json"
    path.write_text(json.dumps(stream.chat), encoding="utf-8")
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):
        analyze_messages(list(iter_chat(path)), stream.duration, (), cancelled=cancelled)
