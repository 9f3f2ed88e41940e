"""The chat archive formats users supply, and the two chat artifacts.

Twitch replay (klipstream.acquisition.twitch_chat) and user-supplied archives (TwitchDownloader JSON or a
`time,username,message` CSV) both become `ChatMessage`s, so there is one writer for
`{id}_chat.json` / `{id}_chat.csv` and later stages never care where the chat came from.

The JSON artifact keeps TwitchDownloader's shape (`comments[].content_offset_seconds`,
`commenter.display_name`, `message.body`, `message.fragments[].emoticon`...) because the existing
frontend and tools already read that shape.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from klipstream.chat import Badge, ChatMessage, Fragment
from klipstream.errors import InvalidVideoUrl

# Error code for every "this is not a usable chat archive" failure, so clients can branch on it.
INVALID_CHAT_FILE = "invalid_chat_file"
CHAT_FILE_TOO_LARGE = "chat_file_too_large"
_ACTION = (
    "Supply a chat archive as TwitchDownloader JSON (with a `comments` list) or as CSV with the header "
    "`time,username,message` (time in seconds from the start of the VOD)."
)
CSV_HEADER = ("time", "username", "message")
_HMS = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


@dataclass(frozen=True, slots=True)
class ChatVideo:
    """What the chat JSON's `video`/`streamer` headers say about the VOD, when known."""

    id: str
    title: str | None = None
    length_seconds: float | None = None
    channel: str | None = None
    channel_id: str | None = None
    created_at: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedArchive:
    messages: list[ChatMessage]  # ordered by offset
    video: ChatVideo | None
    format: str  # "twitchdownloader-json" or "csv"


def invalid(message: str) -> InvalidVideoUrl:
    return InvalidVideoUrl(message, code=INVALID_CHAT_FILE, suggested_action=_ACTION)


def too_large(limit: int) -> InvalidVideoUrl:
    return InvalidVideoUrl(
        f"The chat archive is larger than the {limit:,}-byte limit.",
        code=CHAT_FILE_TOO_LARGE,
        suggested_action="Trim the chat archive or raise KLIPSTREAM_MAX_CHAT_BYTES.",
    )


# ---------------------------------------------------------------------------------------------
# Parsing user-supplied archives
# ---------------------------------------------------------------------------------------------


