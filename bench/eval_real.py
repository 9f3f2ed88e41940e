"""Quality on real, third-party, human-labelled data, next to simple baselines run in the same script.

    bench/peers/setup.sh        # once: the peers, each in its own environment under .bench-peers/
    python bench/eval_real.py --data DIR [--vods NAME ...] [--skip-pipeline] [--include-heldout]

DIR is made by `bench/real_data.py` from your copies of the public sources (README, "Quality on
real data"); nothing here is committed because none of it may be. Three evaluations:

1. Highlights (DIR/highlights/<vod>.chat.jsonl + .labels.json + .meta.json). The service's real
   pipeline runs on each VOD: `klipstream analyze` with the VOD's chat as a TwitchDownloader
   archive (`--chat`) and, because the VODs themselves are long gone from Twitch, silent audio of
   the VOD's length as the media. So this measures the chat side of the detector; audio and
   speech contribute nothing. A pick is a hit when its span overlaps a human-marked interval.
   Reported: precision@10, precision@K (K = the number of marked moments), distinct moments found,
   mean span length, for
     * the service (the pipeline's top highlights),
     * random: 30 s windows at least 60 s apart, the mean of 2,000 draws,
     * raw chat rate: the busiest 30 s windows of chat (messages), at least 60 s apart,
     * raw chat rate with the service's mean span length (so span length alone cannot explain a gap),
     * a peer: clipsmith-ai's chat candidate builder (MIT, PyPI) with its defaults, run on the same
       chat through bench/peers/clipsmith_adapter.py in its own environment (it returns moment
       centres; the adapter makes 30 s spans, the peer's longest clip),
     * ablations of the detector (the analysis functions in-process, the same code the stage runs).
   Held-out parts (DIR/heldout) are read only with --include-heldout, for independent evaluation.
2. Message sentiment (DIR/sentiment/*.jsonl): macro-F1 over positive/neutral/negative of the
   service's text scorer against VADER alone, same messages, same threshold (|score| >= 0.05).
3. Reaction categories (DIR/categories/*.jsonl): agreement of the per-message category with human
   emotion labels (mapped as CATEGORY_TO_LABEL says), against always answering the majority label.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import wave
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klipstream.analysis import highlights as highlight_module  # noqa: E402
from klipstream.analysis import pipeline as pipeline_module  # noqa: E402
from klipstream.analysis import signals as signal_module  # noqa: E402
from klipstream.analysis.pipeline import analyze_messages, build_timeline, find_highlights  # noqa: E402
from klipstream.analysis.reactions import Category, classify_message  # noqa: E402
from klipstream.analysis.signals import AudioFeatures  # noqa: E402
from klipstream.analysis.text_scoring import TextScorer  # noqa: E402
from klipstream.chat import ChatMessage  # noqa: E402

WIDTH = 30  # span of the baseline windows, seconds
SEPARATION = 60  # minimum distance between picks of the baselines, seconds
RANDOM_DRAWS = 2000
CATEGORY_TO_LABEL = {
    Category.HYPE: "hype",
    Category.CLUTCH: "hype",
    Category.RAGE: "anger",
    Category.FAIL: "disappointment_sadness",
    Category.WHOLESOME: "approval",
    Category.FUNNY: "approval",
    Category.SCARY: "undetermined",
}
NO_CATEGORY_LABEL = "undetermined"

Span = tuple[float, float]


# --- data ---
@dataclass
class Vod:
    name: str
    messages: list[ChatMessage]
    labels: list[Span]
    duration: float


def load_vod(chat_path: Path) -> Vod:
    name = chat_path.name.removesuffix(".chat.jsonl")
    messages = []
    with open(chat_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            user = str(row.get("user") or "").lower()
            messages.append(ChatMessage(float(row["t"]), user, str(row.get("text") or ""), id=f"m{i}"))
    messages.sort(key=lambda m: m.time)
    labels = [
        (float(i["start"]), float(i["end"])) for i in json.loads(chat_path.with_name(name + ".labels.json").read_text())
    ]
    meta_path = chat_path.with_name(name + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    duration = float(meta.get("duration") or math.ceil(max(messages[-1].time, max(e for _, e in labels)) + 60))
    return Vod(name, messages, labels, duration)


# --- metrics ---
def hits(spans: Sequence[Span], labels: Sequence[Span]) -> list[bool]:
    return [any(s < le and ls < e for ls, le in labels) for s, e in spans]


def precision(spans: Sequence[Span], labels: Sequence[Span], k: int) -> float:
    return sum(hits(spans[:k], labels)) / k


def moments(spans: Sequence[Span], labels: Sequence[Span], k: int) -> int:
    return sum(any(s < le and ls < e for s, e in spans[:k]) for ls, le in labels)


@dataclass
class Row:
    method: str
    p10: float
    pk: float
    found10: int
    span: float
    note: str = ""


def row(method: str, spans: Sequence[Span], vod: Vod, note: str = "") -> Row:
    k = len(vod.labels)
    span = float(np.mean([e - s for s, e in spans[: max(10, k)]])) if spans else 0.0
    return Row(
        method,
        precision(spans, vod.labels, 10),
        precision(spans, vod.labels, k),
        moments(spans, vod.labels, 10),
        span,
        note,
    )


# --- baselines ---
def random_rows(vod: Vod, ks: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Mean precision@k and moments found@k of random windows, over RANDOM_DRAWS draws."""
    rng = random.Random(0)
    totals = {k: [0.0, 0.0] for k in ks}
    for _ in range(RANDOM_DRAWS):
        spans: list[Span] = []
        while len(spans) < max(ks):
            s = rng.uniform(0, vod.duration - WIDTH)
            if all(abs(s - a) >= SEPARATION for a, _ in spans):
                spans.append((s, s + WIDTH))
        for k in ks:
            totals[k][0] += precision(spans, vod.labels, k)
            totals[k][1] += moments(spans, vod.labels, k)
    return {k: (p / RANDOM_DRAWS, m / RANDOM_DRAWS) for k, (p, m) in totals.items()}


