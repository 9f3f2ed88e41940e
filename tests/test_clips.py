"""Clips, captions, thumbnails and edit lists on generated media (no server; see test_clips_api)."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import opentimelineio as otio
import pysubs2
import pytest
import webvtt

from klipstream.artifacts import per_highlight_key, spec
from klipstream.clips import captions as cap
from klipstream.clips.cut import cut_clip, probe, thumbnail
from klipstream.clips.editlists import EditClip, edl_rate, timeline, write_all
from klipstream.clips.encoding import Encoder, choose
from klipstream.clips.vertical import Box, Fill, Layout, even, filter_graph
from klipstream.clips.worker import ClipTask, Plan, VerticalPlan
from klipstream.clips.worker import run as run_worker
from klipstream.models import JobOptions
from klipstream.transcript import Segment, Word
from tests.clip_checks import inspect_clip, source_frame_at
from tests.media_fixtures import read_counter, write_counter_video

FPS = 30
X264 = choose("libx264", "veryfast", 21)


@pytest.fixture(scope="module")
def ts_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_counter_video(tmp_path_factory.mktemp("src") / "vod.ts", 16.0)


@pytest.fixture(scope="module")
def mp4_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_counter_video(tmp_path_factory.mktemp("src") / "vod.mp4", 12.0)


def _assert_exact(path: Path, source: Path, start: float, end: float) -> None:
    facts = inspect_clip(path)
    first = source_frame_at(source, start)
    frames = round((end - start) * FPS)
    assert facts.counters[0] == first, "the first frame is the requested one"
    assert facts.counters == list(range(first, first + len(facts.counters))), "no frame lost, doubled or reordered"
    assert abs(len(facts.counters) - frames) <= 1
    assert abs(facts.duration - (end - start)) <= 1 / FPS + 1e-3
    assert facts.sync_errors, "the clip has its beeps"
    assert max(abs(e) for e in facts.sync_errors) < 0.040
    assert facts.moov_before_mdat, "faststart: the index comes first"


@pytest.mark.parametrize("span", [(2.5, 7.3), (3.0, 6.0), (5.02, 9.98), (11.1, 15.9)])
def test_smart_cut_is_frame_accurate_and_in_sync(ts_source: Path, tmp_path: Path, span: tuple[float, float]) -> None:
    start, end = span
    result = cut_clip(ts_source, tmp_path / "clip.mp4", start, end, height=720, encoding=X264)
    assert result.method == "smart"  # whole GOPs copied
    assert result.encoded_frames < result.frames - FPS  # at most the two edge GOPs were re-encoded
    _assert_exact(tmp_path / "clip.mp4", ts_source, start, end)


@pytest.mark.parametrize(("bframes", "gop"), [(0, 45), (3, 60)])
def test_smart_cut_of_other_gop_shapes(tmp_path: Path, bframes: int, gop: int) -> None:
    """No B-frames (low-latency encoders) and three of them with longer GOPs."""
    source = write_counter_video(tmp_path / "vod.ts", 9.0, bframes=bframes, gop=gop)
    result = cut_clip(source, tmp_path / "clip.mp4", 0.9, 7.7, height=720, encoding=X264)
    assert result.method == "smart"
    _assert_exact(tmp_path / "clip.mp4", source, 0.9, 7.7)


def test_smart_cut_of_an_mp4_source(mp4_source: Path, tmp_path: Path) -> None:
    """Length-prefixed H.264 (MP4) is converted to Annex B to share a track with the re-encoded edges."""
    result = cut_clip(mp4_source, tmp_path / "clip.mp4", 1.4, 8.8, height=720, encoding=X264)
    assert result.method == "smart"
    _assert_exact(tmp_path / "clip.mp4", mp4_source, 1.4, 8.8)


def test_mp2_audio_is_reencoded_to_aac_in_sync(tmp_path: Path) -> None:
    """MPEG-TS with MP2 audio (broadcast captures): MP4 wants AAC, so the sound is re-encoded."""
    source = write_counter_video(tmp_path / "mp2.ts", 8.0, audio_codec="mp2")
    cut_clip(source, tmp_path / "clip.mp4", 1.3, 6.6, height=720, encoding=X264)
    with av.open(str(tmp_path / "clip.mp4")) as clip:
        assert clip.streams.audio[0].codec_context.name == "aac"
    _assert_exact(tmp_path / "clip.mp4", source, 1.3, 6.6)


def test_scaled_clip_is_reencoded_frame_accurately(ts_source: Path, tmp_path: Path) -> None:
    result = cut_clip(ts_source, tmp_path / "clip.mp4", 4.2, 9.1, height=120, encoding=X264)
    assert result.method == "reencode"
    _assert_exact(tmp_path / "clip.mp4", ts_source, 4.2, 9.1)
    assert inspect_clip(tmp_path / "clip.mp4").height == 120


def test_span_without_a_whole_gop_is_reencoded(ts_source: Path, tmp_path: Path) -> None:
    result = cut_clip(ts_source, tmp_path / "clip.mp4", 6.6, 7.5, height=720, encoding=X264)
    assert result.method == "reencode"
    _assert_exact(tmp_path / "clip.mp4", ts_source, 6.6, 7.5)


def test_thumbnail_is_the_peak_frame(ts_source: Path, tmp_path: Path) -> None:
    at = thumbnail(ts_source, tmp_path / "t.jpg", 5.5, height=720)
    assert abs(at - 5.5) <= 1 / FPS
    with av.open(str(tmp_path / "t.jpg")) as image:
        frame = next(iter(image.decode(video=0)))
        assert (frame.width, frame.height) == (320, 180)
        assert abs(read_counter(frame.to_ndarray(format="gray")) - source_frame_at(ts_source, 5.5)) <= 1


# --- captions ---------------------------------------------------------------------------------------
def _words(text: str, start: float, step: float = 0.3) -> list[Word]:
    return [Word(start + i * step, start + i * step + 0.25, " " + w, 0.9) for i, w in enumerate(text.split())]


SAID = _words("so that was the craziest clutch I have ever seen in my whole life honestly", 1.0) + _words(
    "what? no way. chat did you see that", 7.0
)


def test_cues_follow_word_timings_and_break_sensibly() -> None:
    words = cap.all_words([Segment(0, 0.0, 12.0, "", tuple(SAID))])
    cues = cap.build_cues(words)
    assert cues[0].start == pytest.approx(1.0)
    for cue in cues:
        assert cue.start == pytest.approx(cue.words[0].start) and cue.end <= cue.words[-1].end + 1e-9
        assert all(len(line) <= cap.SUBTITLES.max_chars for line in cue.lines)
        assert len(cue.lines) <= 2
    # the pause before 7.0 s and the sentence ends break cues
    assert any(c.text.endswith("what?") for c in cues) and any(c.start == pytest.approx(7.0) for c in cues)
    short = cap.build_cues(words, cap.VERTICAL)
    assert all(len(line) <= cap.VERTICAL.max_chars or " " not in line for c in short for line in c.lines)
    assert cap.split_lines("a bb ccc dddd eeeee ffffff".split(), 14) == ("a bb ccc dddd", "eeeee ffffff")


def test_srt_and_webvtt_parse_with_real_parsers(tmp_path: Path) -> None:
    words = cap.all_words([Segment(0, 0.0, 12.0, "", (*SAID, Word(11.0, 11.4, " <b>&", 0.9)))])
    cues = cap.build_cues(words)
    (tmp_path / "a.srt").write_text(cap.srt(cues), encoding="utf-8")
    (tmp_path / "a.vtt").write_text(cap.webvtt(cues), encoding="utf-8")
    subs = pysubs2.load(str(tmp_path / "a.srt"))
    assert len(subs) == len(cues)
    for event, cue in zip(subs, cues, strict=True):
        assert abs(event.start / 1000 - cue.start) < 0.002 and abs(event.end / 1000 - cue.end) < 0.002
        assert event.plaintext == cue.text.replace("<", "‹").replace(">", "›")  # not read as a tag
    vtt = webvtt.read(str(tmp_path / "a.vtt"))
    assert len(vtt.captions) == len(cues)
    assert vtt.captions[0].start == cap._clock(cues[0].start, ".")
    assert vtt.captions[-1].text == "&lt;b&gt;&amp;"  # escaped as the WebVTT spec requires


def test_clip_words_are_relative_to_the_clip() -> None:
    words = cap.words_between([Segment(0, 0.0, 12.0, "", tuple(SAID))], 7.0, 9.0)
    assert [w.text for w in words] == ["what?", "no", "way.", "chat", "did", "you", "see"]
    assert words[0].start == pytest.approx(0.0)


def test_burned_captions_highlight_each_word_in_turn() -> None:
    words = cap.all_words([Segment(0, 0.0, 12.0, "", tuple(SAID[:4]))])
    text = cap.ass(cap.build_cues(words, cap.VERTICAL), 1080, 1920)
    events = [line for line in text.splitlines() if line.startswith("Dialogue:")]
    assert len(events) == 4
    assert events[0].startswith("Dialogue: 0,0:00:01.00,0:00:01.30,")
    assert all(line.count("\\c&H0000D7FF&") == 1 for line in events)


# --- edit lists -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fps", [Fraction(30), Fraction(30000, 1001), Fraction(60)])
def test_edit_lists_read_back_with_the_same_ranges(tmp_path: Path, fps: Fraction) -> None:
    clips = [EditClip(1, 12.5, 42.5, 30.0, "Highlight 1: clutch"), EditClip(2, 100.0, 131.2, 110.0, "Highlight 2")]
    edit = timeline(clips, source_name="video_1.mp4", source_url="video_1.mp4", duration=3600.0, fps=fps)
    write_all(edit, tmp_path / "e.otio", tmp_path / "e.edl", tmp_path / "e.xml")
    rate = edl_rate(fps)
    for path, adapter, extra in (
        (tmp_path / "e.edl", "cmx_3600", {"rate": rate}),
        (tmp_path / "e.xml", "fcp_xml", {}),
        (tmp_path / "e.otio", "otio_json", {}),
    ):
        back = list(otio.adapters.read_from_file(str(path), adapter_name=adapter, **extra).find_clips())
        assert len(back) == 2, adapter
        for clip, read in zip(clips, back, strict=True):
            got = read.source_range
            assert abs(got.start_time.to_seconds() - clip.start) <= 1 / float(fps), adapter
            assert abs(got.end_time_exclusive().to_seconds() - clip.end) <= 1 / float(fps), adapter
        if adapter != "cmx_3600":
            assert abs(back[0].markers[0].marked_range.start_time.to_seconds() - 30.0) <= 1 / float(fps)


# --- the worker ----------------------------------------------------------------------------------------
def _plan(tmp_path: Path, source: Path, **overrides: object) -> Plan:
    transcript = tmp_path / "t.json"
    segment = {"id": 0, "start": 1.0, "end": 12.0, "text": "", "words": [w._asdict() for w in SAID]}
    transcript.write_text(json.dumps({"segments": [segment]}))
    fields: dict[str, object] = {
        "video": str(source),
        "directory": str(tmp_path),
        "height": 720,
        "codec": "libx264",
        "preset": "veryfast",
        "crf": 21,
        "manifest": "m.json",
        "otio": "e.otio",
        "edl": "e.edl",
        "fcpxml": "e.xml",
        "source_name": "video_1.ts",
        "captions_srt": "all.srt",
        "captions_vtt": "all.vtt",
        "transcript": str(transcript),
        "vertical": VerticalPlan(width=360, height=640, fill="crop"),
        "clips": [
            ClipTask(1, 1, 0.8, 4.6, 2.0, "H1", "c1.mp4", "t1.jpg", "v1.mp4", "c1.srt", "c1.vtt"),
            ClipTask(2, 2, 6.9, 9.5, 8.0, "H2", "c2.mp4", "t2.jpg", None, "c2.srt", "c2.vtt"),
        ],
    }
    fields.update(overrides)
    return Plan(**fields)  # type: ignore[arg-type]


def test_worker_makes_every_file(ts_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = run_worker(_plan(tmp_path, ts_source))
    assert [c["files"] for c in manifest["clips"]] == [
        {"clip": "c1.mp4", "thumbnail": "t1.jpg", "srt": "c1.srt", "vtt": "c1.vtt", "vertical": "v1.mp4"},
        {"clip": "c2.mp4", "thumbnail": "t2.jpg", "srt": "c2.srt", "vtt": "c2.vtt"},
    ]
    vertical = inspect_clip(tmp_path / "v1.mp4")
    assert (vertical.width, vertical.height) == (360, 640)
    assert abs(vertical.duration - (4.6 - 0.8)) <= 1 / FPS + 1e-3
    # per-clip captions are relative to the clip's first frame
    first = manifest["clips"][0]["start_time"]
    subs = pysubs2.load(str(tmp_path / "c1.srt"))
    assert abs(subs[0].start / 1000 - (SAID[0].start - first)) < 0.1
    lines = [line.split(" ", 2) for line in capsys.readouterr().out.splitlines()]
    fractions = [float(fraction) for prefix, fraction, _ in lines if prefix == "KSPROGRESS"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert not list(tmp_path.glob(".*.ass"))  # the burned-in captions' script is removed


def test_a_highlight_past_the_end_is_skipped_with_a_warning(ts_source: Path, tmp_path: Path) -> None:
    past = ClipTask(3, 3, 40.0, 50.0, 45.0, "H3", "c3.mp4", "t3.jpg", None, "c3.srt", "c3.vtt")
    plan = _plan(tmp_path, ts_source, vertical=None)
    plan.clips = [plan.clips[1], past]
    warnings: list[str] = []
    manifest = run_worker(plan, warnings)
    assert [c["index"] for c in manifest["clips"]] == [2]
    assert warnings == ["highlight 3 has no video frames (40.0-50.0 s); no clip was cut"]
    assert not (tmp_path / "c3.mp4").exists() and (tmp_path / "e.edl").is_file()
    plan.clips = [past]
    assert run_worker(plan)["clips"] == []  # nothing to cut: no edit list, no crash


def test_nvenc_without_a_gpu_fails_with_a_classified_error(ts_source: Path, tmp_path: Path) -> None:
    """The GPU path is configuration; here (no GPU) forcing it says so, instead of a traceback."""
    plan = _plan(tmp_path, ts_source, codec="h264_nvenc", height=120)
    (tmp_path / "plan.json").write_text(plan.to_json())
    out = subprocess.run(
        [sys.executable, "-m", "klipstream.clips.worker", str(tmp_path / "plan.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    error = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("KSERROR")).split(" ", 1)[1])
    assert error["code"] == "encoder_unavailable" and "KLIPSTREAM_CLIP_ENCODER" in error["action"]


def test_encoder_choice() -> None:
    assert choose("auto", "veryfast", 21, gpu=False).codec == Encoder.X264
    nvenc = choose("auto", "veryfast", 21, gpu=True)
    assert nvenc.codec == Encoder.NVENC and not nvenc.can_smart_cut
    assert nvenc.cli_args()[:2] == ["-c:v", "h264_nvenc"] and nvenc.options(full=True)["preset"] == "p3"
    assert X264.can_smart_cut and X264.cli_args() == ["-c:v", "libx264", "-preset", "veryfast", "-crf", "21"]


def test_probe_reads_the_source(ts_source: Path) -> None:
    info = probe(ts_source)
    assert (info.width, info.height, info.fps, info.video_codec) == (320, 180, Fraction(30), "h264")


# --- shared vocabulary ------------------------------------------------------------------------------
def test_per_highlight_artifact_keys() -> None:
    key = per_highlight_key("clip", 3)
    assert key == "clip_3" and spec(key).filename("v1") == "v1_clip_003.mp4"
    assert spec("vertical_12").content_type == "video/mp4" and spec("clip_vtt_1").filename("v") == "v_clip_001.vtt"
    for bad in ("clip_03", "clip_0", "clip_1000", "clip_x", "nothing_1"):
        with pytest.raises(KeyError):
            spec(bad)


def test_clip_options_imply_video() -> None:
    assert JobOptions(clips=True).include_video and JobOptions(clips=True).clip_options is not None
    assert JobOptions(clips={"vertical": True}).clip_options.vertical  # type: ignore[union-attr]
    assert JobOptions(clips=False).clip_options is None and not JobOptions().include_video
    with pytest.raises(ValueError, match="inside the frame"):
        JobOptions(clips={"facecam": {"x": 0.8, "y": 0.0, "width": 0.5, "height": 0.2}})


async def test_stage_without_highlights_warns_and_makes_nothing(ts_source: Path, tmp_path: Path) -> None:
    import aiohttp

    from klipstream.stages.clips import CLIPS
    from tests.stage_helpers import make_context

    (tmp_path / "h.json").write_text(json.dumps({"highlights": []}))
    async with aiohttp.ClientSession() as http:
        ctx, sink = make_context(
            CLIPS,
            tmp_path / "job",
            http,
            inputs={"highlights_json": tmp_path / "h.json", "video": ts_source},
            options={"clips": True},
        )
        await CLIPS.run(ctx)
    assert ctx.outputs == {} and sink.warnings == ["no clips were made because no highlight was found to cut"]


# --- the vertical filter graph ---------------------------------------------------------------------------
def _render(graph: str, source: tuple[int, int], size: tuple[int, int], frames: int = 3) -> np.ndarray:
    """`frames` frames of `graph` over a moving test pattern, as one uint8 array of yuv420p bytes."""
    raw = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc2=size={source[0]}x{source[1]}:rate=30,format=yuv420p", "-filter_complex", graph,
         "-map", "[out]", "-frames:v", str(frames), "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    assert len(raw) == frames * size[0] * size[1] * 3 // 2, "the graph makes frames of the layout's size"
    return np.frombuffer(raw, np.uint8)


def _whole_frame_blur(w: int, h: int, source_w: int, source_h: int) -> str:
    """The look the blurred fill must keep: the whole blurred frame scaled up, the gameplay laid over it."""
    sw, sh = even(w / 8), even(h / 8)
    return (
        f"[0:v]split=2[b][f];[b]scale={sw}:{sh}:force_original_aspect_ratio=increase,crop={sw}:{sh},"
        f"gblur=sigma=4,eq=brightness=-0.08,scale={w}:{h},setsar=1[bg];"
        f"[f]scale={w}:{h}:force_original_aspect_ratio=decrease,setsar=1[fg];[bg][fg]overlay=(W-w)/2:(H-h)/2[out]"
    )


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize(
    ("size", "source"),
    [((1080, 1920), (1280, 720)), ((562, 1000), (1280, 720)), ((360, 640), (720, 1280)), ((720, 1280), (480, 600)),
     ((360, 640), (1280, 480))],
)  # fmt: skip
def test_blurred_fill_scales_only_the_bands_and_looks_the_same(size: tuple[int, int], source: tuple[int, int]) -> None:
    """Bands above/below (or beside) the gameplay are scaled up on their own and stacked: the picture
    must match the whole-frame blur it replaces (the gameplay kept even-sized, bands within a blur's rounding)."""
    layout = Layout(size[0], size[1], Fill.BLUR, None)
    graph = filter_graph(layout, *source, None)
    assert "overlay" not in graph
    ours = _render(graph, source, size)
    reference = _render(_whole_frame_blur(*size, *source), source, size)
    assert _psnr(ours, reference) > 32  # a blur resampled differently; swapped bands score 28-30


def test_blurred_fill_under_a_facecam_keeps_the_layout() -> None:
    layout = Layout(540, 960, Fill.BLUR, Box(0.7, 0.6, 0.28, 0.36))
    frames = _render(filter_graph(layout, 1280, 720, None), (1280, 720), (540, 960), frames=1)
    assert frames.size == 540 * 960 * 3 // 2
