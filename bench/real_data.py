"""Turn public, human-labelled Twitch data into the layout `bench/eval_real.py` reads.

None of these datasets may be committed here (no licence, non-commercial or share-alike terms), so
the evaluation takes a directory made by this script from your own copies of the sources:

* highlights: github.com/shunhuaiyao/Twitch-Highlight-Kappa (commit 2c070c0): the rechat dump of
  Twitch VOD 108244967 (`rechat/data/VoD_108244967.txt`, `<unix seconds> <user>: <message>` lines)
  with hand-marked highlight intervals (`rechat/data/train_highlight_time.txt`, unix seconds) and
  the VOD's start (`rechat/data/database.txt`). The VOD is split at 15,500 s: the part before is for
  development, the part after is held out for independent evaluation and written to its own
  directory, which nothing in this project reads unless asked to by name.
* message sentiment: github.com/konstantinkobs/emote-controlled (`data/labeled_dataset.csv`, Kobs et
  al., "Emote-Controlled", ACM TSC 2020): 1,922 crowd-labelled Twitch messages.
* reaction categories: github.com/noemeralv/Corpus-Twitch-Videogames (CC BY-NC-SA 4.0, Merayo et
  al.): Spanish Twitch messages labelled with emotions (hype, anger, disappointment/sadness,
  approval, ...). Needs `openpyxl` (not a dependency of the service).

Usage:
    python bench/real_data.py kappa  REPO_DIR OUT_DIR
    python bench/real_data.py kobs   REPO_DIR OUT_DIR
    python bench/real_data.py es     REPO_DIR OUT_DIR

Output (OUT_DIR):
    highlights/<vod>.<part>.chat.jsonl   {"t": seconds from VOD start, "user", "text"} per line
    highlights/<vod>.<part>.labels.json  [{"start", "end"}]
    highlights/<vod>.<part>.meta.json    {"duration", "source", "part"}
    heldout/...                          the same for held-out parts
    sentiment/kobs.jsonl                 {"text", "label": positive|neutral|negative}
    categories/corpus_es.jsonl           {"text", "emotion"}
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

KAPPA_VOD = "108244967"
KAPPA_SPLIT = 15_500.0  # seconds: development before, held out from here on
_RECHAT_LINE = re.compile(r"^(\d+) (\S*?): ?(.*)$")
_ES_EMOTIONS = {
    "aprobación/empatía/confianza": "approval",
    "desaprobación": "disapproval",
    "decepción/tristeza": "disappointment_sadness",
    "interés/anticipación/hype": "hype",
    "enfado/ira": "anger",
    "indeterminado": "undetermined",
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def kappa(repo: Path, out: Path) -> None:
    data = repo / "rechat" / "data"
    starts = {}
    for line in (data / "database.txt").read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            vod, start = line.split()
            starts[vod] = int(start)
    start = starts[KAPPA_VOD]
    chat: list[tuple[float, dict]] = []
    for line in (data / f"VoD_{KAPPA_VOD}.txt").read_text(encoding="utf-8").splitlines():
        match = _RECHAT_LINE.match(line.lstrip("\ufeff"))
        if match:
            t = float(int(match.group(1)) - start)
            chat.append((t, {"t": t, "user": match.group(2), "text": match.group(3)}))
    intervals = []
    for line in (data / "train_highlight_time.txt").read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            a, b = (int(x) for x in line.split())
            intervals.append({"start": float(a - start), "end": float(b - start)})
    for part, folder, keep_chat, keep_label in (
        ("dev", "highlights", lambda t: t < KAPPA_SPLIT, lambda i: i["start"] < KAPPA_SPLIT),
        ("heldout", "heldout", lambda t: t >= KAPPA_SPLIT, lambda i: i["start"] >= KAPPA_SPLIT),
    ):
        base = out / folder / f"{KAPPA_VOD}.{part}"
        rows = [row for t, row in chat if keep_chat(t)]
        _write_jsonl(base.with_suffix(base.suffix + ".chat.jsonl"), rows)
        labels = [i for i in intervals if keep_label(i)]
        base.with_suffix(base.suffix + ".labels.json").write_text(json.dumps(labels, indent=1))
        # The dev part ends at the split; the held-out part's length is not looked at here.
        duration = KAPPA_SPLIT if part == "dev" else None
        meta = {"duration": duration, "source": "shunhuaiyao/Twitch-Highlight-Kappa@2c070c0", "part": part}
        base.with_suffix(base.suffix + ".meta.json").write_text(json.dumps(meta))
    print(f"wrote {out / 'highlights'} and {out / 'heldout'}")


def kobs(repo: Path, out: Path) -> None:
    names = {"1": "positive", "0": "neutral", "-1": "negative"}
    rows = []
    with open(repo / "data" / "labeled_dataset.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = names.get(str(row.get("sentiment", "")).strip())
            if label is not None and row.get("message") is not None:
                rows.append({"text": row["message"], "label": label})
    _write_jsonl(out / "sentiment" / "kobs.jsonl", rows)
    print(f"wrote {len(rows)} labelled messages to {out / 'sentiment'}")


def corpus_es(repo: Path, out: Path) -> None:
    import openpyxl  # a bench-only dependency: pip install openpyxl

    book = openpyxl.load_workbook(repo / "CorpusTwitchVideogames_Extension2024.xlsx", read_only=True)
    rows = []
    for values in book.active.iter_rows(min_row=2, values_only=True):
        text, _polarity, emotion = (*values, None, None, None)[:3]
        label = _ES_EMOTIONS.get(str(emotion or "").strip().lower())
        if text is not None and label is not None:
            rows.append({"text": str(text), "emotion": label})
    _write_jsonl(out / "categories" / "corpus_es.jsonl", rows)
    print(f"wrote {len(rows)} labelled messages to {out / 'categories'}")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("kappa", "kobs", "es"):
        print(__doc__)
        return 2
    {"kappa": kappa, "kobs": kobs, "es": corpus_es}[argv[0]](Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
