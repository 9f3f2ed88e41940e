"""What makes a chat message a reaction, without a fixed list of emotes.

Real chat reacts in its own vocabulary: channel emotes, third-party emotes typed as plain text,
laughter in many languages and scripts, bursts of repeated characters, and inside jokes. So a
message counts as a reaction when any of these hold:

* Twitch marked one of its fragments as an emote (whatever the emote's name);
* it laughs or gasps in one of the forms below (lol, lmao, xd, kek, haha, jaja, kkkk, ㅋㅋ, www,
  草, 哈哈, 555, ??? ...);
* it is a burst: one character or a short unit repeated ("!!!!", "777777", "GGGGG", "wowowow");
* it contains a token this VOD's own chat uses far more during its surges than elsewhere
  (klipstream.analysis.chat_scoring.ChatAccumulator.learn): a channel's emotes and
  catchphrases, learned per VOD.

Categories an editor understands (`CATEGORIES`) come from the same evidence: each message votes
for the categories its tokens point at, and a moment's category is the one its reaction window
votes for most (klipstream.analysis.highlights).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Category(StrEnum):
    HYPE = "hype"  # excitement, a great play, celebration
    FUNNY = "funny"  # laughter
    FAIL = "fail"  # a mistake, a loss, "F"
    CLUTCH = "clutch"  # disbelief at a narrow success
    WHOLESOME = "wholesome"  # warmth, hearts, "aww"
    RAGE = "rage"  # anger, shouting, tilt
    SCARY = "scary"  # fright, jumpscares


CATEGORIES: tuple[Category, ...] = tuple(Category)

_LAUGH = re.compile(
    r"(?ix)"
    r"\b(?:l+o+l+[lo]*|lu+l+|lmf?a+o+|ro+fl|kek[wl]?|ke+k+|xd+|mdr+|ptdr+|rsrs+|jsjs+)\b"
    r"|(?:ha){2,}|(?:ah){2,}h?|(?:he){2,}|(?:hi){3,}|(?:ja){2,}|(?:je){2,}|(?:ji){3,}|(?:ka){3,}"
    r"|k{4,}|w{3,}|5{3,}"
    r"|[ㅋㅎ]{2,}|[哈呵嘿]{2,}|笑死|[草笑]|[ｗ]{2,}|lol|ワロタ"
)
_SHOCK = re.compile(r"(?ix) \?{3,} | \bw+h*a+t+\b | \bwtf+\b | \bo+m+g+\b | \bwo+w+\b | \?!|!\?")
_BURST = re.compile(r"^(.{1,3}?)\1{3,}$", re.S)
_TOKEN_STRIP = "\"'.,;:()[]{}<>*~`"
_EMOTICON = re.compile(r"^[:;=>xX8]['-^]?[()\[\]DdOoPp/\\|*]+$|^[<]3+$|^[;TtQ][_\-.]?[;TtQ]$|^[oO0][_.][oO0]$")

# Tokens that point at a category, in lower case; emote names as Twitch, BTTV, FFZ and 7TV spell them.
_CATEGORY_TOKENS: dict[Category, frozenset[str]] = {
    Category.HYPE: frozenset(
        "pog pogchamp poggers pogu pogo pagman pagchomp hypers kreygasm curselit letsgo lets go w ww www ggg "
        "hype gogogo poggies pogslide ez hyperclap clap gg ggs 777 nice ayy ayyy insane sheesh".split()
    ),
    Category.FUNNY: frozenset(
        "kekw kek lul lulw omegalul lol lmao lmfao icant xd 4head haha hahaha jajaja funny dead "
        "rofl omegalaughing pepelaugh kappa 笑死 哈哈 哈哈哈 草 www ｗｗｗ".split()
    ),
    Category.FAIL: frozenset(
        "f rip ripbozo unlucky bruh throw throwing l ls fail failed oof yikes pepehands notlikethis "
        "biblethump sadge sad 87 lose lost :( :-( :'( ;( ;-; ;_; t_t qq".split()
    ),
    Category.CLUTCH: frozenset(
        "clutch noway no way holy godlike ace 1v5 1v4 1v3 1v2 omg wow what how unreal monkaomega "
        "clutched :o :-o o_o o.o 😮 😱 🤯".split()
    ),
    Category.WHOLESOME: frozenset(
        "<3 aww awww cute wholesome love bless sweet peeposhy peepohappy hearts blessed heart catjam vohiyo "
        ":) :-) =) :d :-d =d ♥ ❤ ❤️ 😊 🥰 😍".split()
    ),
    Category.RAGE: frozenset(
        "wtf dansgame babyrage swiftrage madge angry rage tilted tilt reeee mad residentsleeper "
        "pepega weirdchamp >:( >( 😡 🤬 😠".split()
    ),
    Category.SCARY: frozenset(
        "monkas monkaw monkagiga monkah scary jumpscare scared d: dead creepy horror wutface ahhh aaaa".split()
    ),
}
_CATEGORY_OF: dict[str, tuple[Category, ...]] = {}
for _category, _tokens in _CATEGORY_TOKENS.items():
    for _token in _tokens:
        _CATEGORY_OF[_token] = (*_CATEGORY_OF.get(_token, ()), _category)


@dataclass(frozen=True, slots=True)
class Reaction:
    """What one message shows."""

    reaction: bool  # any reaction marker
    laughter: bool
    shock: bool
    burst: bool
    categories: tuple[Category, ...]  # one vote per category the message points at


NOT_A_REACTION = Reaction(False, False, False, False, ())


_RUN = re.compile(r"(.)\1{3,}", re.S)


def tokens(text: str) -> list[str]:
    """Whitespace tokens with surrounding punctuation removed (case kept: emote names are cased);
    text emoticons (":(", "<3", "T_T") are kept whole, since their punctuation is the token."""
    out = []
    for raw in text.split():
        token = raw if _EMOTICON.match(raw) else raw.strip(_TOKEN_STRIP)
        if token:
            out.append(token)
    return out


def canonical(token: str) -> str:
    """One spelling for a token however long chat stretched it: runs of one character longer than
    three become three ("7777777" and "77777" are both "777", "GGGGGG" is "GGG")."""
    return _RUN.sub(r"\1\1\1", token)


def classify_message(text: str, emote_fragments: int) -> Reaction:
    """The reaction markers and category votes of one message."""
    stripped = text.strip()
    if not stripped:
        return NOT_A_REACTION
    lowered = [canonical(w.lower()) for w in tokens(stripped)]
    laughter = bool(_LAUGH.search(stripped))
    shock = bool(_SHOCK.search(stripped))
    compact = stripped.replace(" ", "")
    burst = len(compact) >= 4 and bool(_BURST.match(compact))
    votes: list[Category] = []
    seen: set[Category] = set()
    for word in lowered:
        for category in _CATEGORY_OF.get(word, ()):
            if category not in seen:
                seen.add(category)
                votes.append(category)
    if laughter and Category.FUNNY not in seen:
        votes.append(Category.FUNNY)
    if shock and not votes:
        votes.append(Category.CLUTCH)
    if "<3" in stripped and Category.WHOLESOME not in seen:
        votes.append(Category.WHOLESOME)
    reaction = laughter or shock or burst or emote_fragments > 0 or bool(votes)
    return Reaction(reaction, laughter, shock, burst, tuple(votes))


def dominant_category(votes: Iterable[float], prior_votes: float = 3.0) -> tuple[Category | None, float]:
    """The category with the most votes and a confidence in [0, 1].

    Confidence is the winner's share of all votes, shrunk by `prior_votes` pseudo-votes spread
    evenly over the categories, so a moment with three votes is never as sure as one with three
    hundred. None when nothing voted.
    """
    values = list(votes)
    total = sum(values)
    if total <= 0:
        return None, 0.0
    best = max(range(len(values)), key=values.__getitem__)
    share = (values[best] + prior_votes / len(values)) / (total + prior_votes)
    return CATEGORIES[best], round(min(1.0, max(0.0, share)), 4)
