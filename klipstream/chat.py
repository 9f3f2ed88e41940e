"""A chat message as plain data: what acquisition writes and what the analysis reads.

Twitch's replay, TwitchDownloader archives and `time,username,message` CSVs all become these, so
nothing after the chat stage cares where the chat came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SystemEvent(StrEnum):
    """Chat lines Twitch generates for channel events. They are not reactions to the stream: a gift
    bomb or a raid floods chat without anything happening on screen."""

    SUB = "sub"  # subscriptions and resubscriptions, Prime included
    GIFT = "gift"  # gifted subscriptions, single or mass
    RAID = "raid"  # another channel's viewers arriving
    BITS = "bits"  # cheers
    ANNOUNCEMENT = "announcement"  # moderator announcements, highlighted messages
    OTHER = "other"  # any other Twitch notice (hype train, charity, rituals, ...)


@dataclass(frozen=True, slots=True)
class Fragment:
    text: str
    emote_id: str | None = None  # Twitch emote id when this fragment is an emote


@dataclass(frozen=True, slots=True)
class Badge:
    set_id: str
    version: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    time: float  # seconds from the start of the VOD
    user: str  # login (lower case); the display name, lower-cased, when the login is unknown
    text: str
    display_name: str = ""
    id: str = ""
    user_id: str = ""
    fragments: tuple[Fragment, ...] = ()
    badges: tuple[Badge, ...] = ()
    color: str | None = None
    created_at: str | None = None
    system: str | None = None  # a Twitch notice (SystemEvent value), not something a viewer typed
    bits: int = 0  # bits cheered with the message

    @property
    def username(self) -> str:
        """The name people saw in chat."""
        return self.display_name or self.user

    @property
    def emote_fragments(self) -> int:
        """Fragments Twitch marked as emotes, including emotes no lexicon knows."""
        return sum(1 for f in self.fragments if f.emote_id)
