"""Generate the speech fixture for the transcription tests from known text.

The fixture is synthetic (espeak-ng) so the reference transcript is exact and nothing needs a
licence or a download. Sentences are separated by short pauses, and one long pause sits in the
middle so the VAD has a real silence to cut chunks at. The generated Ogg Vorbis file and the reference text
are committed, so CI never needs espeak-ng; run this script again only to change the fixture:

    python scripts/make_speech_fixture.py

Needs the Debian packages espeak-ng and sox.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "speech"
SAMPLE_RATE = 16000

# (sentence, seconds of silence after it). Plain vocabulary a tiny model can get right, so the
# word error rate measures the pipeline (chunking, offsets, borders), not the model's limits.
SENTENCES: list[tuple[str, float]] = [
    ("Welcome back to the stream, everyone.", 0.6),
    ("Today we are going to play the new level and try to beat the final boss.", 0.7),
    ("Thank you so much for the follow and for all the kind messages in the chat.", 1.0),
    ("Let me check the map before we go into the castle.", 3.0),
    ("Okay, the boss is very fast, so we need to stay close to the wall.", 0.6),
    ("That was an amazing jump, I cannot believe it worked.", 0.8),
]
VOICE = "en-us"
WORDS_PER_MINUTE = "155"


def synthesize(text: str, path: Path) -> None:
    subprocess.run(["espeak-ng", "-v", VOICE, "-s", WORDS_PER_MINUTE, "-w", str(path), text], check=True)


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        parts: list[str] = []
        for i, (text, pause) in enumerate(SENTENCES):
            raw = Path(tmp) / f"s{i}.wav"
            synthesize(text, raw)
            part = Path(tmp) / f"p{i}.wav"
            # Resample to the pipeline's format and append the pause as real digital silence.
            subprocess.run(
                ["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(part), "pad", "0", str(pause)],
                check=True,
            )
            parts.append(str(part))
        lead_in = Path(tmp) / "lead.wav"
        subprocess.run(
            ["sox", "-n", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(lead_in), "trim", "0", "1.0"], check=True
        )
        out = OUT_DIR / "speech.ogg"
        # Vorbis keeps the committed file small (~100 KB); the tests decode it with PyAV.
        subprocess.run(["sox", str(lead_in), *parts, "-C", "2", str(out)], check=True)
    (OUT_DIR / "reference.txt").write_text(" ".join(text for text, _ in SENTENCES) + "\n")
    duration = subprocess.run(["soxi", "-D", str(out)], check=True, capture_output=True, text=True).stdout.strip()
    print(f"wrote {out} ({out.stat().st_size} bytes, {float(duration):.1f} s) and reference.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
