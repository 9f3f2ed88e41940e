"""Bench adapter for the peer detector clipsmith-ai (PyPI, MIT): its chat-only candidate builder.

    .bench-peers/clipsmith/bin/python bench/peers/clipsmith_adapter.py CHAT.jsonl \
        --top N --duration VOD_SECONDS

CHAT.jsonl: one message a line, {"t": seconds, "user": str, "text": str}.
stdout: JSON [{"start": s, "end": s, "score": float}, ...], best first, at most N.

What runs, all with clipsmith-ai's defaults (nothing tuned):
  * each line becomes a clipsmith ChatMessage through clipsmith's own Twitch parser
    (clipsmith.twitch.chat._parse_node: text stripped, `!clip` prefix flagged, hype emotes counted
    as distinct whitespace tokens in clipsmith.models.chat.HYPE_EMOTES, case-sensitive);
  * clipsmith.candidates.builder.build_candidates(chat, [], CandidatesConfig(),
    transcript=None, vod_duration_s=VOD, mp4_path=None): with no Twitch clips, no transcript and no
    media, only its two chat signals fire (!clip commands; 15 s sliding density windows, 5 s step,
    >= 4x the whole-chat baseline, +0.5 per hype emote), merged within 60 s and min-max scaled to 1..100.
The builder returns centres only (the clip's start/end are chosen later by an LLM, 15-30 s).
Here each centre becomes a span of ClipConfig().max_seconds (30 s) centred on it, clipped to
[0, VOD]. Spans are not suppressed: neighbouring candidates can overlap. clipsmith's own
pre-LLM time-spread step (selection.selector._spread_candidates, 120 s) is not applied.
"""

from __future__ import annotations

import argparse
import json
import sys

from clipsmith.candidates.builder import build_candidates
from clipsmith.models.chat import ChatLog
from clipsmith.settings import CandidatesConfig, ClipConfig
from clipsmith.twitch.chat import _parse_node


def read_chat(path: str) -> ChatLog:
    messages = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                node = {
                    "contentOffsetSeconds": float(row["t"]),
                    "commenter": {"login": str(row.get("user") or "")},
                    "message": {"fragments": [{"text": str(row.get("text") or "")}]},
                }
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"{path}:{number}: bad chat line ({exc})") from exc
            message = _parse_node(node)
            if message is not None:
                messages.append(message)
    return ChatLog(video_id="bench", messages=messages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chat", help="chat as JSON Lines: {t, user, text}")
    parser.add_argument("--top", type=int, required=True, metavar="N")
    parser.add_argument("--duration", type=float, required=True, metavar="SECONDS", help="VOD length")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be >= 1")

    chat = read_chat(args.chat)
    candidates = build_candidates(
        chat,
        [],
        CandidatesConfig(),
        transcript=None,
        vod_duration_s=args.duration,
        mp4_path=None,
    )
    half = ClipConfig().max_seconds / 2
    end_limit = args.duration if args.duration > 0 else float("inf")
    out = []
    for c in candidates[: args.top]:  # already sorted by score, best first
        start = max(0.0, c.t_center - half)
        end = min(end_limit, c.t_center + half)
        out.append({"start": round(start, 3), "end": round(end, 3), "score": float(c.score)})
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
