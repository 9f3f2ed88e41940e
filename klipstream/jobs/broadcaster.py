"""In-memory fan-out of job events to Server-Sent-Events subscribers.

An event's id is its sequence in the job's `job_events` rows (klipstream.jobs.events writes them
in the same transaction as the job change), so ids are the same on every instance and across
restarts: the instance running the job publishes each event here once it has committed, and an
instance that follows the job for its own streams reads the new rows from the table
(klipstream.jobs.cluster). The table serves Last-Event-ID replay beyond the ring below; the live
path stays in memory.

Each job has a topic holding a bounded ring buffer of encoded events. Subscribers do not get
queues of their own: each keeps a cursor into the ring and sleeps on the topic's wake-up future.
That is what keeps 5,000 subscribers cheap, lets a slow subscriber fall behind without slowing the
pipeline or anyone else (when its cursor drops off the ring it is told to take a fresh snapshot),
and bounds memory by the ring size whatever the subscribers do.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from klipstream.jobs.store import EventRow
from klipstream.models import TERMINAL_STATUSES
from klipstream.sse import HEARTBEAT_CHUNK, frame, http_chunk


@dataclass(slots=True, frozen=True)
class Event:
    id: int
    type: str  # progress | stage | completed | failed | cancelled | reconnect
    data: str  # JSON text on one line
    frame: bytes  # the whole text/event-stream frame, encoded once for every subscriber
    chunk: bytes  # the frame as one HTTP/1.1 chunk, what is written to each subscriber's socket

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_STATUSES

    @property
    def final(self) -> bool:
        """The last event a stream carries: the job's end, or the server's request to reconnect."""
        return self.terminal or self.type == "reconnect"


class Sink:
    """One subscriber's socket, written to by the publisher while the subscriber keeps up.

    The publisher writes each event's shared chunk straight to every caught-up socket, so an event
    wakes no task per subscriber; a subscriber's own task runs only when it needs attention: it
    fell behind (or its buffer filled), or the stream ended.
    """

    __slots__ = ("_attention", "busy", "cursor", "transport")

    def __init__(self, transport: asyncio.WriteTransport, cursor: int) -> None:
        self.transport = transport
        self.cursor = cursor  # id of the last event this socket was given
        self.busy = False  # its task is writing (catching up): the publisher must not interleave
        self._attention: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def offer(self, event: Event) -> None:
        if self.busy or event.id != self.cursor + 1 or self._backlogged():
            self.notify()
            return
        self.transport.write(event.chunk)
        self.cursor = event.id
        if event.final:
            self.notify()

    def beat(self) -> None:
        if self.busy or self._backlogged():
            self.notify()
        else:
            self.transport.write(HEARTBEAT_CHUNK)

    def _backlogged(self) -> bool:
        return self.transport.is_closing() or self.transport.get_write_buffer_size() > 0

    def notify(self) -> None:
        if not self._attention.done():
            self._attention.set_result(None)

    async def attention(self) -> None:
        """Return once the task must act; a notification that came early is not lost."""
        await self._attention
        self._attention = asyncio.get_running_loop().create_future()


class Topic:
    """One job's event stream."""

    def __init__(self, buffer_size: int, last_id: int = 0) -> None:
        self.events: deque[Event] = deque(maxlen=buffer_size)
        self.last_id = last_id  # the job's last event id (table sequence) this topic knows of
        self.subscribers = 0
        self.sinks: set[Sink] = set()
        self.terminal = False
        self.closing: tuple[str, str] | None = None  # the server's request to reconnect: (type, data)
        self.last_used = time.monotonic()
        self._wakeup: asyncio.Future[None] | None = None

    def put(self, event_id: int, type_: str, data: str) -> Event | None:
        """Publish the job's event `event_id` (its table sequence); None if it is not newer than
        what the topic has (the owner's publication and a table read can both bring it).

        Ids follow one another; one that skips (a write whose outcome was unknown, or a follower
        that fell further behind than the table keeps) empties the ring, so a subscriber behind it
        gets a fresh snapshot rather than a stream with a hole."""
        if event_id <= self.last_id:
            return None
        if event_id != self.last_id + 1:
            self.events.clear()
        self.last_id = event_id
        encoded = frame(event_id, type_, data)
        event = Event(event_id, type_, data, encoded, http_chunk(encoded))
        self.events.append(event)
        self.terminal = event.terminal  # a retried job's stream carries events again
        self.last_used = time.monotonic()
        for sink in tuple(self.sinks):
            try:
                sink.offer(event)
            except Exception:  # a broken socket must not break the publisher
                sink.notify()  # its own task meets the error and ends the stream
        self.wake()
        return event

    def close_streams(self, type_: str, data: str) -> None:
        """Ask every subscriber to reconnect. Each gets the frame once it has caught up, with the id
        of the last event it got (it is no event of the job: the Last-Event-ID it reconnects with
        must stay that of the last event it really has)."""
        self.closing = (type_, data)
        for sink in tuple(self.sinks):
            sink.notify()
        self.wake()

    def since(self, last_id: int) -> list[Event] | None:
        """Events after `last_id`, or None when some were already dropped from the ring."""
        if last_id > self.last_id:
            return None  # an id this topic has not seen (the table may have it: the stream handler asks)
        if last_id == self.last_id:
            return []
        missing = self.last_id - last_id
        if missing > len(self.events):
            return None
        # Ids are consecutive, so the missing events are the last `missing` ones; indexing a deque
        # near its end is O(1), which matters when 5,000 up-to-date subscribers each take one event.
        return [self.events[-i] for i in range(missing, 0, -1)]

    async def wait_after(self, last_id: int) -> list[Event] | None:
        """Wait until there is something after `last_id`, or the next heartbeat (then: []).

        No timer per subscriber: all of a topic's subscribers sleep on one future, which an event or
        the broadcaster's heartbeat resolves.
        """
        if self.last_id == last_id:
            await asyncio.shield(self.next_event())
        return self.since(last_id)

    def next_event(self) -> asyncio.Future[None]:
        """The future the next event (or heartbeat) resolves; shared by all waiting subscribers."""
        if self._wakeup is None or self._wakeup.done():
            self._wakeup = asyncio.get_running_loop().create_future()
        return self._wakeup

    def wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        self._wakeup = None


