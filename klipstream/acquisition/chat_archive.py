"""Chat archives users supply, and the two chat artifacts, read and written as streams.

Twitch replay (klipstream.acquisition.twitch_chat) and user-supplied archives (TwitchDownloader JSON,
optionally gzipped, or a `time,username,message` CSV) both become `ChatMessage`s, spooled to disk
in artifact form and merged into `{id}_chat.json` / `{id}_chat.csv`, so later stages never care
where the chat came from and no step holds a whole chat in memory.

The JSON artifact keeps TwitchDownloader's shape (`comments[].content_offset_seconds`,
`commenter.display_name`, `message.body`, `message.fragments[].emoticon`...) because the existing
frontend and tools read that shape; it is written one comment per line, which is still one JSON
document but lets readers stream it line by line and seek to a second of the VOD.

Everything here is blocking: the chat stage runs it in a child process (`python -m
klipstream.acquisition.chat_archive`), so parsing a 200 MB archive never competes with the event
loop for the GIL.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import csv
import gzip
import io
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import ijson

from klipstream.chat import Badge, ChatMessage, Fragment, SystemEvent
from klipstream.errors import InvalidVideoUrl
from klipstream.proc import child_main, report

# Error code for every "this is not a usable chat archive" failure, so clients can branch on it.
INVALID_CHAT_FILE = "invalid_chat_file"
CHAT_FILE_TOO_LARGE = "chat_file_too_large"
_ACTION = (
    "Supply a chat archive as TwitchDownloader JSON (with a `comments` list) or as CSV with the header "
    "`time,username,message` (time in seconds from the start of the VOD)."
)
CSV_HEADER = ("time", "username", "message")
_HMS = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")
_SNIFF_BYTES = 65536
COMMENTS_KEY = '"comments":['
# Twitch's user-notice ids (TwitchDownloader's `user_notice_params.msg-id`) by event kind.
_NOTICES = {
    "sub": SystemEvent.SUB,
    "resub": SystemEvent.SUB,
    "primepaidupgrade": SystemEvent.SUB,
    "giftpaidupgrade": SystemEvent.SUB,
    "anongiftpaidupgrade": SystemEvent.SUB,
    "extendsub": SystemEvent.SUB,
    "subgift": SystemEvent.GIFT,
    "anonsubgift": SystemEvent.GIFT,
    "submysterygift": SystemEvent.GIFT,
    "anonsubmysterygift": SystemEvent.GIFT,
    "communitypayforward": SystemEvent.GIFT,
    "standardpayforward": SystemEvent.GIFT,
    "raid": SystemEvent.RAID,
    "unraid": SystemEvent.RAID,
    "bitsbadgetier": SystemEvent.BITS,
    "announcement": SystemEvent.ANNOUNCEMENT,
    "highlighted-message": SystemEvent.ANNOUNCEMENT,
}
# Old VOD chats carry notices as lines from Twitch's own accounts, newer ones in these words.
SYSTEM_ACCOUNTS = frozenset({"twitchnotify", "jtv"})
_NOTICE_TEXT = (
    (re.compile(r"\bsubscribed (?:at tier \d|with (?:twitch )?prime)\b|\bsubscribed for \d+ months\b", re.I), "sub"),
    (re.compile(r"\bgift(?:ed|ing) (?:a |\d+ )?(?:tier \d )?sub", re.I), "gift"),
    (re.compile(r"\braiders? from\b|\bis raiding\b", re.I), "raid"),
)
_CHEER = re.compile(r"(?i)(?:^|\s)cheer(\d{1,6})(?=\s|$)")


@dataclass(frozen=True, slots=True)
class ChatVideo:
    """What the chat JSON's `video`/`streamer` headers say about the VOD, when known."""

    id: str
    title: str | None = None
    length_seconds: float | None = None
    channel: str | None = None
    channel_id: str | None = None
    created_at: str | None = None
    channel_login: str | None = None  # the channel's login, when Twitch said (not written to the header)

    def merged(self, other: ChatVideo | None) -> ChatVideo:
        """This video's facts, with gaps filled from `other`."""
        if other is None:
            return self
        return ChatVideo(
            id=self.id or other.id,
            title=self.title or other.title,
            length_seconds=self.length_seconds or other.length_seconds,
            channel=self.channel or other.channel,
            channel_id=self.channel_id or other.channel_id,
            created_at=self.created_at or other.created_at,
            channel_login=self.channel_login or other.channel_login,
        )


