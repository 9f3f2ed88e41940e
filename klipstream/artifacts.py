"""The artifacts a job can produce: their keys, file names and storage kinds.

File names are the ones the existing frontend and buckets already use, so they live in one table
instead of being spelled out in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StorageKind(StrEnum):
    RAW = "raw"  # media and audio: bucket klipstream-vods-raw
    TRANSCRIPTS = "transcripts"  # bucket klipstream-transcripts
    CHATLOGS = "chatlogs"  # bucket klipstream-chatlogs
    ANALYSIS = "analysis"  # bucket klipstream-analysis
    INTERNAL = "internal"  # kept in the job directory only, never published


@dataclass(frozen=True)
class ArtifactSpec:
    key: str
    pattern: str  # file name, `{id}` is the video id
    kind: StorageKind
    content_type: str

    def filename(self, video_id: str, ext: str | None = None) -> str:
        name = self.pattern.format(id=video_id)
        if ext is not None:
            name = name.rsplit(".", 1)[0] + "." + ext
        return name

    @property
    def published(self) -> bool:
        return self.kind is not StorageKind.INTERNAL


_SPECS = [
    ArtifactSpec("media", "source_{id}.media", StorageKind.INTERNAL, "application/octet-stream"),
    ArtifactSpec("pcm", "audio_{id}_16k.pcm", StorageKind.INTERNAL, "application/octet-stream"),
    ArtifactSpec("features", "audio_{id}_features.npz", StorageKind.ANALYSIS, "application/octet-stream"),
    ArtifactSpec("video", "video_{id}.mp4", StorageKind.RAW, "video/mp4"),
    ArtifactSpec("audio", "audio_{id}.mp3", StorageKind.RAW, "audio/mpeg"),
    ArtifactSpec("waveform", "audio_{id}_waveform.json", StorageKind.RAW, "application/json"),
    ArtifactSpec("chat_json", "{id}_chat.json", StorageKind.CHATLOGS, "application/json"),
    ArtifactSpec("chat_csv", "{id}_chat.csv", StorageKind.CHATLOGS, "text/csv"),
    ArtifactSpec("transcript_json", "audio_{id}_transcript.json", StorageKind.TRANSCRIPTS, "application/json"),
    ArtifactSpec("words_csv", "audio_{id}_words.csv", StorageKind.TRANSCRIPTS, "text/csv"),
    ArtifactSpec("paragraphs_csv", "audio_{id}_paragraphs.csv", StorageKind.TRANSCRIPTS, "text/csv"),
    ArtifactSpec("segments_csv", "audio_{id}_segments.csv", StorageKind.TRANSCRIPTS, "text/csv"),
    ArtifactSpec("chat_sentiment_csv", "{id}_chat_sentiment.csv", StorageKind.ANALYSIS, "text/csv"),
    ArtifactSpec("chat_signals", "{id}_chat_signals.npz", StorageKind.INTERNAL, "application/octet-stream"),
    ArtifactSpec("viewer_clips", "{id}_viewer_clips.json", StorageKind.ANALYSIS, "application/json"),
    ArtifactSpec("sentiment_csv", "audio_{id}_sentiment.csv", StorageKind.ANALYSIS, "text/csv"),
    ArtifactSpec("sentiment_json", "audio_{id}_sentiment.json", StorageKind.ANALYSIS, "application/json"),
    ArtifactSpec("integrated_json", "integrated_{id}.json", StorageKind.ANALYSIS, "application/json"),
    ArtifactSpec("highlights_json", "{id}_highlights.json", StorageKind.ANALYSIS, "application/json"),
    ArtifactSpec("top_highlights_csv", "{id}_top_highlights.csv", StorageKind.ANALYSIS, "text/csv"),
    ArtifactSpec("clips_json", "{id}_clips.json", StorageKind.ANALYSIS, "application/json"),
    ArtifactSpec("captions_srt", "{id}_captions.srt", StorageKind.TRANSCRIPTS, "application/x-subrip"),
    ArtifactSpec("captions_vtt", "{id}_captions.vtt", StorageKind.TRANSCRIPTS, "text/vtt"),
    ArtifactSpec("edit_otio", "{id}_highlights.otio", StorageKind.ANALYSIS, "application/json"),
    ArtifactSpec("edit_edl", "{id}_highlights.edl", StorageKind.ANALYSIS, "text/plain"),
    ArtifactSpec("edit_fcpxml", "{id}_highlights.xml", StorageKind.ANALYSIS, "application/xml"),
]

ARTIFACTS: dict[str, ArtifactSpec] = {spec.key: spec for spec in _SPECS}

# Artifacts made once per highlight: key `{family}_{n}` (n = the highlight's rank, 1-999), file
# name with n zero-padded so a directory listing sorts in rank order.
_PER_HIGHLIGHT = {
    spec.key: spec
    for spec in [
        ArtifactSpec("clip", "{id}_clip_{n}.mp4", StorageKind.RAW, "video/mp4"),
        ArtifactSpec("vertical", "{id}_vertical_{n}.mp4", StorageKind.RAW, "video/mp4"),
        ArtifactSpec("thumbnail", "{id}_thumbnail_{n}.jpg", StorageKind.RAW, "image/jpeg"),
        ArtifactSpec("clip_srt", "{id}_clip_{n}.srt", StorageKind.TRANSCRIPTS, "application/x-subrip"),
        ArtifactSpec("clip_vtt", "{id}_clip_{n}.vtt", StorageKind.TRANSCRIPTS, "text/vtt"),
    ]
}
PER_HIGHLIGHT_FAMILIES = tuple(_PER_HIGHLIGHT)
MAX_PER_HIGHLIGHT = 999


def per_highlight_key(family: str, n: int) -> str:
    if family not in _PER_HIGHLIGHT or not 1 <= n <= MAX_PER_HIGHLIGHT:
        raise KeyError(f"no per-highlight artifact {family!r} number {n}")
    return f"{family}_{n}"


def _indexed(key: str) -> ArtifactSpec | None:
    family, _, number = key.rpartition("_")
    template = _PER_HIGHLIGHT.get(family)
    if template is None or not number.isdigit() or number != str(int(number)):
        return None
    n = int(number)
    if not 1 <= n <= MAX_PER_HIGHLIGHT:
        return None
    pattern = template.pattern.replace("{n}", f"{n:03d}")
    return ArtifactSpec(key, pattern, template.kind, template.content_type)


def spec(key: str) -> ArtifactSpec:
    try:
        return ARTIFACTS[key]
    except KeyError:
        indexed = _indexed(key)
        if indexed is not None:
            return indexed
        raise KeyError(f"unknown artifact key {key!r}; add it to klipstream/artifacts.py") from None
