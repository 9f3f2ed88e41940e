"""Stage chat_analysis: per-second chat signals and the 30 s chat table, as soon as the chat exists.

Needs only the chat, so it runs while the audio is still being transcribed. The work streams the
chat artifact in a child process (`python -m klipstream.stages.chat_analysis`): scoring a
million messages holds a GIL for seconds, and the event loop must not wait behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from klipstream.analysis.chat_scoring import write_chat_sentiment_csv
from klipstream.analysis.pipeline import analyze_chat
from klipstream.chat import ChatMessage
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from klipstream.proc import child_main, report, run_python


async def run(ctx: StageContext) -> None:
    ctx.progress(0.0, "reading chat")
    duration = ctx.video.duration_seconds if ctx.video and ctx.video.duration_seconds else 0.0
    csv_path = ctx.output_path("chat_sentiment_csv")
    signals_path = ctx.output_path("chat_signals")
    result = await run_python(
        __name__,
        [
            str(ctx.input("chat_json")),
            str(signals_path),
            str(csv_path),
            "--duration",
            str(duration),
            "--bots",
            ",".join(ctx.settings.bot_accounts),
        ],
        timeout=ctx.settings.stage_timeout_seconds,
        on_progress=ctx.progress,
    )
    ctx.add_artifact("chat_sentiment_csv", csv_path)
    ctx.add_artifact("chat_signals", signals_path)
    dropped = (
        f"{result['bot_messages']} from bots, {result['commands']} commands "
        f"and {result['system_events']} Twitch notices"
    )
    ctx.progress(1.0, f"{result['kept']} messages analysed ({dropped} set aside)")


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="chat_analysis")
    parser.add_argument("chat_json", type=Path)
    parser.add_argument("signals", type=Path)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--bots", default="")
    args = parser.parse_args(argv)
    from klipstream.acquisition.chat_archive import iter_chat_file

    size = max(1, args.chat_json.stat().st_size)

    def read() -> Iterator[tuple[int, ChatMessage]]:
        for i, (offset, message) in enumerate(iter_chat_file(args.chat_json)):
            if i % 50_000 == 0 and i:
                report(0.85 * max(0, offset) / size, f"{i:,} chat messages scored")
            yield offset, message

    bots = [b for b in args.bots.split(",") if b]
    analysis = analyze_chat(read, args.duration, bots)
    report(0.9, "writing chat analytics")
    write_chat_sentiment_csv(analysis.rows, args.csv)
    analysis.signals.save(args.signals)
    stats = analysis.stats
    summary = {
        "kept": stats.kept,
        "bot_messages": stats.bot_messages,
        "commands": stats.commands,
        "system_events": stats.system_events,
        "learned_tokens": analysis.signals.learned_tokens[:10],
    }
    print(json.dumps({"result": summary}), flush=True)


CHAT_ANALYSIS = Stage(
    name="chat_analysis",
    display=DisplayStage.ANALYZING,
    run=run,
    needs=("chat_json",),
    provides=("chat_sentiment_csv", "chat_signals"),
    weight=1.0,
    resource=Resource.CPU,
)


if __name__ == "__main__":
    child_main(_child, sys.argv[1:])
