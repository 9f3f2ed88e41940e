"""Synthetic streams with planted moments and distractors: the ground truth for highlight tests.

Real VODs come without labels, so the highlight detector is proven on generated streams whose
clip-worthy moments are known. Each stream has the three artifacts analysis reads (audio features,
transcript, chat), generated directly (no audio decoding needed):

- planted moments: "hype" (shouting, a loud game sound, a chat surge of hype emotes), "laugh"
  (laughter, KEKW/LUL spam), "fail" (a death, F/Sadge/PepeHands);
- distractors: "loud" (a loud passage, e.g. a cutscene, that nobody reacts to) and "bot_burst"
  (a burst of `!giveaway` commands and bot replies);
- background: speech of ordinary gameplay talk with occasional mild emotion, small game sounds,
  and a Poisson chat with a realistic share of stray emotes and reactions.

Intensities, chat lag (2-20 s) and positions vary with the seed; `generate` is deterministic for a
given seed and parameters.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HOP_SECONDS = 0.05

_BACKGROUND_SPEECH = [
    "okay so we need to go to the left side of the map",
    "let me check the inventory real quick",
    "I think we should upgrade the armor first",
    "chat what do you think about this build",
    "thanks for the follow welcome to the stream",
    "this part of the game is kind of slow",
    "we are going to try this route again",
    "I have about three potions left",
    "the boss is somewhere near the castle",
    "let me read the quest description",
    "yeah that makes sense I guess",
    "alright moving on to the next area",
    "I am not sure where the key is",
    "that was a nice little trick",
    "oh wow that looks pretty cool",
    "no I do not want to sell that",
    "we got some good loot from that chest",
    "hold on let me fix my settings",
]
_HYPE_SPEECH = [
    "OH MY GOD NO WAY!!! LETS GOOOO!!!",
    "DID YOU SEE THAT?! THAT WAS INSANE!!!",
    "YES YES YES! CLUTCH! LETS GOOOOO!",
]
_LAUGH_SPEECH = [
    "hahahaha that is so funny, I can't, hahaha",
    "HAHAHA oh my I'm dead, that was hilarious lmao",
    "hahaha what was that, LOL, hahahaha",
]
_FAIL_SPEECH = [
    "no no no no NOOOO, I died... that's so sad, why?!",
    "NOOO I lost everything, this is pain, unlucky",
    "no way I died again, RIP, that hurts so bad",
]
_LOUD_SPEECH = ["okay the cutscene is playing now", "let me just wait for this part", ""]

_CHAT_BACKGROUND = [
    "hello",
    "hi chat",
    "what game is this",
    "how long have you been streaming",
    "what rank are you",
    "nice",
    "lol",
    "KEKW",
    "Pog",
    "gg",
    "Kappa",
    "W",
    "LUL",
    "hey everyone",
    "go left",
    "is this the new update",
    "first time here",
    "love the stream",
    "that armor looks good",
    "you should try the other route",
    "what are your settings",
    "LUL LUL",
    "Sadge",
    "monkaS",
    "catJAM",
    "that was close",
]
_CHAT_HYPE = [
    "PogChamp",
    "POGGERS POGGERS POGGERS",
    "LETS GOOOO",
    "W",
    "INSANE",
    "CLIP IT",
    "Pog Pog Pog",
    "no way!!!",
    "OMG",
    "PogU",
    "HOLY",
    "that was insane",
]
_CHAT_LAUGH = ["KEKW", "KEKW KEKW KEKW", "LUL", "OMEGALUL", "LMAO", "hahahaha", "LULW", "ICANT", "KEKW LUL", "😂😂😂"]
_CHAT_FAIL = ["F", "F", "Sadge", "PepeHands", "RIP", "F F F", "unlucky", "BibleThump", "noooo", "L", "NotLikeThis"]
_BOT_COMMANDS = ["!giveaway", "!points", "!uptime", "!discord", "!enter", "!socials", "!giveaway"]
_BOT_REPLIES = [
    "You have entered the giveaway!",
    "Follow on twitter for updates",
    "The stream has been live for 2 hours",
]
_EMOTE_NAMES = {
    "PogChamp",
    "POGGERS",
    "Pog",
    "PogU",
    "KEKW",
    "LUL",
    "OMEGALUL",
    "LULW",
    "ICANT",
    "Kappa",
    "Sadge",
    "PepeHands",
    "BibleThump",
    "NotLikeThis",
    "monkaS",
    "catJAM",
}


@dataclass(frozen=True)
class Event:
    kind: str  # hype, laugh, fail (planted) or loud, bot_burst, gift_bomb (distractors)
    start: float
    end: float

    @property
    def planted(self) -> bool:
        return self.kind in ("hype", "laugh", "fail")


@dataclass
class SyntheticStream:
    duration: float
    loudness_dbfs: np.ndarray
    centroid_hz: np.ndarray
    flux: np.ndarray
    transcript: dict[str, Any]
    chat: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    voice_dbfs: np.ndarray | None = None
    pitch_hz: np.ndarray | None = None

    @property
    def moments(self) -> list[Event]:
        return [e for e in self.events if e.planted]

    @property
    def distractors(self) -> list[Event]:
        return [e for e in self.events if not e.planted]

    def write(self, directory: Path, video_id: str = "123456789") -> dict[str, Path]:
        """Write the artifacts under their canonical names; returns {artifact key: path}."""
        from klipstream.artifacts import spec

        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            key: directory / spec(key).filename(video_id)
            for key in ("features", "transcript_json", "segments_csv", "chat_json")
        }
        with open(paths["features"], "wb") as f:
            np.savez(
                f,
                hop_seconds=np.float64(HOP_SECONDS),
                loudness_dbfs=self.loudness_dbfs,
                centroid_hz=self.centroid_hz,
                flux=self.flux,
                **({"voice_dbfs": self.voice_dbfs, "pitch_hz": self.pitch_hz} if self.pitch_hz is not None else {}),
                duration_seconds=np.float64(self.duration),
                sample_rate=np.int64(16000),
            )
        paths["transcript_json"].write_text(json.dumps(self.transcript), encoding="utf-8")
        write_segments_csv(self.transcript, self.duration, paths["segments_csv"])
        paths["chat_json"].write_text(json.dumps(self.chat), encoding="utf-8")
        return paths


def write_segments_csv(transcript: dict[str, Any], duration: float, path: Path) -> None:
    """60 s windows every 30 s, as the transcription stage writes them (word in a window when at
    least half of it lies inside; the tail after the last full window gets a window too)."""
    words = [w for seg in transcript["segments"] for w in seg["words"]]
    starts = list(np.arange(0.0, max(duration - 60.0, 0.0) + 1e-9, 30.0))
    if not starts or starts[-1] + 60.0 < duration:
        starts.append(starts[-1] + 30.0 if starts else 0.0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["window_id", "start_time", "end_time", "word_count", "speech_rate", "text"])
        for i, start in enumerate(starts):
            end = min(start + 60.0, duration)
            inside = [w for w in words if start <= (w["start"] + w["end"]) / 2 < end]
            rate = len(inside) / max(end - start, 1e-9) * 60.0
            text = " ".join(w["word"].strip() for w in inside)
            writer.writerow([i, f"{start:.2f}", f"{end:.2f}", len(inside), f"{rate:.2f}", text])


def generate(
    seed: int,
    duration: float = 1200.0,
    *,
    chat_rate: float = 0.5,
    speech: bool = True,
    chat: bool = True,
    users: int = 400,
    unique_fraction: float = 0.1,
    chat_delay: float = 0.0,
    gift_bomb: bool = False,
) -> SyntheticStream:
    """A synthetic stream of `duration` seconds with 3 planted moments and 2 distractors.

    chat_rate: background messages per second (Poisson). unique_fraction: share of background
    messages made unique (real chat is not only copy-pasted emotes; this keeps caching honest).
    """
    rng = np.random.default_rng(seed)
    kinds = ["hype", "laugh", "fail", "loud", "bot_burst"]
    events = _place(rng, kinds, duration)
    frames = math.ceil(duration / HOP_SECONDS)
    t = np.arange(frames) * HOP_SECONDS

    # --- audio features ---
    drift = 3.0 * np.sin(2 * np.pi * t / rng.uniform(400, 900) + rng.uniform(0, 6))
    loud = -38.0 + drift + rng.normal(0, 1.5, frames)  # room tone + game ambience
    centroid = 1200.0 + rng.normal(0, 150, frames)
    flux = rng.lognormal(0.0, 0.35, frames)
    voice = loud - 6.0 + rng.normal(0, 1.0, frames)  # game sound leaks into the voice band
    pitch = np.zeros(frames)
    segments = _background_speech(rng, duration, events) if speech else []
    for seg in segments:
        a, b = int(seg["start"] / HOP_SECONDS), int(seg["end"] / HOP_SECONDS)
        loud[a:b] += 11.0 + rng.normal(0, 1.0)
        voice[a:b] = loud[a:b] - 2.0
        centroid[a:b] += 600
        voiced = rng.random(b - a) < 0.7  # consonants and pauses are unvoiced
        pitch[a:b] = np.where(voiced, 115.0 * 2 ** (rng.normal(0, 2.0, b - a) / 12), 0.0)
    for _ in range(int(duration / 25)):  # small game sounds nobody reacts to
        c = int(rng.uniform(0, duration) / HOP_SECONDS)
        w = int(rng.uniform(0.3, 2.0) / HOP_SECONDS)
        loud[c : c + w] += rng.uniform(3, 8)
        flux[c : c + w] *= rng.uniform(1.5, 3)

    for e in events:
        a, b = int(e.start / HOP_SECONDS), int(e.end / HOP_SECONDS)
        if speech and e.kind in ("hype", "laugh", "fail"):  # the streamer reacts: higher, wider, louder
            lift = {"hype": 6.0, "laugh": 4.0, "fail": 3.0}[e.kind]
            voiced = rng.random(b - a) < 0.8
            pitch[a:b] = np.where(voiced, 115.0 * 2 ** ((lift + rng.normal(0, 4.0, b - a)) / 12), 0.0)
            voice[a:b] += lift + 6.0
        if e.kind == "hype":
            loud[a:b] += rng.uniform(10, 16)
            flux[a:b] *= rng.uniform(3, 6)
            centroid[a:b] += 1800
        elif e.kind == "laugh":
            loud[a:b] += rng.uniform(4, 9)
            centroid[a:b] += 900
        elif e.kind == "fail":
            loud[a:b] += rng.uniform(3, 7)
            flux[a:b] *= rng.uniform(1.5, 2.5)
        elif e.kind == "loud":
            loud[a:b] += rng.uniform(10, 14)
            flux[a:b] *= rng.uniform(2, 4)
            centroid[a:b] += 1500
    loud = np.clip(loud, -90.0, 0.0)
    voice = np.clip(voice, -90.0, 0.0)

    transcript = _transcript(rng, segments, events, duration) if speech else _transcript(rng, [], [], duration)
    chat_doc = (
        _chat(rng, events, duration, chat_rate, users, unique_fraction, chat_delay)
        if chat
        else {"comments": [], "video": {}}
    )
    return SyntheticStream(
        duration=float(duration),
        loudness_dbfs=loud.astype(np.float32),
        centroid_hz=centroid.astype(np.float32),
        flux=flux.astype(np.float32),
        transcript=transcript,
        chat=chat_doc,
        events=events,
        voice_dbfs=voice.astype(np.float32),
        pitch_hz=pitch.astype(np.float32),
    )


def _place(rng: np.random.Generator, kinds: list[str], duration: float) -> list[Event]:
    """Events in random order, in separate slots at least ~2 minutes apart."""
    slots = len(kinds)
    slot = (duration - 120.0) / slots
    order = rng.permutation(kinds)
    events = []
    for i, kind in enumerate(order):
        start = 60.0 + i * slot + rng.uniform(0.15, 0.55) * slot
        length = {"hype": 8.0, "laugh": 7.0, "fail": 6.0, "loud": 30.0, "bot_burst": 15.0, "gift_bomb": 20.0}[str(kind)]
        events.append(Event(str(kind), round(start, 2), round(start + length, 2)))
    return events


def _background_speech(rng: np.random.Generator, duration: float, events: list[Event]) -> list[dict[str, Any]]:
    """Ordinary talk: 2-7 s utterances separated by 0.4-4 s pauses, none overlapping planted moments."""
    busy = [(e.start - 1.0, e.end + 1.0) for e in events if e.planted or e.kind == "loud"]
    out = []
    t = rng.uniform(1, 4)
    while t < duration - 8:
        length = rng.uniform(2, 7)
        if not any(a < t + length and t < b for a, b in busy):
            out.append({"start": t, "end": t + length, "text": str(rng.choice(_BACKGROUND_SPEECH))})
        t += length + rng.uniform(0.4, 4.0)
    return out


def _words(text: str, start: float, end: float) -> list[dict[str, Any]]:
    tokens = text.split()
    if not tokens:
        return []
    step = (end - start) / len(tokens)
    return [
        {
            "start": round(start + i * step, 3),
            "end": round(start + (i + 0.85) * step, 3),
            "word": " " + tok,
            "probability": 0.9,
        }
        for i, tok in enumerate(tokens)
    ]


def _transcript(
    rng: np.random.Generator, background: list[dict[str, Any]], events: list[Event], duration: float
) -> dict[str, Any]:
    segs = list(background)
    banks = {"hype": _HYPE_SPEECH, "laugh": _LAUGH_SPEECH, "fail": _FAIL_SPEECH, "loud": _LOUD_SPEECH}
    for e in events:
        if e.kind in banks:
            text = str(rng.choice(banks[e.kind]))
            if text:
                segs.append({"start": e.start + 0.3, "end": min(e.end, e.start + 6.0), "text": text})
    segs.sort(key=lambda s: s["start"])
    out = []
    for i, s in enumerate(segs):
        words = _words(s["text"], s["start"], s["end"])
        out.append(
            {"id": i, "start": round(s["start"], 3), "end": round(s["end"], 3), "text": " " + s["text"], "words": words}
        )
    return {"language": "en", "duration": duration, "model": "synthetic", "segments": out}


def _chat(
    rng: np.random.Generator,
    events: list[Event],
    duration: float,
    rate: float,
    n_users: int,
    unique_fraction: float,
    delay: float = 0.0,
) -> dict[str, Any]:
    weights = 1.0 / np.arange(1, n_users + 1) ** 0.8  # a few chatters talk a lot
    weights /= weights.sum()
    names = [f"viewer{i:05d}" for i in range(n_users)]
    messages: list[tuple[float, str, str]] = []
    notices: list[tuple[float, str, str]] = []

    def pick_user() -> str:
        return names[int(rng.choice(n_users, p=weights))]

    n_background = rng.poisson(rate * duration)
    times = rng.uniform(0, duration, n_background)
    users = rng.choice(n_users, size=n_background, p=weights)
    texts = rng.choice(len(_CHAT_BACKGROUND), size=n_background)
    unique = rng.random(n_background) < unique_fraction
    for i in range(n_background):
        text = _CHAT_BACKGROUND[texts[i]]
        if unique[i]:
            text = f"{text} {rng.choice(['tbh', 'honestly', 'maybe', 'right', 'chat'])} {i}"
        messages.append((float(times[i]), names[users[i]], text))

    # Background activity has natural ebbs and flows: brief clusters of ordinary talk.
    for _ in range(int(duration / 120)):
        c = rng.uniform(0, duration)
        for _ in range(rng.poisson(max(2.0, rate * 8))):
            messages.append((float(c + rng.uniform(0, 15)), pick_user(), str(rng.choice(_CHAT_BACKGROUND))))

    banks = {"hype": _CHAT_HYPE, "laugh": _CHAT_LAUGH, "fail": _CHAT_FAIL}
    for e in events:
        if e.kind in banks:
            lag = delay + rng.uniform(2.0, 8.0)  # the burst starts 2-8 s after the moment, lasts 10-20 s
            length = rng.uniform(10.0, 20.0)
            extra_rate = max(1.5, rate * rng.uniform(3.0, 6.0))
            for _ in range(rng.poisson(extra_rate * length)):
                dt = lag + rng.exponential(length / 2.5)
                if dt <= 20.0 + lag:
                    messages.append((e.start + dt, pick_user(), str(rng.choice(banks[e.kind]))))
        elif e.kind == "bot_burst":
            for _ in range(rng.poisson(max(3.0, rate * 8) * (e.end - e.start))):
                messages.append((rng.uniform(e.start, e.end), pick_user(), str(rng.choice(_BOT_COMMANDS))))
            for _ in range(10):
                messages.append((rng.uniform(e.start, e.end + 5), "nightbot", str(rng.choice(_BOT_REPLIES))))
        elif e.kind == "gift_bomb":
            gifter = pick_user()
            notices.append((e.start, gifter, "submysterygift"))
            for k in range(20):
                notices.append((e.start + 0.1 * k, gifter, "subgift"))
            for _ in range(rng.poisson(max(2.0, rate * 5) * (e.end - e.start))):  # chat thanks the gifter
                thanks = str(
                    rng.choice(["thanks for the gifts PogChamp", "ty for the sub", "PogChamp gifts", "W gifter"])
                )
                messages.append((rng.uniform(e.start + 1, e.end), pick_user(), thanks))
    for k in range(int(duration / 600)):  # periodic bot announcements
        messages.append((300.0 + k * 600.0, "streamelements", "Remember to follow the channel!"))

    messages = [m for m in messages if 0 <= m[0] < duration]
    messages.sort(key=lambda m: m[0])
    comments = [_comment(i, t, user, text) for i, (t, user, text) in enumerate(messages)]
    for i, (t, user, kind) in enumerate(notices):
        notice = _comment(len(comments) + i, t, user, f"{user} gifted a Tier 1 sub!")
        notice["message"]["user_notice_params"] = {"msg-id": kind}
        comments.append(notice)
    comments.sort(key=lambda c: c["content_offset_seconds"])
    return {
        "streamer": {"name": "synthetic", "id": 1},
        "video": {"id": "123456789", "title": "synthetic stream", "length": duration, "start": 0, "end": duration},
        "comments": comments,
    }


def _comment(i: int, t: float, user: str, text: str) -> dict[str, Any]:
    fragments = [
        {
            "text": tok,
            "emoticon": {"emoticon_id": str(zlib.crc32(tok.encode()) % 10**8)} if tok in _EMOTE_NAMES else None,
        }
        for tok in text.split(" ")
    ]
    return {
        "_id": f"c{i:07d}",
        "created_at": "2024-01-01T00:00:00Z",
        "content_offset_seconds": round(t, 3),
        "commenter": {
            "display_name": user.capitalize(),
            "_id": str(10_000 + zlib.crc32(user.encode()) % 10**6),
            "name": user,
        },
        "message": {"body": text, "fragments": fragments, "user_badges": [], "user_color": "#1E90FF"},
    }