def busiest(vod: Vod, count: int, length: float = WIDTH) -> list[Span]:
    """The busiest WIDTH-second windows of chat (messages), SEPARATION apart; spans `length` long,
    centred on the window."""
    n = math.ceil(vod.duration)
    seconds = np.minimum(np.array([int(m.time) for m in vod.messages]), n - 1)
    per_second = np.bincount(seconds, minlength=n).astype(float)
    windows = np.convolve(per_second, np.ones(WIDTH), mode="valid")
    out: list[int] = []
    for i in np.argsort(-windows, kind="stable"):
        if all(abs(int(i) - j) >= SEPARATION for j in out):
            out.append(int(i))
        if len(out) >= count:
            break
    middle = WIDTH / 2
    return [(max(0.0, i + middle - length / 2), i + middle + length / 2) for i in out]


def peer(vod: Vod, python: str, adapter: str, count: int, workdir: Path) -> list[Span] | None:
    path = workdir / f"{vod.name}.peer.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for m in vod.messages:
            f.write(json.dumps({"t": m.time, "user": m.user, "text": m.text}, ensure_ascii=False) + "\n")
    done = subprocess.run(
        [python, adapter, str(path), "--top", str(count), "--duration", str(vod.duration)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        print(f"  peer failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return [(float(c["start"]), float(c["end"])) for c in json.loads(done.stdout)]


# --- the service ---
def silent_media(duration: float, cache: Path) -> Path:
    """A WAV of silence `duration` long (8 kHz mono): the VOD's timeline without its sound."""
    path = cache / f"silence_{int(duration)}.wav"
    if path.exists():
        return path
    tmp = path.with_suffix(".part")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        minute = bytes(2 * 8000 * 60)
        whole, rest = divmod(math.ceil(duration), 60)
        for _ in range(whole):
            w.writeframes(minute)
        w.writeframes(bytes(2 * 8000 * rest))
    os.replace(tmp, path)
    return path


def td_archive(vod: Vod, path: Path) -> Path:
    """The VOD's chat as a TwitchDownloader JSON archive, the format users supply as chat_url."""
    comments = [
        {
            "_id": m.id,
            "content_offset_seconds": m.time,
            "commenter": {"name": m.user, "display_name": m.user, "_id": ""},
            "message": {"body": m.text, "fragments": [{"text": m.text, "emoticon": None}]},
        }
        for m in vod.messages
    ]
    path.write_text(
        json.dumps({"video": {"id": vod.name, "length": vod.duration}, "comments": comments}, ensure_ascii=False),
        encoding="utf-8",
    )
    return path


def pipeline(vod: Vod, count: int, workdir: Path, cache: Path) -> tuple[list[Span], float]:
    """Top `count` highlights from `klipstream analyze`, and its wall time."""
    media = silent_media(vod.duration, cache)
    chat = td_archive(vod, workdir / f"{vod.name}.chat.json")
    started = time.monotonic()
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("klipstream")),
            "analyze",
            str(media),
            "--chat",
            str(chat),
            "--out",
            str(workdir / f"{vod.name}.out"),
            "--top",
            str(count),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=7200,
        env={**os.environ, "KLIPSTREAM_LOG_LEVEL": "warning"},
    )
    took = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"klipstream analyze failed: {done.stderr[-800:]}")
    job = json.loads(done.stdout)
    return [(float(h["start_time"]), float(h["end_time"])) for h in job["highlights"]], took


