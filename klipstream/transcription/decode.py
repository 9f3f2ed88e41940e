"""How a worker decodes one chunk on the sequential (CPU) path: Whisper's own 30 s windows, then words.

Worker processes only: this module imports faster_whisper at import time.

Why not `WhisperModel.transcribe(word_timestamps=True)`: with it, faster-whisper (like
openai-whisper) starts each next 30 s window at the end of the last word as the cross-attention
alignment estimates it, instead of where Whisper's own timestamp tokens put it. In quick speech
that estimate lands inside the next word, which is then cut in two and lost at the window seam
(7 % more errors than plain faster-whisper on real read speech; docs/decisions.md). So a chunk is
decoded with `word_timestamps=False`, which gives exactly plain faster-whisper's windows and
text, and each window's words are aligned afterwards by the same aligner faster-whisper uses
(`WhisperModel.add_word_timestamps`, dynamic time warping over cross-attention), window by window.

The aligner needs each window's encoder output. `KeepingWhisperModel` keeps what its `encode`
returned while a chunk is decoded, so no window goes through the encoder twice. A kept output is
used only if the features it was computed from are exactly the window's (compared in full);
otherwise the window is encoded again: slower, never wrong.

A chunk that ends at a cut inside speech (`hard_end`, the next chunk continues the same speech)
drops its last window, which the cut made shorter than what Whisper would have seen, and reports
where that window started (`resume_sample`) and the previous-text prompt faster-whisper would
hold at that point (`prompt`), so the next chunk decodes as one faster-whisper call over both
chunks would.

faster-whisper API used beyond its README: `WhisperModel.encode`, `WhisperModel.add_word_timestamps`,
`WhisperModel.feature_extractor`, `WhisperModel.hf_tokenizer`, `faster_whisper.tokenizer.Tokenizer`,
`faster_whisper.audio.pad_or_trim` and the `seek`, `tokens` and `temperature` fields of its
segments. They are unchanged from 1.1.0 to 1.2.1; pyproject.toml bounds the version to that range.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer

from klipstream.transcript import Segment, Word

# transcribe()'s own defaults, which add_word_timestamps needs spelled out.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
PROMPT_TOKENS = 223  # faster-whisper prompts with the last max_length // 2 - 1 tokens of previous text
PROMPT_RESET_TEMPERATURE = 0.5  # transcribe()'s prompt_reset_on_temperature: a fallback this hot clears it
KEPT_OUTPUTS = 4  # encoder outputs kept at most (a window, the next one, and room for skipped silent ones)


class KeepingWhisperModel(WhisperModel):
    """A WhisperModel that, inside `keeping()`, remembers the inputs and outputs of its last few
    encoder calls, so that aligning a window's words can reuse the output `transcribe` computed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept: collections.deque[tuple[np.ndarray, Any]] | None = None
        self.encoded_again = 0  # windows whose output could not be reused (for tests and benchmarks)

    def encode(self, features: np.ndarray) -> Any:
        output = super().encode(features)
        if self.kept is not None:
            self.kept.append((features, output))
        return output

    def encoder_output(self, window: np.ndarray) -> Any:
        """The encoder output for `window` (padded mel features): a kept one if its input was
        exactly this window, else computed now."""
        if self.kept is not None:
            for i, (features, output) in enumerate(self.kept):
                if features.shape == window.shape and np.array_equal(features, window):
                    for _ in range(i + 1):  # older entries belong to windows already aligned
                        self.kept.popleft()
                    return output
        self.encoded_again += 1
        return super().encode(window)


@dataclass(frozen=True)
class Decoded:
    language: str
    language_probability: float
    segments: list[Segment]  # times in seconds from the start of the chunk's audio; ids 0..n-1
    resume_sample: int | None  # hard_end only: sample of the chunk's audio where the next chunk must start
    prompt: tuple[int, ...]  # previous-text tokens for the next chunk


