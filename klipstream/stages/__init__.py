"""The shipped pipeline, one module per stage, in dependency order.

Order matters only for display (the current stage shown is the earliest running one) and for the
ETA's critical path; the runner starts each stage when its inputs exist.
"""

from __future__ import annotations

from klipstream.jobs.stage import Stage


def default_pipeline() -> list[Stage]:
    from klipstream.stages.audio import AUDIO
    from klipstream.stages.chat import CHAT
    from klipstream.stages.chat_analysis import CHAT_ANALYSIS
    from klipstream.stages.clips import CLIPS
    from klipstream.stages.download import DOWNLOAD
    from klipstream.stages.highlights import HIGHLIGHTS
    from klipstream.stages.transcribe import TRANSCRIBE
    from klipstream.stages.transcript_analysis import TRANSCRIPT_ANALYSIS

    return [DOWNLOAD, CHAT, AUDIO, TRANSCRIBE, CHAT_ANALYSIS, TRANSCRIPT_ANALYSIS, HIGHLIGHTS, CLIPS]
