"""Stage `audio`: the one decode of the downloaded media (klipstream.acquisition.audio_pass) in a worker thread."""

from __future__ import annotations

import asyncio

from klipstream.acquisition.audio_pass import AudioPassOutputs, PassCancelled, playback_format, run_audio_pass
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage


async def run(ctx: StageContext) -> None:
    fmt = playback_format()
    outputs = AudioPassOutputs(
        pcm=ctx.output_path("pcm"),
        audio=ctx.output_path("audio", fmt.ext),
        waveform=ctx.output_path("waveform"),
        features=ctx.output_path("features"),
    )
    loop = asyncio.get_running_loop()

    def progress(seconds: float, fraction: float) -> None:
        ctx.progress_threadsafe(loop, fraction, f"{seconds / 60:.1f} min of audio decoded")

    expected = ctx.video.duration_seconds if ctx.video is not None else None
    try:
        result = await ctx.to_thread(
            run_audio_pass,
            ctx.input("media"),
            outputs,
            cancelled=ctx.cancelled,
            progress=progress,
            expected_seconds=expected,
            max_seconds=ctx.settings.max_video_seconds,
            playback=fmt,
        )
    except PassCancelled:
        raise asyncio.CancelledError() from None
    for warning in result.warnings:
        ctx.warn(warning)
    ctx.add_artifact("pcm", outputs.pcm)
    ctx.add_artifact("audio", outputs.audio)
    ctx.add_artifact("waveform", outputs.waveform)
    ctx.add_artifact("features", outputs.features)


AUDIO = Stage(
    name="audio",
    display=DisplayStage.PROCESSING_AUDIO,
    run=run,
    needs=("media",),
    provides=("pcm", "audio", "waveform", "features"),
    weight=1.0,
    resource=Resource.CPU,
)
