"""In-memory fan-out of job events to Server-Sent-Events subscribers.

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
from collections.abc import Callable
from dataclasses import dataclass

from klipstream.models import TERMINAL_STATUSES
from klipstream.sse import HEARTBEAT_CHUNK, frame, http_chunk

PROGRESS_SECONDS_PER_SUBSCRIBER = 0.0002


@dataclass(slots=True, frozen=True)
class Event:
    id: int
    type: str  # snapshot | progress | stage | completed | failed | cancelled | reconnect
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

    def __init__(self, buffer_size: int) -> None:
        self.events: deque[Event] = deque(maxlen=buffer_size)
        self.last_id = 0
        self.subscribers = 0
        self.sinks: set[Sink] = set()
        self.terminal = False
        self.last_used = time.monotonic()
        self._wakeup: asyncio.Future[None] | None = None
        self._pending_progress: Callable[[], str] | None = None
        self._progress_handle: asyncio.TimerHandle | None = None
        self._last_progress_at = 0.0

    def append(self, type_: str, data: str) -> Event:
        self.last_id += 1
        encoded = frame(self.last_id, type_, data)
        event = Event(self.last_id, type_, data, encoded, http_chunk(encoded))
        self.events.append(event)
        if event.terminal:
            self.terminal = True
        self.last_used = time.monotonic()
        for sink in tuple(self.sinks):
            try:
                sink.offer(event)
            except Exception:  # a broken socket must not break the publisher
                sink.notify()  # its own task meets the error and ends the stream
        self.wake()
        return event

    def since(self, last_id: int) -> list[Event] | None:
        """Events after `last_id`, or None when some were already dropped from the ring."""
        if last_id > self.last_id:
            return None  # an id from an earlier process or another instance
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
    """Topics by job id, with progress coalescing."""

    def __init__(self, *, buffer_size: int = 256, progress_interval: float = 0.25, idle_seconds: float = 600) -> None:
        self.buffer_size = buffer_size
        self.progress_interval = progress_interval
        self.idle_seconds = idle_seconds
        self.topics: dict[str, Topic] = {}

    def topic(self, job_id: str) -> Topic:
        topic = self.topics.get(job_id)
        if topic is None:
            topic = self.topics[job_id] = Topic(self.buffer_size)
        return topic

    def publish(self, job_id: str, type_: str, data: Callable[[], str]) -> Event | None:
        """Publish an event that must not be dropped (stage changes, terminal events).

        Only jobs somebody watches have a topic: a client cannot hold a Last-Event-ID of a stream it
        never opened, and a new subscriber starts from a snapshot, so events of unwatched jobs would
        be encoded for nobody.
        """
        topic = self.topics.get(job_id)
        if topic is None:
            return None
        self._flush_progress(job_id, topic)
        return topic.append(type_, data())

    def publish_progress(self, job_id: str, render: Callable[[], str]) -> None:
        """Publish progress at most every `progress_interval`; the latest state wins.

        `render` is called only when an event is actually sent, so a burst of progress reports
        costs one encoding.
        """
        topic = self.topics.get(job_id)
        if topic is None or topic.terminal:
            return
        topic._pending_progress = render
        now = time.monotonic()
        # A fan-out costs one socket write per subscriber; big audiences get progress less often
        # (1/s at 5,000) so stage and terminal events are not queued behind progress.
        interval = max(self.progress_interval, topic.subscribers * PROGRESS_SECONDS_PER_SUBSCRIBER)
        wait = topic._last_progress_at + interval - now
        if wait <= 0:
            self._flush_progress(job_id, topic)
        elif topic._progress_handle is None:
            loop = asyncio.get_running_loop()
            topic._progress_handle = loop.call_later(wait, self._flush_progress, job_id, topic)

    def _flush_progress(self, job_id: str, topic: Topic) -> None:
        if topic._progress_handle is not None:
            topic._progress_handle.cancel()
            topic._progress_handle = None
        render, topic._pending_progress = topic._pending_progress, None
        if render is not None and not topic.terminal:
            topic._last_progress_at = time.monotonic()
            topic.append("progress", render())

    def reopen(self, job_id: str) -> None:
        """A finished job was queued again (retry): its stream carries events again."""
        topic = self.topics.get(job_id)
        if topic is not None:
            topic.terminal = False

    def announce_shutdown(self, data: str) -> None:
        """Tell every open stream to reconnect (to another instance) before the process exits."""
        for job_id, topic in self.topics.items():
            if topic.subscribers and not topic.terminal:
                self._flush_progress(job_id, topic)
                topic.append("reconnect", data)

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
