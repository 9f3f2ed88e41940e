"""Stage: speech to text, with word timestamps, through the shared transcription pool.

The stage only moves data: the pool (ctx.transcriber, one klipstream.transcription.pool.Transcriber
per process) does the work in worker processes, and klipstream.transcription.files writes the four
artifacts. Cancelling the stage cancels the job's chunks in the pool (queued ones dropped, a busy
worker killed and replaced).
"""

from __future__ import annotations

from klipstream.errors import InternalError
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from klipstream.transcription.files import write_all
from klipstream.transcription.vad import BYTES_PER_SAMPLE, SAMPLE_RATE

OUTPUTS = ("transcript_json", "words_csv", "paragraphs_csv", "segments_csv")


def _audio_seconds(ctx: StageContext) -> float:
    pcm = ctx.optional_input("pcm")
    try:
        return pcm.stat().st_size / BYTES_PER_SAMPLE / SAMPLE_RATE if pcm is not None else 0.0
    except OSError:
        return 0.0


def _timeout(ctx: StageContext) -> float:
    """Ten minutes of slack (model start, other jobs' chunks ahead in the pool) plus four times
    the audio length: tiny.en runs at ~0.06x real time here, so only a far larger model on a slow
    CPU comes near this bound."""
    return 600.0 + 4.0 * _audio_seconds(ctx)


async def run(ctx: StageContext) -> None:
    transcriber = ctx.transcriber
    if transcriber is None:
        raise InternalError("the transcription pool service is not configured")

    def on_progress(done: float, total: float, detail: str) -> None:
        ctx.progress(done / total if total > 0 else 0.0, detail)

    transcript = await transcriber.transcribe(
        ctx.input("pcm"),
        language=ctx.options.language,
        initial_prompt=ctx.options.initial_prompt,
        on_progress=on_progress,
    )
    paths = [ctx.output_path(key) for key in OUTPUTS]
    await ctx.to_thread(write_all, transcript, *paths)
    for key, path in zip(OUTPUTS, paths, strict=True):
        ctx.add_artifact(key, path)
    ctx.progress(1.0, f"{len(transcript.segments)} segments")


TRANSCRIBE = Stage(
    name="transcribe",
    display=DisplayStage.TRANSCRIBING,
    run=run,
    needs=("pcm",),
    provides=OUTPUTS,
    weight=6.0,
    resource=Resource.TRANSCRIPTION,
    timeout=_timeout,
)