def in_process(vod: Vod, count: int, **overrides: object) -> list[Span]:
    """The detector's analysis functions on the same chat, with module constants overridden
    (ablations). Silent audio, like the pipeline run."""
    saved = {}
    for name, value in overrides.items():
        for module in (highlight_module, signal_module, pipeline_module):
            if hasattr(module, name):
                saved[(module, name)] = getattr(module, name)
                setattr(module, name, value)
    try:
        n = int(vod.duration / 0.05)
        silent = np.full(n, -90.0, np.float32)
        features = AudioFeatures(0.05, silent, np.zeros(n, np.float32), np.zeros(n, np.float32), vod.duration)
        chat = analyze_messages(vod.messages, vod.duration, ("nightbot", "streamelements", "moobot"))
        timeline = build_timeline(features, [], chat.signals)
        found = find_highlights(timeline, count)
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
    return [(h.start_time, h.end_time) for h in found]


def ablations(vod: Vod, count: int) -> list[tuple[str, list[Span]]]:
    """Each change of the detector undone in turn."""
    base = highlight_module.WEIGHTS
    poisson = _poisson_surge_variant()
    messages_not_chatters = _message_count_variant()
    return [
        ("detector, in process", in_process(vod, count)),
        (
            "- messages instead of distinct chatters",
            in_process(vod, count, sliding_chatters=messages_not_chatters),
        ),
        ("- Poisson z-score of messages (the previous surge)", in_process(vod, count, chat_surge=poisson)),
        ("- 5-minute baseline instead of 20", in_process(vod, count, SURGE_BASELINE_SECONDS=300)),
        (
            "+ chat emotion in the ranking (weight 0.20)",
            in_process(vod, count, WEIGHTS={**base, "chat_emotion": 0.20}, fuse=_fuse_with_emotion()),
        ),
    ]


def _message_count_variant() -> Callable[..., np.ndarray]:
    def messages(message_seconds: np.ndarray, message_users: np.ndarray, n: int, width: int) -> np.ndarray:
        per_second = np.bincount(np.minimum(message_seconds, n - 1), minlength=n).astype(float)
        return np.convolve(per_second, np.ones(width), mode="same")

    return messages


def _poisson_surge_variant() -> Callable[..., object]:
    from klipstream.analysis.baselines import poisson_surge, rolling_quantile

    original = signal_module.chat_surge

    def surge(chat: object, seconds: int) -> object:
        result = original(chat, seconds)
        count5 = np.convolve(chat.count, np.ones(5), mode="same")  # type: ignore[attr-defined]
        result.score = poisson_surge(count5, rolling_quantile(count5, 300, 0.5))
        return result

    return surge


def _fuse_with_emotion() -> Callable[..., object]:
    original = highlight_module.fuse

    def fuse(audio, db, speech, chat, weights=None, marks=None, voice=None):  # type: ignore[no-untyped-def]
        timeline = original(audio, db, speech, chat, weights, marks, voice)
        if chat is None:
            return timeline
        weights = dict(weights or highlight_module.WEIGHTS)
        signals = {**timeline.signals, "chat_emotion": chat.emotion}
        total = sum(weights[k] for k in signals)
        timeline.weights = {k: weights[k] / total for k in signals}
        raw = sum(timeline.weights[k] * np.asarray(v)[: timeline.seconds] for k, v in signals.items())
        timeline.signals = signals
        timeline.score = np.clip(highlight_module.centered_mean(np.asarray(raw), 5), 0.0, 1.0)
        return timeline

    return fuse


# --- sentiment and categories ---
def macro_f1(predicted: Sequence[str], gold: Sequence[str]) -> float:
    labels = sorted(set(gold))
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(scores) / len(scores)


def polarity(score: float) -> str:
    return "positive" if score >= 0.05 else "negative" if score <= -0.05 else "neutral"


def sentiment_table(path: Path) -> list[str]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    gold = [r["label"] for r in rows]
    vader = SentimentIntensityAnalyzer()
    scorer = TextScorer()
    ours = macro_f1([polarity(scorer.score(r["text"]).sentiment) for r in rows], gold)
    plain = macro_f1([polarity(vader.polarity_scores(r["text"])["compound"]) for r in rows], gold)
    majority = Counter(gold).most_common(1)[0][0]
    base = macro_f1([majority] * len(gold), gold)
    return [
        f"| {path.stem} ({len(rows):,} messages) | {ours:.3f} | {plain:.3f} | {ours - plain:+.3f} | {base:.3f} |",
    ]


