"""Benchmark: the transcription stage's word error rate on real recordings, against plain
faster-whisper with and without its VAD, same bundled tiny.en, same PCM, in the same run.

    python bench/bench_real_speech.py [DATA_DIR]   # default: tests/fixtures/speech/real

DATA_DIR holds <name>.ogg + <name>.txt pairs (human transcripts; see the SOURCES.md there).

Each file is decoded once by the audio stage's own code (klipstream.acquisition.audio_pass) to the
16 kHz s16le PCM the stage reads. Baselines: `WhisperModel.transcribe(audio)` and
`transcribe(audio, vad_filter=True)` with faster-whisper's defaults (beam 5, no word timestamps),
int8 on CPU, all cores. The stage: a warm klipstream.transcription.pool.Transcriber (1 worker),
the text of its segments. Scoring: Whisper's EnglishTextNormalizer (package whisper-normalizer,
MIT, identical output to openai-whisper 20250625's on this set) and jiwer; pooled WER is total
errors over total reference words. Exit status 1 if the stage's pooled WER is above the better
baseline's.
jiwer and whisper-normalizer are in the test extra.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from klipstream.acquisition.audio_pass import AudioPassOutputs, run_audio_pass  # noqa: E402
from klipstream.config import Settings  # noqa: E402
from klipstream.transcription.pool import Transcriber  # noqa: E402
from tests.fw_baseline import baseline_texts  # noqa: E402


def to_pcm(src: Path, tmp: Path) -> Path:
    d = tmp / src.stem
    d.mkdir()
    out = AudioPassOutputs(pcm=d / "a.pcm", audio=d / "a.audio", waveform=d / "w", features=d / "f")
    run_audio_pass(src, out, cancelled=threading.Event())
    return out.pcm


async def stage(pcms: dict[str, Path], tmp: Path) -> dict[str, str]:
    transcriber = Transcriber(Settings.from_env({}, data_dir=tmp / "data", transcribe_workers=1))
    try:
        return {n: " ".join(s.text for s in (await transcriber.transcribe(p)).segments) for n, p in pcms.items()}
    finally:
        await transcriber.close()


def main() -> int:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    data = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "speech" / "real"
    norm = EnglishTextNormalizer()
    names = sorted(p.stem for p in data.glob("*.ogg"))
    refs = {n: norm((data / f"{n}.txt").read_text()) for n in names}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        pcms = {n: to_pcm(data / f"{n}.ogg", tmp) for n in names}
        texts = baseline_texts([str(p) for p in pcms.values()])
        hyps: dict[str, dict[str, str]] = {
            label: {n: texts[str(p)][key] for n, p in pcms.items()}
            for label, key in (("faster-whisper, no VAD", "plain"), ("faster-whisper, VAD", "vad"))
        }
        hyps["transcription stage"] = asyncio.run(stage(pcms, tmp))
    pooled = {}
    print("| system | " + " | ".join(names) + " | pooled |\n|---|" + "---|" * (len(names) + 1))
    for label, h in hyps.items():
        per = [jiwer.wer(refs[n], norm(h[n])) for n in names]
        pooled[label] = jiwer.wer([refs[n] for n in names], [norm(h[n]) for n in names])
        print(f"| {label} | " + " | ".join(f"{x * 100:.2f}" for x in per) + f" | {pooled[label] * 100:.2f} |")
    best = min(pooled["faster-whisper, no VAD"], pooled["faster-whisper, VAD"])
    ok = pooled["transcription stage"] <= best
    verdict = "ok" if ok else "WORSE"
    print(f"\nstage {pooled['transcription stage'] * 100:.2f} % vs best baseline {best * 100:.2f} %: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