def invalid(message: str) -> InvalidVideoUrl:
    return InvalidVideoUrl(message, code=INVALID_CHAT_FILE, suggested_action=_ACTION)


def too_large(limit: int) -> InvalidVideoUrl:
    return InvalidVideoUrl(
        f"The chat archive is larger than the {limit:,}-byte limit.",
        code=CHAT_FILE_TOO_LARGE,
        suggested_action="Trim the chat archive or raise KLIPSTREAM_MAX_CHAT_BYTES.",
    )


def system_event(login: str, text: str, notice: str | None, bits: int) -> str | None:
    """The SystemEvent a chat line stands for, or None for something a viewer typed."""
    if notice:
        return _NOTICES.get(notice, SystemEvent.OTHER).value
    if login in SYSTEM_ACCOUNTS:
        for pattern, kind in _NOTICE_TEXT:
            if pattern.search(text):
                return kind
        return SystemEvent.OTHER.value
    if bits > 0:
        return SystemEvent.BITS.value
    return None


def cheered_bits(text: str) -> int:
    """Bits in `Cheer100`-style tokens: how a VOD replay without notice fields shows a cheer."""
    return sum(int(m) for m in _CHEER.findall(text))


# ---------------------------------------------------------------------------------------------
# Reading user-supplied archives
# ---------------------------------------------------------------------------------------------


class _Limited(io.RawIOBase):
    """A byte stream that fails with `too_large` past `limit` bytes (of decompressed content)."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        self._inner = inner
        self._left = limit
        self._limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            n = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        except (OSError, EOFError, zlib.error) as exc:
            raise invalid("The chat archive looks gzip-compressed but is damaged.") from exc
        if n:
            self._left -= n
            if self._left < 0:
                raise too_large(self._limit)
        return n or 0


@contextlib.contextmanager
def open_archive(path: Path, max_bytes: int, header: ArchiveHeader) -> Iterator[tuple[str, BinaryIO]]:
    """The archive's format ("json" or "csv") and a size-limited stream of its content, after
    the checks that tell a user what they supplied instead of a chat."""
    with open(path, "rb") as raw:
        header.raw = raw
        compressed = raw.read(2) == b"\x1f\x8b"  # TwitchDownloader also writes .json.gz
        raw.seek(0)
        inner: BinaryIO = gzip.GzipFile(fileobj=raw) if compressed else raw  # type: ignore[assignment]
        stream = io.BufferedReader(_Limited(inner, max_bytes), buffer_size=1 << 16)
        head = stream.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
        if head.startswith(b"\xef\xbb\xbf"):
            stream.read(3)
            head = head[3:]
        text_head = head.lstrip()
        if not text_head:
            raise invalid("The chat archive is empty (0 bytes of content).")
        if b"\x00" in head:
            raise invalid("The chat archive is a binary file, not JSON or CSV text.")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a character cut at the sniffing boundary
                raise invalid(f"The chat archive is not UTF-8 text (bad byte at position {exc.start}).") from None
        first = text_head[:1]
        if first == b"<":
            raise invalid("The chat URL returned an HTML or XML page, not a chat archive.")
        yield ("json" if first in (b"{", b"[") else "csv"), stream


@dataclass
class ArchiveHeader:
    """What reading an archive learns besides its messages."""

    video: ChatVideo | None = None  # the JSON's `video`/`streamer` objects, once read
    raw: BinaryIO | None = None  # the file being read, for progress by position


def iter_archive(path: Path, max_bytes: int, header: ArchiveHeader) -> tuple[str, Iterator[ChatMessage]]:
    """The format and the messages of a user-supplied archive, in file order, validated as they
    stream; `header.video` is filled in when the JSON's `video`/`streamer` objects are read."""
    with open(path, "rb") as probe:
        probe.read(1)  # fail early and clearly when the file vanished
    state: dict[str, Any] = {}

    def messages() -> Iterator[ChatMessage]:
        with open_archive(path, max_bytes, header) as (kind, stream):
            state["kind"] = kind
            if kind == "json":
                yield from _json_messages(stream, header)
            else:
                yield from _csv_messages(stream)

    iterator = messages()
    first = next(iterator, None)  # runs the sniffing checks now, so errors surface here
    kind = state.get("kind", "json")

    def chained() -> Iterator[ChatMessage]:
        if first is not None:
            yield first
            yield from iterator

    return ("twitchdownloader-json" if kind == "json" else "csv"), chained()


