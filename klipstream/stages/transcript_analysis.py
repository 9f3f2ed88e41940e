"""Stage transcript_analysis: emotion and intensity per 60 s transcript window.

The default scorer (VADER + lexicon) runs offline in a thread. With KLIPSTREAM_LLM_BASE_URL set,
windows go to the LLM endpoint first; any window whose call fails is scored by the default scorer
and its `model` column says so.
"""

from __future__ import annotations

import time

from klipstream.analysis.cancel import check
from klipstream.analysis.llm_scorer import LLMScorer
from klipstream.analysis.signals import AudioFeatures, FeatureFormatError
from klipstream.analysis.text_scoring import DEFAULT_MODEL, NO_TEXT, TextScore, TextScorer
from klipstream.analysis.transcript_windows import (
    NO_SPEECH_MODEL,
    build_rows,
    intensities,
    write_sentiment_csv,
    write_sentiment_json,
)
from klipstream.errors import InternalError
from klipstream.jobs.stage import Resource, Stage, StageContext
from klipstream.models import DisplayStage
from klipstream.transcript import TranscriptFormatError, Window, load_windows


def _score_default(windows: list[Window], indices: list[int], ctx: StageContext) -> dict[int, tuple[TextScore, float]]:
    scorer = TextScorer()
    out = {}
    for i in indices:
        check(ctx.cancelled)
        started = time.perf_counter()
        out[i] = (scorer.score(windows[i].text), time.perf_counter() - started)
    return out


async def run(ctx: StageContext) -> None:
    ctx.progress(0.0, "reading transcript windows")
    try:
        windows = await ctx.to_thread(load_windows, ctx.input("segments_csv"))
        features = await ctx.to_thread(AudioFeatures.load, ctx.input("features"))
    except (TranscriptFormatError, FeatureFormatError) as exc:
        raise InternalError(f"An input of the transcript analysis is malformed: {exc}.") from None
    n = len(windows)
    scores: list[TextScore] = [NO_TEXT] * n
    models: list[str] = [NO_SPEECH_MODEL] * n
    seconds: list[float] = [0.0] * n
    spoken = [i for i, w in enumerate(windows) if w.text and w.word_count > 0]
    fallback: dict[int, str] = {}
    settings = ctx.settings
    if settings.llm_base_url and spoken:
        ctx.progress(0.1, f"scoring {len(spoken)} windows with {settings.llm_model}")
        scorer = LLMScorer(
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            http=ctx.http,
            concurrency=settings.llm_concurrency,
            cache_dir=settings.data_dir / "cache" / "llm",
        )
        outcomes = await scorer.score_many([windows[i].text for i in spoken])
        for i, outcome in zip(spoken, outcomes, strict=True):
            if outcome.score is not None:
                scores[i], models[i], seconds[i] = outcome.score, settings.llm_model, outcome.seconds
            else:
                fallback[i] = outcome.error or "failed"
        if fallback:
            ctx.warn(
                f"The sentiment model failed for {len(fallback)} of {len(spoken)} transcript windows; "
                f"those were scored by the built-in scorer ({DEFAULT_MODEL})."
            )
    else:
        fallback = dict.fromkeys(spoken, "")
    if fallback:
        ctx.progress(0.5, f"scoring {len(fallback)} windows offline")
        local = await ctx.to_thread(_score_default, windows, sorted(fallback), ctx)
        for i, (score, took) in local.items():
            scores[i], seconds[i] = score, took
            models[i] = f"{DEFAULT_MODEL} (fallback: {fallback[i]})" if fallback[i] else DEFAULT_MODEL
    ctx.progress(0.8, "measuring intensity")
    absolute, relative = await ctx.to_thread(intensities, features, windows)
    rows = build_rows(windows, scores, models, seconds, absolute, relative)
    csv_path, json_path = ctx.output_path("sentiment_csv"), ctx.output_path("sentiment_json")
    await ctx.to_thread(write_sentiment_csv, rows, csv_path)
    await ctx.to_thread(write_sentiment_json, rows, json_path)
    ctx.add_artifact("sentiment_csv", csv_path)
    ctx.add_artifact("sentiment_json", json_path)
    ctx.progress(1.0, f"{n} window{'' if n == 1 else 's'} scored")


TRANSCRIPT_ANALYSIS = Stage(
    name="transcript_analysis",
    display=DisplayStage.ANALYZING,
    run=run,
    needs=("segments_csv", "features"),
    provides=("sentiment_csv", "sentiment_json"),
    weight=1.0,
    resource=Resource.CPU,
)
