"""Subscribing to a cluster's event bus from any process or host (read-only).

Gaps in a publisher's sequence numbers are reported as synthetic ``EVENTS_LOST`` events, so a
slow subscriber learns that it missed something instead of missing it silently.  The coordinator's
bus heartbeat carries its latest ``seq``, so even a lost *last* event is noticed.  The check needs
the whole stream: a subscriber with a topic filter cannot tell a lost event from a filtered one,
so it does not check (``gap_detection`` is False).
"""

from __future__ import annotations

import collections
import time
import uuid

import msgpack
from typing import Any, Iterator

import zmq

from . import protocol, sockets

_HEARTBEAT = "_HEARTBEAT"


class Event(dict):
    """One event: a dict that also allows attribute access (``ev.event``, ``ev.agent_name``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def subject(self) -> str:
        """The agent or worker the event is about."""
        return str(self.get("agent_name") or self.get("worker") or self.get("source") or self.get("publisher") or "")


class EventSubscriber:
    """Iterate over a cluster's events::

        with EventSubscriber("tcp://host:5556", topics=["AGENT_"], timeout=10) as events:
            for ev in events:
                print(ev.event, ev.subject)

    Iteration ends when no event arrives for ``timeout`` seconds (None: never).  ``topics`` are
    prefixes of ``EVENT.<agent or worker>``.
    """

    def __init__(self, address: str, topics: list[str] | tuple[str, ...] = ("",), *, timeout: float | None = None,
                 history: bool = False) -> None:
        sockets.parse_tcp(address)
        self.address = address
        self.timeout = timeout
        self.lost = 0
        self.dropped = 0
        self._whole_stream = "" in topics
        #: whether gaps can be detected (only on the unfiltered stream)
        self.gap_detection = self._whole_stream
        self._last: dict[tuple[str, str], int] = {}
        self._pending: collections.deque[Event] = collections.deque()
        self._connected = False
        self._ctx = zmq.Context()
        self._sub = sockets.make_socket(self._ctx, zmq.SUB, max_message_size=protocol.DEFAULT_MAX_MESSAGE_SIZE)
        for topic in topics:
            self._sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        if not self._whole_stream:
            self._sub.setsockopt_string(zmq.SUBSCRIBE, _HEARTBEAT)
        self._history_topic: bytes | None = None
        self._live_keys: set[tuple] | None = None
        if history:
            # after the live subscriptions, so nothing falls between history and the live stream
            self._history_topic = protocol.history_request(uuid.uuid4().hex, list(topics)).encode()
            self._sub.setsockopt(zmq.SUBSCRIBE, self._history_topic)
            self._live_keys = set()
        self._sub.connect(address)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the coordinator's heartbeat arrives: from then on nothing is missed."""
        deadline = time.monotonic() + timeout
        while not self._connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._receive_one(remaining):
                return self._connected
        return True

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._receive_one(remaining) and deadline is not None and time.monotonic() >= deadline:
                return None
        return self._pending.popleft()

    def drain(self) -> list[Event]:
        """Every event already waiting, without blocking."""
        events = []
        while (ev := self.recv(timeout=0)) is not None:
            events.append(ev)
        return events

    def _receive_one(self, timeout: float | None) -> bool:
        if not self._sub.poll(None if timeout is None else int(timeout * 1000)):
            return False
        frames = self._sub.recv_multipart()
        if frames[0].startswith(protocol.HISTORY_TOPIC.encode()):
            if frames[0] == self._history_topic:
                self._take_history(frames)
            return True  # another subscriber's history reply: not for us
        try:
            fields = protocol.decode_event(frames)
        except protocol.ProtocolError:
            self.dropped += 1
            return True
        self._connected = True
        key = (fields["publisher"], fields["incarnation"])
        seq = fields["seq"]
        last = self._last.get(key)
        is_beat = fields["event"] == _HEARTBEAT
        if last is not None and self._whole_stream:
            expected = last if is_beat else last + 1
            if seq > expected:
                self._report_gap(fields["publisher"], seq - expected)
        if last is None or seq > last:
            self._last[key] = seq
        if not is_beat:
            if self._live_keys is not None:
                self._live_keys.add((key, seq))
            self._pending.append(Event(fields))
        return True

    def _take_history(self, frames: list[bytes]) -> None:
        """Recent events, older than anything live: put them first, minus any already seen live."""
        assert self._history_topic is not None
        self._sub.setsockopt(zmq.UNSUBSCRIBE, self._history_topic)
        self._history_topic = None
        seen, self._live_keys = self._live_keys or set(), None
        try:
            items = msgpack.unpackb(frames[1], raw=False) if len(frames) == 2 else None
            past = [protocol.decode_body(t, b) for t, b in items]  # type: ignore[union-attr]
        except (protocol.ProtocolError, TypeError, ValueError, msgpack.UnpackException):
            self.dropped += 1
            return
        old = [Event(f) for f in past if ((f["publisher"], f["incarnation"]), f["seq"]) not in seen]
        self._pending.extendleft(reversed(old))

    def _report_gap(self, publisher: str, lost: int) -> None:
        self.lost += lost
        self._pending.append(Event({"event": "EVENTS_LOST", "lost": lost, "source": publisher, "seq": -1}))

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.recv(self.timeout)
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        if not self._sub.closed:
            self._sub.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> "EventSubscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