def _json_messages(stream: BinaryIO, header: ArchiveHeader) -> Iterator[ChatMessage]:
    """Comments of a TwitchDownloader document (or a bare list of comments), streamed with ijson."""
    events = ijson.parse(stream, use_float=True)
    streamer: dict[str, Any] = {}
    video: dict[str, Any] | None = None
    found_comments = False
    index = 0
    try:
        prefix, event, value = next(events)
        if event == "start_array":  # a bare list of comment objects
            found_comments = True
            for item in _items(events):
                yield _json_comment(index, item)
                index += 1
        elif event == "start_map":
            for prefix, event, value in events:
                if prefix == "" and event == "map_key":
                    if value == "comments":
                        found_comments = True
                        prefix, event, value = next(events)
                        if event != "start_array":
                            raise invalid("The chat JSON's `comments` is not a list.")
                        for item in _items(events):
                            yield _json_comment(index, item)
                            index += 1
                    elif value in ("video", "streamer"):
                        obj = _build(events, value)
                        if value == "video":
                            video = obj if isinstance(obj, dict) else None
                        elif isinstance(obj, dict):
                            streamer = obj
        else:
            raise invalid("The chat JSON must be an object with a `comments` list.")
    except ijson.JSONError as exc:
        raise invalid(f"The chat archive is not valid JSON ({_json_error(exc)}).") from None
    except StopIteration:
        raise invalid("The chat archive is not valid JSON (it ends too early).") from None
    if not found_comments:
        raise invalid("The chat JSON has no `comments` list; it is not a TwitchDownloader chat archive.")
    header.video = _json_video(video, streamer)