def category_table(path: Path) -> list[str]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    gold = [r["emotion"] for r in rows]
    predicted = []
    for r in rows:
        votes = classify_message(r["text"], 0).categories
        predicted.append(CATEGORY_TO_LABEL[votes[0]] if votes else NO_CATEGORY_LABEL)
    agree = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    majority = Counter(gold).most_common(1)[0][0]
    base = sum(g == majority for g in gold) / len(gold)
    voted = [(p, g) for p, g in zip(predicted, gold, strict=True) if p != NO_CATEGORY_LABEL]
    agree_voted = sum(p == g for p, g in voted) / len(voted) if voted else 0.0
    return [
        f"| {path.stem} ({len(rows):,} messages) | {agree:.3f} | {base:.3f} ({majority}) | "
        f"{macro_f1(predicted, gold):.3f} | {macro_f1([majority] * len(gold), gold):.3f} | "
        f"{len(voted):,} messages: {agree_voted:.3f} |",
    ]


# --- report ---
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--vods", nargs="*", help="names (<vod>.<part>) to evaluate; default: all development parts")
    parser.add_argument("--include-heldout", action="store_true", help="also evaluate DIR/heldout (final evaluation)")
    parser.add_argument(
        "--peer-python",
        default=str(ROOT / ".bench-peers" / "clipsmith" / "bin" / "python"),
        help="python of the peer's own environment (bench/peers/setup.sh makes it)",
    )
    parser.add_argument(
        "--peer-adapter",
        default=str(ROOT / "bench" / "peers" / "clipsmith_adapter.py"),
        help="script printing the peer's top spans as JSON",
    )
    parser.add_argument("--skip-pipeline", action="store_true", help="in-process analysis only (fast)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "klipstream-eval")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    folders = [args.data / "highlights"] + ([args.data / "heldout"] if args.include_heldout else [])
    chats = sorted(p for folder in folders if folder.is_dir() for p in folder.glob("*.chat.jsonl"))
    if args.vods:
        chats = [p for p in chats if p.name.removesuffix(".chat.jsonl") in args.vods]
    print("### Highlights on real chat with human-marked moments\n")
    for chat_path in chats:
        vod = load_vod(chat_path)
        k = len(vod.labels)
        count = max(10, k)
        print(
            f"**{vod.name}**: {len(vod.messages):,} messages, {len({m.user for m in vod.messages}):,} chatters, "
            f"{vod.duration / 3600:.1f} h, {k} marked moments\n"
        )
        rows: list[Row] = []
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if not args.skip_pipeline:
                spans, took = pipeline(vod, count, work, args.cache)
                rows.append(row("**service** (klipstream analyze, real pipeline)", spans, vod, f"{took:.0f} s"))
            for name, spans in ablations(vod, count):
                rows.append(row(name, spans, vod))
            ours_span = rows[0].span
            rnd = random_rows(vod, (10, k))
            rows.append(Row("random 30 s windows (mean of 2,000)", rnd[10][0], rnd[k][0], round(rnd[10][1]), WIDTH))
            rows.append(row("raw chat rate (busiest 30 s windows)", busiest(vod, count), vod))
            rows.append(row(f"raw chat rate, {ours_span:.0f} s spans", busiest(vod, count, ours_span), vod))
            if Path(args.peer_python).exists() and Path(args.peer_adapter).exists():
                spans = peer(vod, args.peer_python, args.peer_adapter, count, work)
                if spans is not None:
                    rows.append(row("peer: clipsmith-ai candidate builder (defaults)", spans, vod))
        raw_rate = next(r for r in rows if r.method.startswith("raw chat rate (")).p10
        print(f"| method | precision@10 | precision@{k} | moments found in top 10 | mean span s | × raw rate @10 | |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = f"{r.p10 / raw_rate:.2f}×" if raw_rate else "-"
            print(f"| {r.method} | {r.p10:.2f} | {r.pk:.2f} | {r.found10} | {r.span:.0f} | {ratio} | {r.note} |")
        print()
    sentiment = sorted((args.data / "sentiment").glob("*.jsonl")) if (args.data / "sentiment").is_dir() else []
    if sentiment:
        print("### Message sentiment on crowd-labelled Twitch messages (macro-F1, 3 classes)\n")
        print("| data | service's text scorer | VADER alone | difference | majority class |")
        print("|---|---|---|---|---|")
        for path in sentiment:
            print("\n".join(sentiment_table(path)))
        print()
    categories = sorted((args.data / "categories").glob("*.jsonl")) if (args.data / "categories").is_dir() else []
    if categories:
        print("### Reaction categories against human emotion labels (per message)\n")
        print("| data | agreement | majority class | macro-F1 | majority macro-F1 | where a category was found |")
        print("|---|---|---|---|---|---|")
        for path in categories:
            print("\n".join(category_table(path)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