class _Aligner:
    """Aligns one window at a time, as transcribe(word_timestamps=True) does inside its loop."""

    def __init__(self, model: KeepingWhisperModel, audio: np.ndarray, language: str) -> None:
        self.model = model
        self.features = model.feature_extractor(audio)  # what transcribe() computed from the same audio
        self.content_frames = self.features.shape[-1] - 1
        multilingual = model.model.is_multilingual
        self.tokenizer = Tokenizer(model.hf_tokenizer, multilingual, task="transcribe", language=language)
        self.last_speech = 0.0

    def align(self, window: list[Any]) -> list[Segment]:
        seek = window[0].seek
        size = min(self.model.feature_extractor.nb_max_frames, self.content_frames - seek)
        encoder_output = self.model.encoder_output(pad_or_trim(self.features[:, seek : seek + size]))
        items = [{"seek": seek, "start": s.start, "end": s.end, "tokens": list(s.tokens)} for s in window]
        self.model.add_word_timestamps(
            [items],
            self.tokenizer,
            encoder_output,
            size,
            PREPEND_PUNCTUATIONS,
            APPEND_PUNCTUATIONS,
            last_speech_timestamp=self.last_speech,
        )
        ends = [item["words"][-1]["end"] for item in items if item.get("words")]
        if ends:
            self.last_speech = ends[-1]
        return [
            Segment(
                0,
                item["start"],
                item["end"],
                seg.text,
                tuple(Word(w["start"], w["end"], w["word"], w["probability"]) for w in item.get("words") or ()),
            )
            for seg, item in zip(window, items, strict=True)
        ]


def _in_order(segments: list[Segment], limit: float) -> list[Segment]:
    """The aligner can stretch a window's last words to the window's end, past where Whisper's
    next window (and segment) starts; pull every time back before the next segment's first word
    (or before `limit` for the last segment), so words never overlap and stay in time order."""
    out: list[Segment] = []
    for seg in reversed(segments):
        words = tuple(w._replace(start=min(w.start, limit), end=min(w.end, limit)) for w in seg.words)
        out.append(Segment(0, min(seg.start, limit), min(seg.end, limit), seg.text, words))
        limit = min([seg.start, *(w.start for w in words[:1])])
    out.reverse()
    return [seg._replace(id=i) for i, seg in enumerate(out)]


def _carry(tokens: list[int], window: list[Any]) -> list[int]:
    """faster-whisper's previous-text tokens after this window (reset after a hot fallback)."""
    tokens = tokens + [t for seg in window for t in seg.tokens]
    if window and (window[-1].temperature or 0.0) > PROMPT_RESET_TEMPERATURE:
        return []
    return tokens[-PROMPT_TOKENS:]


def decode_chunk(
    model: KeepingWhisperModel,
    audio: np.ndarray,
    *,
    language: str | None,
    initial_prompt: str | None,
    prompt: tuple[int, ...] = (),
    hard_end: bool = False,
    on_progress: Callable[[float], None] = lambda _: None,
) -> Decoded:
    """Segments with word times for `audio`, decoded by Whisper's own windows.

    `prompt`: previous-text tokens from the chunk before, when this chunk continues its speech
    (it then replaces `initial_prompt`, which is already in it)."""
    duration = audio.size / model.feature_extractor.sampling_rate
    model.kept = collections.deque(maxlen=KEPT_OUTPUTS)
    try:
        found, info = model.transcribe(
            audio,
            language=language,
            initial_prompt=list(prompt) if prompt else initial_prompt,
            word_timestamps=False,
            vad_filter=False,  # the VAD already ran on the whole file; the chunk holds speech only
        )
        aligner = _Aligner(model, audio, info.language)
        tokens = list(prompt) or (aligner.tokenizer.encode(" " + initial_prompt.strip()) if initial_prompt else [])
        segments: list[Segment] = []
        window: list[Any] = []  # segments of the current window (they share `seek`)
        for seg in found:
            if window and seg.seek != window[0].seek:
                # The window before is complete; transcribe() has just encoded this one.
                segments.extend(aligner.align(window))
                tokens = _carry(tokens, window)
                window = []
            window.append(seg)
            on_progress(min(seg.end, duration))
        resume: int | None = None
        if hard_end and window and window[0].seek > 0:
            # Cut short by the chunk's end: the next chunk decodes this window again, whole.
            resume = window[0].seek * model.feature_extractor.hop_length
        elif window:
            segments.extend(aligner.align(window))
            tokens = _carry(tokens, window)
    finally:
        model.kept = None
    limit = resume / model.feature_extractor.sampling_rate if resume is not None else duration
    return Decoded(info.language, float(info.language_probability), _in_order(segments, limit), resume, tuple(tokens))