def _json_error(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _items(events: Iterator[tuple[str, str, Any]]) -> Iterator[Any]:
    """Build each element of the array whose `start_array` was just consumed, one at a time."""
    for _, event, value in events:
        if event == "end_array":  # the enclosing array ends: every item was consumed whole
            return
        builder = ijson.ObjectBuilder()
        builder.event(event, value)
        depth = 1 if event in ("start_map", "start_array") else 0
        while depth:
            _, event, value = next(events)
            builder.event(event, value)
            if event in ("start_map", "start_array"):
                depth += 1
            elif event in ("end_map", "end_array"):
                depth -= 1
        yield builder.value


def _build(events: Iterator[tuple[str, str, Any]], key: str) -> Any:
    """The value that follows a map key, built whole (only for small header objects)."""
    builder = ijson.ObjectBuilder()
    depth = 0
    for _, event, value in events:
        builder.event(event, value)
        if event in ("start_map", "start_array"):
            depth += 1
        elif event in ("end_map", "end_array"):
            depth -= 1
        if depth == 0:
            break
    return builder.value


def _str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _json_video(video: dict[str, Any] | None, streamer: dict[str, Any]) -> ChatVideo | None:
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
    login = (_str(commenter.get("name")) or display_name).lower()
    bits_value = message.get("bits_spent")
    bits = int(bits_value) if isinstance(bits_value, (int, float)) and bits_value > 0 else cheered_bits(body)
    notice = _obj(message.get("user_notice_params")).get("msg-id")
    return ChatMessage(
        time=offset,
        user=login,
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
        system=system_event(login, body, notice if isinstance(notice, str) else None, bits),
        bits=bits,
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


def _csv_messages(stream: BinaryIO) -> Iterator[ChatMessage]:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    rows = csv.reader(text)
    try:
        try:
            header = [h.strip().lower() for h in next(rows)]
        except StopIteration:
            raise invalid("The chat CSV has no header row.") from None
        missing = [name for name in CSV_HEADER if name not in header]
        if missing:
            raise invalid(
                "The chat archive is neither TwitchDownloader JSON nor a CSV with the header "
                f"`time,username,message` (missing column {', '.join(missing)})."
            )
        t_col, u_col, m_col = (header.index(name) for name in CSV_HEADER)
        width = max(t_col, u_col, m_col) + 1
        count = 0
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
            login = name.lower()
            bits = cheered_bits(body)
            yield ChatMessage(
                time=offset,
                user=login,
                text=body,
                display_name=name,
                id=f"csv-{count}",
                fragments=(Fragment(body),) if body else (),
                system=system_event(login, body, None, bits),
                bits=bits,
            )
            count += 1
    except csv.Error as exc:
        raise invalid(f"The chat CSV is malformed near line {rows.line_num}: {exc}.") from None
    except UnicodeDecodeError as exc:
        raise invalid(f"The chat archive is not UTF-8 text ({exc.reason}).") from None


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


# ---------------------------------------------------------------------------------------------
# The artifacts: encoding, spooling in arrival order, merging in time order
# ---------------------------------------------------------------------------------------------


def format_seconds(offset: float) -> str:
    """Whole seconds without a decimal point (Twitch offsets are integers), else millisecond precision."""
    if offset == int(offset):
        return str(int(offset))
    return f"{offset:.3f}".rstrip("0")


def td_comment(message: ChatMessage, video_id: str, channel_id: str | None) -> dict[str, Any]:
    """One comment in TwitchDownloader's JSON shape."""
    body: dict[str, Any] = {
        "body": message.text,
        "bits_spent": message.bits,
        "fragments": [
            {"text": f.text, "emoticon": {"emoticon_id": f.emote_id} if f.emote_id else None} for f in message.fragments
        ],
        "user_badges": [{"_id": b.set_id, "version": b.version} for b in message.badges],
        "user_color": message.color,
    }
    if message.system is not None:
        body["klipstream_system"] = message.system  # the event kind this service recognised
    return {
        "_id": message.id,
        "created_at": message.created_at,
        "channel_id": channel_id,
        "content_type": "video",
        "content_id": video_id,
        "content_offset_seconds": int(message.time) if message.time.is_integer() else message.time,
        "commenter": {"display_name": message.display_name, "_id": message.user_id, "name": message.user},
        "message": body,
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
    return text[:-1] + "," + COMMENTS_KEY


class CsvSink:
    """A `time,username,message` writer with RFC 4180 quoting (commas, quotes and newlines in messages).

    CRLF line ends, as RFC 4180 says: the csv module only quotes fields holding characters of the
    line terminator, so with a bare "\\n" a message with a lone "\\r" would go out unquoted and split
    the row for every reader using universal newlines.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._writer = csv.writer(stream, lineterminator="\r\n")

    def header(self) -> None:
        self._writer.writerow(CSV_HEADER)

    def row(self, message: ChatMessage) -> None:
        self._writer.writerow(csv_row(message))


class ChatSpool:
    """Messages on disk in artifact form (a JSON line and a CSV record each), in arrival order,
    with each message's time and offsets so a disordered spool can be merged in time order without
    reading it into memory."""

    def __init__(self, directory: Path, name: str, video_id: str) -> None:
        self.json_path = directory / f".{name}.jsonl"
        self.csv_path = directory / f".{name}.csv"
        self.video_id = video_id
        self._json = open(self.json_path, "wb", buffering=1 << 20)
        self._csv_file = open(self.csv_path, "wb", buffering=1 << 20)
        self._row = io.StringIO()
        self._csv = CsvSink(self._row)
        self.times = array.array("d")
        self._json_offsets = array.array("q")
        self._csv_offsets = array.array("q")
        self._json_size = 0
        self._csv_size = 0
        self.ordered = True
        self.last_time = -1.0

    @property
    def count(self) -> int:
        return len(self.times)

    def add(self, message: ChatMessage, channel_id: str | None) -> None:
        if message.time < self.last_time:
            self.ordered = False
        self.last_time = max(self.last_time, message.time)
        line = (encode_comment(message, self.video_id, channel_id) + "\n").encode()
        self._row.seek(0)
        self._row.truncate()
        self._csv.row(message)
        record = self._row.getvalue().encode()
        self.times.append(message.time)
        self._json_offsets.append(self._json_size)
        self._csv_offsets.append(self._csv_size)
        self._json.write(line)
        self._csv_file.write(record)
        self._json_size += len(line)
        self._csv_size += len(record)

    def close(self) -> None:
        self._json.close()
        self._csv_file.close()

    def remove(self) -> None:
        self.close()
        self.json_path.unlink(missing_ok=True)
        self.csv_path.unlink(missing_ok=True)

    def records(self, cancelled: Callable[[], bool]) -> Iterator[tuple[str, str]]:
        """(JSON line, CSV record) pairs in time order (stable for equal times)."""
        self.close()
        with open(self.json_path, "rb") as js, open(self.csv_path, "rb") as cs:
            if self.ordered:
                order: Iterable[int] = range(self.count)
            else:
                order = sorted(range(self.count), key=self.times.__getitem__)
            ends_j = [*self._json_offsets[1:], os.fstat(js.fileno()).st_size]
            ends_c = [*self._csv_offsets[1:], os.fstat(cs.fileno()).st_size]
            for n, i in enumerate(order):
                if n % 4096 == 0 and cancelled():
                    raise InterruptedError("chat writing cancelled")
                if not self.ordered:
                    js.seek(self._json_offsets[i])
                    cs.seek(self._csv_offsets[i])
                yield (
                    js.read(ends_j[i] - self._json_offsets[i]).decode("utf-8").rstrip("\n"),
                    cs.read(ends_c[i] - self._csv_offsets[i]).decode("utf-8"),
                )


def write_artifacts(
    spools: list[ChatSpool],
    json_path: Path,
    csv_path: Path,
    video: ChatVideo,
    *,
    source: str,
    cancelled: Callable[[], bool] = lambda: False,
) -> int:
    """Merge spools (already in time order with respect to each other) into the two artifacts,
    atomically (temporary files, then renames); returns the number of messages. Removes the spools."""
    count = sum(s.count for s in spools)
    json_tmp, csv_tmp = json_path.with_name(json_path.name + ".part"), csv_path.with_name(csv_path.name + ".part")
    try:
        with _open_text(json_tmp) as js, _open_text(csv_tmp) as cs:
            CsvSink(cs).header()
            js.write(json_header(video, source=source, count=count))
            first = True
            for spool in spools:
                for line, record in spool.records(cancelled):
                    js.write("\n" if first else "\n,")
                    js.write(line)
                    cs.write(record)
                    first = False
            js.write("\n]}\n")
        os.replace(json_tmp, json_path)
        os.replace(csv_tmp, csv_path)
    finally:
        json_tmp.unlink(missing_ok=True)
        csv_tmp.unlink(missing_ok=True)
        for spool in spools:
            spool.remove()
    return count


def _open_text(path: Path) -> TextIO:
    return open(path, "w", encoding="utf-8", newline="", buffering=1 << 20)


# ---------------------------------------------------------------------------------------------
# Reading the chat artifact back
# ---------------------------------------------------------------------------------------------


def iter_chat_file(path: Path, *, with_offsets: bool = False) -> Iterator[tuple[int, ChatMessage]]:
    """(byte offset, message) for every comment of a chat JSON, streamed.

    Artifacts this service writes have one comment per line and are read line by line (offsets
    are exact, so a reader can seek to them later); any other TwitchDownloader-shaped document is
    streamed with ijson (offsets are then -1).
    """
    with open(path, "rb") as stream:
        first = stream.readline()
        if first.rstrip().endswith(COMMENTS_KEY.encode()):
            index = 0
            while True:
                offset = stream.tell()
                line = stream.readline()
                if not line:
                    raise invalid("The chat JSON ends before its comments do.")
                text = line.strip()
                if text.startswith(b"]"):
                    return
                if text.startswith(b","):
                    text = text[1:]
                if not text:
                    continue
                try:
                    item = json.loads(text)
                except ValueError as exc:
                    raise invalid(f"The chat JSON's comment {index} is not valid JSON ({exc.msg}).") from None
                yield offset, _json_comment(index, item)
                index += 1
        stream.seek(0)
        for message in _json_messages(stream, ArchiveHeader()):
            yield -1, message


def iter_chat(path: Path) -> Iterator[ChatMessage]:
    """The messages of a chat JSON (artifact or TwitchDownloader archive), streamed."""
    for _, message in iter_chat_file(path):
        yield message


def read_messages_at(path: Path, offset: int, until: float) -> list[ChatMessage]:
    """The messages of a line-per-comment chat JSON from byte `offset` up to time `until`."""
    out: list[ChatMessage] = []
    with open(path, "rb") as stream:
        stream.seek(offset)
        for line in stream:
            text = line.strip()
            if text.startswith(b"]"):
                break
            if text.startswith(b","):
                text = text[1:]
            if not text:
                continue
            message = _json_comment(len(out), json.loads(text))
            if message.time >= until:
                break
            out.append(message)
    return out


# ---------------------------------------------------------------------------------------------
# The conversion child: archive file in, artifacts out
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    count: int
    format: str
    video: dict[str, Any]


def convert_archive(source: Path, json_path: Path, csv_path: Path, known: ChatVideo, *, max_bytes: int) -> Converted:
    """Parse and validate `source` as it streams, write both artifacts; the video header merges
    what the job knows with what the archive says."""
    header = ArchiveHeader()
    size = max(1, source.stat().st_size)
    spool = ChatSpool(json_path.parent, json_path.stem + "_archive", known.id)
    try:
        kind, messages = iter_archive(source, max_bytes, header)
        report(0.05, "parsing chat archive")
        for i, message in enumerate(messages):
            spool.add(message, known.channel_id)
            if i % 20000 == 0 and i and header.raw is not None and not header.raw.closed:
                report(0.05 + 0.7 * min(1.0, header.raw.tell() / size), f"{i:,} chat messages read")
        video = known.merged(header.video)
        report(0.75, f"writing {spool.count:,} chat messages")
        count = write_artifacts([spool], json_path, csv_path, video, source=f"chat_url:{kind}")
    except BaseException:
        spool.remove()
        raise
    return Converted(count, kind, asdict(video))


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="chat_archive")
    parser.add_argument("source", type=Path)
    parser.add_argument("json_path", type=Path)
    parser.add_argument("csv_path", type=Path)
    parser.add_argument("--known", default="{}", help="JSON of the ChatVideo fields the job knows")
    parser.add_argument("--max-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    known = ChatVideo(**json.loads(args.known))
    result = convert_archive(args.source, args.json_path, args.csv_path, known, max_bytes=args.max_bytes)
    print(json.dumps({"result": asdict(result)}), flush=True)


if __name__ == "__main__":
    child_main(_main, sys.argv[1:])