def parse_archive(data: bytes, *, max_bytes: int) -> ParsedArchive:
    """Recognise and validate a chat archive; raise InvalidVideoUrl(code=invalid_chat_file) otherwise.

    Blocking and memory-hungry (the JSON is parsed whole, bounded by `max_bytes`): run in a thread.
    """
    if data[:2] == b"\x1f\x8b":  # TwitchDownloader also writes .json.gz
        data = _gunzip(data, max_bytes)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    head = data[:4096].lstrip()
    if not head:
        raise invalid("The chat archive is empty (0 bytes of content).")
    if b"\x00" in data[:65536]:
        raise invalid("The chat archive is a binary file, not JSON or CSV text.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"The chat archive is not UTF-8 text (bad byte at position {exc.start}).") from None
    del data
    first = head[:1]
    if first == b"<":
        raise invalid("The chat URL returned an HTML or XML page, not a chat archive.")
    if first in (b"{", b"["):
        return _parse_json(text)
    return _parse_csv(text)


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error:
        raise invalid("The chat archive looks gzip-compressed but is damaged.") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise too_large(max_bytes)
    return out


def _parse_json(text: str) -> ParsedArchive:
    try:
        root = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(
            f"The chat archive is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})."
        ) from None
    del text
    video: ChatVideo | None = None
    if isinstance(root, dict):
        comments = root.get("comments")
        if not isinstance(comments, list):
            raise invalid("The chat JSON has no `comments` list; it is not a TwitchDownloader chat archive.")
        video = _json_video(root)
    elif isinstance(root, list):
        comments = root  # a bare list of comment objects
    else:
        raise invalid("The chat JSON must be an object with a `comments` list.")
    messages = [_json_comment(i, item) for i, item in enumerate(comments)]
    messages.sort(key=_by_offset)
    return ParsedArchive(messages, video, "twitchdownloader-json")


def _str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _json_video(root: dict[str, Any]) -> ChatVideo | None:
    video = root.get("video")
    streamer = _obj(root.get("streamer"))
    if not isinstance(video, dict):
        return None
    length = _seconds(video.get("length"))
    if length is None:
        length = _seconds(video.get("end"))
    return ChatVideo(
        id=_str(video.get("id")) or "",
        title=_str(video.get("title")),
        length_seconds=length,
        channel=_str(streamer.get("name")),
        channel_id=_str(streamer.get("id")),
        created_at=_str(video.get("created_at")),
    )


def _json_comment(index: int, item: Any) -> ChatMessage:
    where = f"comments[{index}]"
    if not isinstance(item, dict):
        raise invalid(f"{where} is not an object.")
    offset = _seconds(item.get("content_offset_seconds"))
    if offset is None:
        raise invalid(f"{where}.content_offset_seconds must be a number of seconds (0 or more).")
    message = item.get("message")
    if not isinstance(message, dict):
        raise invalid(f"{where}.message must be an object with a `body`.")
    fragments = _json_fragments(message.get("fragments"))
    body = message.get("body")
    if body is None and fragments:
        body = "".join(f.text for f in fragments)
    if not isinstance(body, str):
        raise invalid(f"{where}.message.body must be a string.")
    commenter = item.get("commenter")
    if commenter is not None and not isinstance(commenter, dict):
        raise invalid(f"{where}.commenter must be an object.")
    commenter = commenter or {}
    badges = message.get("user_badges")
    display_name = (_str(commenter.get("display_name")) or "").strip()
    return ChatMessage(
        time=offset,
        user=(_str(commenter.get("name")) or display_name).lower(),
        text=body,
        display_name=display_name,
        id=_str(item.get("_id")) or f"archive-{index}",
        user_id=_str(commenter.get("_id")) or "",
        fragments=fragments or ((Fragment(body),) if body else ()),
        badges=tuple(
            Badge(_str(b.get("_id")) or "", _str(b.get("version")) or "")
            for b in (badges if isinstance(badges, list) else ())
            if isinstance(b, dict)
        ),
        color=_str(message.get("user_color")),
        created_at=_str(item.get("created_at")),
    )


def _json_fragments(raw: Any) -> tuple[Fragment, ...]:
    if not isinstance(raw, list):
        return ()
    out = []
    for frag in raw:
        if not isinstance(frag, dict) or not isinstance(frag.get("text"), str):
            continue
        emoticon = frag.get("emoticon")
        emote_id = _str(emoticon.get("emoticon_id")) if isinstance(emoticon, dict) else None
        out.append(Fragment(frag["text"], emote_id))
    return tuple(out)


def _parse_csv(text: str) -> ParsedArchive:
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(rows)]
    except (StopIteration, csv.Error):
        raise invalid("The chat CSV has no header row.") from None
    missing = [name for name in CSV_HEADER if name not in header]
    if missing:
        raise invalid(
            "The chat archive is neither TwitchDownloader JSON nor a CSV with the header "
            f"`time,username,message` (missing column {', '.join(missing)})."
        )
    t_col, u_col, m_col = (header.index(name) for name in CSV_HEADER)
    width = max(t_col, u_col, m_col) + 1
    messages: list[ChatMessage] = []
    try:
        for row in rows:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            line = rows.line_num
            if len(row) < width:
                raise invalid(f"Chat CSV line {line} has {len(row)} columns; expected time,username,message.")
            offset = _csv_time(row[t_col])
            if offset is None:
                raise invalid(f"Chat CSV line {line}: time {row[t_col][:40]!r} is not seconds from the VOD start.")
            name = row[u_col].strip()
            body = row[m_col]
            messages.append(
                ChatMessage(
                    time=offset,
                    user=name.lower(),
                    text=body,
                    display_name=name,
                    id=f"csv-{len(messages)}",
                    fragments=(Fragment(body),) if body else (),
                )
            )
    except csv.Error as exc:
        raise invalid(f"The chat CSV is malformed near line {rows.line_num}: {exc}.") from None
    messages.sort(key=_by_offset)
    return ParsedArchive(messages, None, "csv")


def _csv_time(raw: str) -> float | None:
    raw = raw.strip()
    try:
        return _seconds(float(raw))
    except ValueError:
        pass
    match = _HMS.match(raw)
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def _by_offset(message: ChatMessage) -> float:
    return message.time


# ---------------------------------------------------------------------------------------------
# Writing the artifacts
# ---------------------------------------------------------------------------------------------


def format_seconds(offset: float) -> str:
    """Whole seconds without a decimal point (Twitch offsets are integers), else millisecond precision."""
    if offset == int(offset):
        return str(int(offset))
    return f"{offset:.3f}".rstrip("0")