class Broadcaster:
    """Topics by job id.

    Only jobs somebody watches have a topic: a new subscriber starts from a snapshot (or a replay
    from the table), so events of unwatched jobs are kept by nobody here. `published` holds, for
    the jobs this process writes events of, the last id committed and published, so that a topic
    opened while an event is being written starts before it (the job in memory already counts it).
    """

    def __init__(self, *, buffer_size: int = 256, idle_seconds: float = 600) -> None:
        self.buffer_size = buffer_size
        self.idle_seconds = idle_seconds
        self.topics: dict[str, Topic] = {}
        self.published: dict[str, int] = {}

    def topic(self, job_id: str, last_id: int = 0) -> Topic:
        """The job's topic; a new one starts after `last_id` (the job's last event id as read), or
        after the last event published here when this process writes the job's events."""
        topic = self.topics.get(job_id)
        if topic is None:
            topic = self.topics[job_id] = self._new_topic(self.published.get(job_id, last_id))
        return topic

    def _new_topic(self, last_id: int) -> Topic:
        return Topic(self.buffer_size, last_id)

    def writing(self, job_id: str, committed: int) -> None:
        """This process is about to write an event of the job after `committed`."""
        self.published.setdefault(job_id, committed)

    def publish(self, rows: Iterable[EventRow]) -> None:
        """Events stored in `job_events` (committed), in order: to the job's topic if it has one."""
        for row in rows:
            if row.job_id in self.published:
                if row.type in TERMINAL_STATUSES:
                    del self.published[row.job_id]  # nothing is being written for it now
                else:
                    self.published[row.job_id] = max(row.seq, self.published[row.job_id])
            topic = self.topics.get(row.job_id)
            if topic is not None:
                topic.put(row.seq, row.type, row.data)

    def cursor(self, job_id: str) -> int | None:
        """The last event id the job's topic has (None: no topic); where a table read resumes."""
        topic = self.topics.get(job_id)
        return topic.last_id if topic is not None else None

    def announce_shutdown(self, data: str) -> None:
        """Tell every open stream to reconnect (to another instance) before the process exits."""
        for topic in self.topics.values():
            if topic.subscribers and not topic.terminal:
                topic.close_streams("reconnect", data)

    def heartbeat(self) -> None:
        """A keep-alive comment to every subscriber (one timer for all of them)."""
        for topic in self.topics.values():
            for sink in tuple(topic.sinks):
                sink.beat()
            topic.wake()

    def reap(self) -> None:
        """Wake the task of every subscriber whose client has gone (its socket is closing), so its
        stream ends now, not at the next event or heartbeat."""
        for topic in self.topics.values():
            for sink in tuple(topic.sinks):
                if sink.transport.is_closing():
                    sink.notify()

    def prune(self) -> int:
        """Forget unwatched topics after `idle_seconds`; returns how many were dropped.

        A finished job's topic is kept that long so a reconnecting client that has the terminal
        event gets 204; an unfinished job's topic is dropped too (nobody is watching it, and a new
        subscriber starts from a snapshot), so no topic outlives its audience by more than that.
        """
        cutoff = time.monotonic() - self.idle_seconds
        stale = [k for k, t in self.topics.items() if not t.subscribers and t.last_used < cutoff]
        for key in stale:
            del self.topics[key]
        return len(stale)
