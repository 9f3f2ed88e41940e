"""Stage chat_analysis: per-message scores and chat aggregates, as soon as the chat exists.

Needs only the chat, so it runs while the audio is still being transcribed.
"""

from __future__ import annotations

from klipstream.acquisition.chat_archive import read_chat_json
from klipstream.analysis.chat_scoring import write_chat_sentiment_csv
from klipstream.analysis.pipeline import ChatAnalysis, analyze_chat
from klipstream.errors import InternalError, InvalidVideoUrl
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage


async def run(ctx: StageContext) -> None:
    ctx.progress(0.0, "reading chat")
    try:
        messages = await ctx.to_thread(read_chat_json, ctx.input("chat_json"))
    except InvalidVideoUrl as exc:
        raise InternalError(f"The chat artifact is malformed: {exc}.") from None
    duration = ctx.video.duration_seconds if ctx.video and ctx.video.duration_seconds else 0.0
    ctx.progress(0.2, f"scoring {len(messages)} chat messages")
    result: ChatAnalysis = await ctx.to_thread(
        analyze_chat, messages, duration, ctx.settings.bot_accounts, None, ctx.cancelled
    )
    ctx.progress(0.9, "writing chat analytics")
    csv_path = ctx.output_path("chat_sentiment_csv")
    signals_path = ctx.output_path("chat_signals")
    await ctx.to_thread(write_chat_sentiment_csv, result.rows, csv_path)
    await ctx.to_thread(result.signals.save, signals_path)
    ctx.add_artifact("chat_sentiment_csv", csv_path)
    ctx.add_artifact("chat_signals", signals_path)
    stats = result.stats
    ctx.progress(
        1.0, f"{stats.kept} messages analysed ({stats.bot_messages} from bots and {stats.commands} commands dropped)"
    )


CHAT_ANALYSIS = Stage(
    name="chat_analysis",
    display=DisplayStage.ANALYZING,
    run=run,
    needs=("chat_json",),
    provides=("chat_sentiment_csv", "chat_signals"),
    weight=1.0,
    resource=Resource.CPU,
)
