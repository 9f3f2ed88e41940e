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
]

ARTIFACTS: dict[str, ArtifactSpec] = {spec.key: spec for spec in _SPECS}


def spec(key: str) -> ArtifactSpec:
    try:
        return ARTIFACTS[key]
    except KeyError:
        raise KeyError(f"unknown artifact key {key!r}; add it to klipstream/artifacts.py") from None
