"""Lexicon loading and matching, the default text scorer, and chat aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from klipstream.acquisition.chat_archive import ArchiveHeader, iter_archive
from klipstream.analysis.chat_scoring import CHAT_SENTIMENT_COLUMNS, LEARNED, ChatSignals, write_chat_sentiment_csv
from klipstream.analysis.lexicon import EMOTIONS, LexiconError, load_lexicon, parse_lexicon
from klipstream.analysis.pipeline import analyze_messages
from klipstream.analysis.reactions import canonical, classify_message
from klipstream.analysis.text_scoring import NO_TEXT, TextScorer
from klipstream.chat import ChatMessage

HEADER = "token,kind,sentiment,excitement,funny,happiness,anger,sadness,neutral\n"


# --- lexicon ---
def test_shipped_lexicon_loads_and_covers_the_common_emotes() -> None:
    lex = load_lexicon()
    for emote in ("PogChamp", "Pog", "POGGERS", "KEKW", "LUL", "OMEGALUL", "Kappa", "monkaS", "Sadge", "PepeHands"):
        assert emote in lex.emotes
    for emote in ("BibleThump", "EZ", "catJAM", "W", "L", "F", "INSANE"):
        assert emote in lex.emotes
    assert ("lets", "go") in lex.phrases and "😂" in lex.emoji and "gg" in lex.words
    assert len(lex) > 150


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hahaha,word,0.5,0.4,1.0,0.5,0,0,0\nx,bogus,0,0,0,0,0,0,0\n", "kind"),
        ("hahaha,word,1.5,0.4,1.0,0.5,0,0,0\n", "sentiment"),
        ("hahaha,word,0.5,0.4,1.2,0.5,0,0,0\n", "emotions"),
        ("hahaha,word,0.5,x,1.0,0.5,0,0,0\n", "numbers"),
        ("hahaha,word,0.5,0.4,1.0,0.5,0,0,0\nHAHAHA,word,0.5,0.4,1.0,0.5,0,0,0\n", "duplicate"),
        ("lol,word,0.5,0.4,1.0,0.5,0,0,0\n", "hahaha"),
    ],
)
def test_bad_lexicon_is_rejected_with_the_line(text: str, message: str) -> None:
    with pytest.raises(LexiconError, match=message):
        parse_lexicon(HEADER + text)


def test_bad_header_is_rejected() -> None:
    with pytest.raises(LexiconError, match="header"):
        parse_lexicon("token,kind\nx,word\n")


def test_matching_rules() -> None:
    lex = load_lexicon()
    assert lex.match("KEKW").emote_count == 1 and lex.match("KEKW").emotions[1] == 1.0
    assert lex.match("kekw").emote_count == 0  # emotes are case-sensitive, the word entry still matches
    assert lex.match("kekw").count == 1
    assert lex.match("w").count == 0 and lex.match("W").count == 1  # "W" is an emote, "w" is not
    assert lex.match("LETS GOOOOO").count == 1  # phrase with elongation folded
    assert lex.match("NO WAYYYY").count == 1 and lex.match("oh my god").count == 1
    assert lex.match("hahahahaha").count == 1 and lex.match("LOOOOL").count == 1  # free-form laughter
    hits = lex.match("😂😂 lol")
    assert hits.count == 3 and hits.emote_count == 2
    assert lex.match("the quick brown fox").count == 0


# --- text scorer ---
def test_emotes_carry_their_emotion() -> None:
    scorer = TextScorer()
    funny, sad, hype = scorer.score("KEKW KEKW"), scorer.score("Sadge"), scorer.score("PogChamp")
    assert funny.funny > 0.9 and funny.highlight > 0.9
    assert sad.sadness > 0.9 and sad.sentiment < 0
    assert hype.excitement > 0.9 and hype.sentiment > 0
    for s in (funny, sad, hype):
        assert s.neutral == pytest.approx(1 - max(s.excitement, s.funny, s.happiness, s.anger, s.sadness))


def test_plain_words_use_vader() -> None:
    scorer = TextScorer()
    good, bad = scorer.score("I love this, what a great play"), scorer.score("this is terrible and awful")
    assert good.sentiment > 0.5 and good.happiness > 0.5
    assert bad.sentiment < -0.5 and bad.anger > 0 and bad.sadness > 0


def test_intensity_cues_raise_excitement() -> None:
    scorer = TextScorer()
    calm, loud = scorer.score("we should go left"), scorer.score("WE SHOULD GO LEFT!!!")
    assert calm.intensity == 0 and calm.excitement == 0 and calm.neutral == 1
    assert loud.intensity > 0.5 and loud.excitement > 0.4
    assert scorer.score("nooooooo").intensity > 0


def test_empty_text_is_no_emotion_and_cache_returns_same_object() -> None:
    scorer = TextScorer()
    assert scorer.score("   ") == NO_TEXT
    assert scorer.score("KEKW") is scorer.score("KEKW")


def test_every_score_in_range() -> None:
    scorer = TextScorer()
    for text in ("F F F", "WTF!!! NOOOO", "gg wp", "😡😡😡 trash", "Kappa", "ok", "LUL " * 30, "!!!!!!"):
        s = scorer.score(text)
        assert -1 <= s.sentiment <= 1
        assert all(0 <= v <= 1 for v in (*s[1:7], s.intensity, s.highlight)), text


# --- chat ---
def _comment(t: float, user: str, body: str, emote: bool = False) -> dict:
    return {
        "_id": f"{user}{t}",
        "content_offset_seconds": t,
        "commenter": {"display_name": user.title(), "_id": "1", "name": user},
        "message": {"body": body, "fragments": [{"text": body, "emoticon": {"emoticon_id": "1"} if emote else None}]},
    }


def test_filter_keeps_short_reactions_and_counts_emote_fragments(tmp_path: Path) -> None:
    doc = {
        "comments": [
            _comment(12.5, "alice", "KEKW", emote=True),
            _comment(3.0, "nightbot", "Follow the channel"),
            _comment(4.0, "bob", "!uptime"),
            _comment(5.0, "carol", "gg"),
            _comment(7.0, "dave", "F"),
        ]
    }
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    _, stream = iter_archive(path, 1 << 20, ArchiveHeader())
    messages = sorted(stream, key=lambda m: m.time)
    assert [m.time for m in messages] == [3.0, 4.0, 5.0, 7.0, 12.5]
    assert messages[-1].emote_fragments == 1 and messages[0].emote_fragments == 0
    result = analyze_messages(messages, 20.0, ("Nightbot",))
    stats = result.stats
    assert (stats.kept, stats.bot_messages, stats.commands) == (3, 1, 1)  # short reactions are signals
    assert result.signals.count[[5, 7, 12]].tolist() == [1, 1, 1]


def test_windows_are_anchored_at_zero_and_csv_shape(tmp_path: Path) -> None:
    # The first message is at 95 s: windows must still start at 0, 30, 60, 90...
    messages = [ChatMessage(95.0 + i * 0.5, f"u{i % 3}", "KEKW") for i in range(10)]
    messages += [ChatMessage(130.0, "u9", "hello there")]
    result = analyze_messages(messages, 150.0, ())
    rows = result.rows
    assert [r["start_time"] for r in rows] == [0.0, 30.0, 60.0, 90.0, 120.0]
    assert rows[0]["message_count"] == 0 and rows[0]["avg_sentiment"] is None
    assert rows[3]["message_count"] == 10 and rows[3]["unique_chatters"] == 3
    assert rows[3]["avg_funny"] == pytest.approx(1.0) and rows[3]["emote_density"] == pytest.approx(1.0)
    assert rows[3]["messages_per_minute"] == pytest.approx(20.0)
    assert 0 <= rows[3]["surge_score"] <= 1
    path = tmp_path / "chat_sentiment.csv"
    write_chat_sentiment_csv(rows, path)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CHAT_SENTIMENT_COLUMNS)
    assert lines[1].startswith("0.0,30.0,0,,")  # empty window: no averages invented
    assert len(lines) == 6


def test_per_second_signals_roundtrip(tmp_path: Path) -> None:
    messages = [ChatMessage(t, "u", "Pog") for t in (0.2, 0.7, 5.1)] + [ChatMessage(5.5, "v", "F\nF")]
    signals = analyze_messages(messages, 10.0, ()).signals
    assert signals.seconds == 10
    assert signals.count.tolist() == [2, 0, 0, 0, 0, 2, 0, 0, 0, 0]
    assert signals.users.tolist()[5] == 2 and signals.users.tolist()[0] == 1
    assert signals.emotion_sums.shape == (len(EMOTIONS), 10)
    path = tmp_path / "s.npz"
    signals.save(path)
    loaded = ChatSignals.load(path)
    np.testing.assert_array_equal(loaded.count, signals.count)
    assert loaded.message_seconds.tolist() == [0, 0, 5, 5] and len(set(loaded.message_users.tolist())) == 2
    assert loaded.fit(12).count.shape == (12,) and loaded.fit(4).emotion_sums.shape == (6, 4)


def test_synthetic_chat_json_is_twitchdownloader_shaped(tmp_path: Path) -> None:
    from tests import synthetic

    stream = synthetic.generate(seed=1, duration=300.0)
    paths = stream.write(tmp_path)
    doc = json.loads(paths["chat_json"].read_text())
    c = doc["comments"][0]
    assert {"_id", "content_offset_seconds", "commenter", "message"} <= set(c)
    assert {"display_name", "_id", "name"} <= set(c["commenter"])
    assert {"body", "fragments", "user_badges", "user_color"} <= set(c["message"])


def test_twitch_notices_and_clip_requests_are_set_apart(tmp_path: Path) -> None:
    notice = _comment(10.0, "gifter", "gifter gifted a Tier 1 sub to someone!")
    notice["message"]["user_notice_params"] = {"msg-id": "subgift"}
    cheer = _comment(11.0, "fan", "Cheer100 what a play")
    old_style = _comment(12.0, "twitchnotify", "viewer just subscribed with Twitch Prime!")
    doc = {
        "comments": [
            notice,
            cheer,
            old_style,
            _comment(13.0, "a", "!clip"),
            _comment(14.0, "b", "!clip that"),
            _comment(15.0, "c", "!uptime"),
            _comment(16.0, "d", "KEKW"),
        ]
    }
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    _, stream = iter_archive(path, 1 << 20, ArchiveHeader())
    messages = list(stream)
    assert [m.system for m in messages[:3]] == ["gift", "bits", "sub"] and messages[1].bits == 100
    result = analyze_messages(messages, 30.0, ())
    stats = result.stats
    assert (stats.system_events, stats.commands, stats.kept) == (3, 3, 1)
    assert result.signals.clip_commands[13:15].tolist() == [1, 1]
    assert result.signals.system.sum() == 3 and result.signals.count.sum() == 1
    assert sum(r["system_events"] for r in result.rows) == 3


@pytest.mark.parametrize(
    ("text", "laughter"),
    [("lol", True), ("jajajaja", True), ("kkkkk", True), ("ㅋㅋㅋ", True), ("www", True), ("草", True),
     ("哈哈哈", True), ("555555", True), ("xDDD", True), ("what a game", False), ("hello", False)],
)  # fmt: skip
def test_laughter_in_many_languages(text: str, laughter: bool) -> None:
    assert classify_message(text, 0).laughter is laughter


def test_reaction_markers_need_no_lexicon() -> None:
    assert classify_message("!!!!!!", 0).burst and classify_message("GGGGGGG", 0).reaction
    assert classify_message("zonkaW", 1).reaction  # a channel emote Twitch marked, unknown to the lexicon
    assert not classify_message("is the stream laggy for anyone", 0).reaction
    assert canonical("7777777") == canonical("77777") == "777"


def test_each_vod_learns_its_own_reaction_tokens() -> None:
    rng = np.random.default_rng(3)
    messages = [
        ChatMessage(float(t), f"u{rng.integers(300)}", "just chatting here") for t in rng.uniform(0, 3600, 1800)
    ]
    for moment in (600, 1500, 2400, 3300):  # surges where many chatters type the channel's catchphrase
        for k in range(60):
            messages.append(ChatMessage(moment + k * 0.3, f"fan{k}", "zonkaHYPE zonkaHYPE"))
    messages.sort(key=lambda m: m.time)
    signals = analyze_messages(messages, 3600.0, ()).signals
    assert "zonkaHYPE" in signals.learned_tokens and "chatting" not in signals.learned_tokens
    assert int(((signals.message_flags & LEARNED) > 0).sum()) == 240
