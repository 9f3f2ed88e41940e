"""KlipStream Analysis: Twitch VOD URL in, transcript, chat analytics and clip-worthy moments out."""

__version__ = "0.1.0"