def td_comment(message: ChatMessage, video_id: str, channel_id: str | None) -> dict[str, Any]:
    """One comment in TwitchDownloader's JSON shape."""
    return {
        "_id": message.id,
        "created_at": message.created_at,
        "channel_id": channel_id,
        "content_type": "video",
        "content_id": video_id,
        "content_offset_seconds": int(message.time) if message.time.is_integer() else message.time,
        "commenter": {"display_name": message.display_name, "_id": message.user_id, "name": message.user},
        "message": {
            "body": message.text,
            "fragments": [
                {"text": f.text, "emoticon": {"emoticon_id": f.emote_id} if f.emote_id else None}
                for f in message.fragments
            ],
            "user_badges": [{"_id": b.set_id, "version": b.version} for b in message.badges],
            "user_color": message.color,
        },
    }


def encode_comment(message: ChatMessage, video_id: str, channel_id: str | None) -> str:
    return json.dumps(td_comment(message, video_id, channel_id), ensure_ascii=False, separators=(",", ":"))


def csv_row(message: ChatMessage) -> tuple[str, str, str]:
    return (format_seconds(message.time), message.username, message.text)


def json_header(video: ChatVideo, *, source: str, count: int) -> str:
    """Everything of the chat JSON before the comments, ending inside the open `comments` list."""
    head: dict[str, Any] = {
        "streamer": {"name": video.channel, "id": video.channel_id},
        "video": {
            "id": video.id,
            "title": video.title,
            "created_at": video.created_at,
            "start": 0,
            "end": video.length_seconds,
            "length": video.length_seconds,
        },
        "klipstream": {"source": source, "comment_count": count},
    }
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
    return text[:-1] + ',"comments":['


class CsvSink:
    """A `time,username,message` writer with RFC 4180 quoting (commas, quotes and newlines in messages).

    CRLF line ends, as RFC 4180 says: the csv module only quotes fields holding characters of the
    line terminator, so with a bare "\n" a message with a lone "\r" would go out unquoted and split
    the row for every reader using universal newlines.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._writer = csv.writer(stream, lineterminator="\r\n")

    def encoded_rows(self, rows: Iterable[str]) -> None:
        """Rows already encoded by another CsvSink (the chat range spools)."""
        self._stream.writelines(rows)

    def header(self) -> None:
        self._writer.writerow(CSV_HEADER)

    def row(self, message: ChatMessage) -> None:
        self._writer.writerow(csv_row(message))


def write_artifacts(
    json_path: Path,
    csv_path: Path,
    messages: Iterable[ChatMessage],
    video: ChatVideo,
    *,
    source: str,
    count: int,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Stream `messages` (already ordered) into both artifacts; atomic (temp file, then rename).

    Blocking: run in a thread. `cancelled` is polled every few thousand messages.
    """
    with artifact_files(json_path, csv_path, video, source=source, count=count) as (js, sink):
        for i, message in enumerate(messages):
            if i and i % 4096 == 0 and cancelled():
                raise InterruptedError("chat writing cancelled")
            if i:
                js.write(",")
            js.write(encode_comment(message, video.id, video.channel_id))
            sink.row(message)


@contextlib.contextmanager
def artifact_files(
    json_path: Path, csv_path: Path, video: ChatVideo, *, source: str, count: int
) -> Iterator[tuple[TextIO, CsvSink]]:
    """The two chat artifacts, written atomically: the caller writes the comments (JSON array items
    and CSV rows); both files appear under their real names only if the block completes."""
    json_tmp, csv_tmp = json_path.with_name(json_path.name + ".part"), csv_path.with_name(csv_path.name + ".part")
    try:
        with _open_text(json_tmp) as js, _open_text(csv_tmp) as cs:
            sink = CsvSink(cs)
            sink.header()
            js.write(json_header(video, source=source, count=count))
            yield js, sink
            js.write("]}")
        os.replace(json_tmp, json_path)
        os.replace(csv_tmp, csv_path)
    finally:
        json_tmp.unlink(missing_ok=True)
        csv_tmp.unlink(missing_ok=True)


def _open_text(path: Path) -> TextIO:
    return open(path, "w", encoding="utf-8", newline="", buffering=1 << 20)


def read_chat_json(path: Path) -> list[ChatMessage]:
    """The messages of a chat JSON artifact, in time order (InvalidVideoUrl if it is not one)."""
    with open(path, "rb") as stream:
        data = stream.read()
    return parse_archive(data, max_bytes=max(1, len(data))).messages
