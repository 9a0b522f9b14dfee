"""Subscribing to a cluster's event bus from any process or host (read-only).

The bus is lossless as far as the coordinator's history reaches.  Every event the coordinator
publishes carries its run's seq; a subscriber of the whole stream that sees a gap, or a heartbeat
announcing events it never got (a lost tail), asks the coordinator for the missing range, holds
what arrives live meanwhile, and delivers everything in order.  Only what history no longer holds
is reported, as one ``EVENTS_LOST`` event with the exact count.  A coordinator run that started
after this subscriber (a slow joiner: its first events went out before our subscription
arrived), or any run after the first one we saw (scripts that come and go), is delivered whole,
from seq 1.  A subscriber with a topic filter cannot tell a lost event from a filtered one, so it
does not check (``gap_detection`` is False).
"""

from __future__ import annotations

import collections
import time
import uuid

import msgpack
from typing import Any, Iterator

import zmq

from . import curve, protocol, sockets
from .timeouts import until_done_if_past_max

_HEARTBEAT = "_HEARTBEAT"
_HELLO = protocol.HELLO_TOPIC.encode()
RANGE_TIMEOUT = 2.0  # seconds to wait for one slice of a range before asking again
RANGE_TRIES = 3  # asks per slice before its events are reported lost
_CLOCK_SKEW = 1.0  # a run that started this long before us still counts as "after" (clocks differ)
#: seconds live events wait for the history answer (it goes first) before they are handed out
#: anyway: the coordinator answers at once, so only a coordinator that is gone takes this long
HISTORY_WAIT = 5.0
#: events an agent copy numbers itself (its bus events), checked across coordinator runs
_COPY_EVENTS = frozenset({"AGENT_EVENT", "AGENT_LOG"})
#: agent copies whose numbers are followed at most (one entry each, dropped at its end)
MAX_COPIES = 100_000


class Event(dict):
    """One event: a dict that also allows attribute access (``ev.event``, ``ev.agent_name``).
    ``coordinator_seq`` is its number in its coordinator run's stream (None where unknown)."""

    coordinator_seq: int | None = None

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def subject(self) -> str:
        """The agent or worker the event is about."""
        return str(self.get("agent_name") or self.get("worker") or self.get("source") or self.get("publisher") or "")


def _check_subscriptions(topics: list[str] | tuple[str, ...], history: bool) -> None:
    """Raise ValueError, saying what to do, for topics the coordinator's events port would refuse
    (protocol.TOPIC_MAX): it closes the connection, and the subscriber waited for ever, connecting
    and subscribing again, told nothing."""
    if isinstance(topics, str):  # topics="AGENT_": each character would be a prefix of its own
        raise TypeError(f"topics must be a list of prefixes, e.g. [{topics!r}]")
    most = protocol.TOPIC_MAX
    for topic in topics:
        if len(topic.encode()) > most:
            raise ValueError(f"topic {topic[:40]!r}... is {len(topic.encode()):,} bytes; the events port takes "
                             f"subscriptions of at most {most:,}: subscribe to a shorter prefix of it")
    if history and "" not in topics:
        size = len(protocol.history_request(uuid.uuid4().hex, list(topics)).encode())
        if size > most:
            raise ValueError(f"history=True asks for the history of all {len(topics)} topics in one subscription of "
                             f"{size:,} bytes; the events port takes at most {most:,}: subscribe to fewer or shorter "
                             "prefixes (a common prefix of them, filtering what arrives), or without history")


class EventSubscriber:
    """Iterate over a cluster's events::

        with EventSubscriber("tcp://host:5556", topics=["AGENT_"], timeout=10) as events:
            for ev in events:
                print(ev.event, ev.subject)

    Iteration ends when no event arrives for ``timeout`` seconds (None: never).  ``topics`` are
    prefixes of ``EVENT.<agent or worker>``.
    """

    def __init__(self, address: str, topics: list[str] | tuple[str, ...] = ("",), *, timeout: float | None = None,
                 history: bool = False, hwm: int = sockets.HWM, keys: Any = None, key_name: str | None = None) -> None:
        sockets.parse_tcp(address)
        _check_subscriptions(topics, history)
        # with keys: CurveZMQ, a reader key (or admin, or worker) from the directory ``keys`` (or
        # $PYORCHESTRATE_KEYS); the coordinator must hold the secret of DIR/coordinator.key
        self._keydir, self.key = curve.client_key(keys, ("reader", "admin", "worker"), key_name)
        self._failure: str | None = None
        self.address = address
        self.timeout = timeout
        #: events reported lost (history no longer held them), and events recovered from history
        self.lost = 0
        self.recovered = 0
        self.dropped = 0
        #: why the coordinator refused the history asked for (``history=True``), or None
        self.history_refused: str | None = None
        self._whole_stream = "" in topics
        #: whether gaps can be detected (only on the unfiltered stream)
        self.gap_detection = self._whole_stream
        self._created = time.time()
        self._want_history = history
        self._next: dict[str, int] = {}  # coordinator run -> the seq expected next
        #: an agent copy's bus publisher ("worker/agent") -> (its run, the coordinator run that
        #: delivered its last event, that event's seq in the copy's own numbering): see _deliver
        self._copies: dict[str, tuple[str, str, int]] = {}
        self._pending: collections.deque[Event] = collections.deque()
        # while a range is being recovered: what arrives live waits here, in order
        self._held: collections.deque[tuple[str, int, bool, float, Event]] = collections.deque()
        self._range: dict[str, Any] | None = None
        self._connected = False
        self._ctx = zmq.Context()
        self._sub = sockets.make_socket(self._ctx, zmq.SUB, max_message_size=protocol.DEFAULT_MAX_MESSAGE_SIZE)
        self._sub.setsockopt(zmq.RCVHWM, hwm)
        for topic in topics:
            self._sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        if not self._whole_stream:
            self._sub.setsockopt_string(zmq.SUBSCRIBE, _HEARTBEAT)
        self._history_topic: bytes | None = None
        self._live_keys: set[tuple] | None = None
        if history and not self._whole_stream:
            # after the live subscriptions, so nothing falls between history and the live stream
            self._history_topic = protocol.history_request(uuid.uuid4().hex, list(topics)).encode()
            self._sub.setsockopt(zmq.SUBSCRIBE, self._history_topic)
            self._live_keys = set()
        self._history_deadline = time.monotonic() + HISTORY_WAIT
        # last: its answer comes after every subscription above is in place (``connected``)
        self._hello_topic: bytes | None = protocol.hello_request(uuid.uuid4().hex).encode()
        self._sub.setsockopt(zmq.SUBSCRIBE, self._hello_topic)
        if self.key is not None:
            curve.connect_as(self._sub, self.key)
        self._watch = curve.HandshakeWatch(self._sub, address, self.key, self._keydir, expect="events port")
        sockets.connect(self._sub, address)

    @property
    def connected(self) -> bool:
        """Has the coordinator answered (its heartbeat, or its answer to the hello this
        subscriber sends at once)?  From then on nothing is missed."""
        return self._connected

    def handshake_failure(self) -> str | None:
        """Why the coordinator and this subscriber could not agree on keys, if that happened
        (unknown or revoked key, another coordinator, keys on one side only)."""
        if self._watch is not None and not self._watch.succeeded:
            self._failure = self._watch.failure() or self._failure
        return self._failure

    def wait_connected(self, timeout: float | None) -> bool:
        """Wait until the coordinator answers (``connected``): from then on nothing is missed.
        Usually milliseconds; a coordinator that does not answer hellos is heard at its next
        heartbeat."""
        timeout = until_done_if_past_max(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._connected:
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not self._receive_one(remaining):
                return self._connected
        return True

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (None: wait forever).  With
        ``history=True`` and a topic filter, history comes first: live events wait for its answer
        (for up to :data:`HISTORY_WAIT` seconds)."""
        timeout = until_done_if_past_max(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._pending:  # held for the history answer: wake when they may go anyway
                left = max(0.0, self._history_deadline - time.monotonic())
                remaining = left if remaining is None else min(remaining, left)
            if not self._receive_one(remaining) and deadline is not None and time.monotonic() >= deadline:
                return None
        return self._pending.popleft()

    def _ready(self) -> bool:
        """May the next event be handed out?  Not a live one while the history answer, which goes
        before it, is on its way (a reader called fast enough got live events first, then
        older ones from history)."""
        if not self._pending:
            return False
        return self._history_topic is None or time.monotonic() >= self._history_deadline

    def drain(self) -> list[Event]:
        """Every event already waiting, without blocking."""
        events = []
        while (ev := self.recv(timeout=0)) is not None:
            events.append(ev)
        return events

    def _receive_one(self, timeout: float | None) -> bool:
        if self._range is not None:
            # waiting for history: wake in time to ask again
            left = max(0.0, self._range["deadline"] - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        got = self._sub.poll(None if timeout is None else int(timeout * 1000))
        timed_out = self._range is not None and time.monotonic() >= self._range["deadline"]
        if timed_out:
            self._range_timed_out()
        if not got:
            return timed_out
        frames = self._sub.recv_multipart()
        head = frames[0]
        if head.startswith(protocol.RANGE_TOPIC.encode()):
            if self._range is not None and head == self._range["topic"]:
                self._take_range(frames)
            return True  # another subscriber's answer: not for us
        if head.startswith(_HELLO):
            if head == self._hello_topic:
                self._hello_answered()
                self._take_hello(frames)
            return True
        if head.startswith(protocol.HISTORY_TOPIC.encode()):
            if head == self._history_topic:
                self._take_history(frames)
            return True
        try:
            fields = protocol.decode_event(frames)
            stamp = protocol.decode_stamp(frames[2]) if len(frames) == 3 else None
        except protocol.ProtocolError:
            self.dropped += 1
            return True
        if not self._connected:
            self._hello_answered()
        event = Event(fields)
        if stamp is None or not self._whole_stream:
            if fields["event"] != _HEARTBEAT:
                if self._live_keys is not None:
                    self._live_keys.add(((fields["publisher"], fields["incarnation"]), fields["seq"]))
                self._pending.append(event)
            return True
        self._place(*stamp, event)
        return True

    def _hello_answered(self) -> None:
        self._connected = True
        if self._hello_topic is not None:
            self._sub.setsockopt(zmq.UNSUBSCRIBE, self._hello_topic)
            self._hello_topic = None

    def _take_hello(self, frames: list[bytes]) -> None:
        """The answer is a heartbeat: the coordinator's run and last seq (what came before us
        is recovered now, while history still holds it)."""
        if not self._whole_stream:
            return
        try:
            if len(frames) != 3:
                raise protocol.ProtocolError("hello answer of wrong shape")
            session, seq, _, started = protocol.decode_stamp(frames[2])
        except protocol.ProtocolError:
            self.dropped += 1
            return
        self._place(session, seq, False, started, Event({"event": _HEARTBEAT}))

    # ---------------------------------------------------------------- order and recovery

    def _place(self, session: str, seq: int, numbered: bool, started: float, event: Event) -> None:
        """Deliver one live event in order, or hold it while a missing range is recovered."""
        if self._range is not None:
            self._held.append((session, seq, numbered, started, event))
            return
        expected = self._next.get(session)
        if expected is None:
            # a run we have not heard: whole if it began after us (or after another run), or if
            # history was asked for; otherwise from now on
            whole = self._want_history or bool(self._next) or started >= self._created - _CLOCK_SKEW
            expected = 1 if whole else (seq if numbered else seq + 1)
            self._next[session] = expected
        last_wanted = seq - 1 if numbered else seq  # a heartbeat carries the last seq sent
        if last_wanted >= expected:
            self._ask(session, expected, last_wanted)
            self._held.append((session, seq, numbered, started, event))
            return
        if numbered:
            if seq < expected:
                return  # already delivered (it came from history)
            self._next[session] = seq + 1
            event.coordinator_seq = seq
        if event.get("event") != _HEARTBEAT:
            self._deliver(session, event)

    def _ask(self, session: str, first: int, last: int, tries: int = 1) -> None:
        topic = protocol.range_request(uuid.uuid4().hex, session, first, last).encode()
        self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._range = {"topic": topic, "session": session, "first": first, "last": last, "tries": tries,
                       "deadline": time.monotonic() + RANGE_TIMEOUT}

    def _end_request(self) -> dict[str, Any]:
        assert self._range is not None
        wanted, self._range = self._range, None
        self._sub.setsockopt(zmq.UNSUBSCRIBE, wanted["topic"])
        return wanted

    def _range_timed_out(self) -> None:
        wanted = self._end_request()
        if wanted["tries"] < RANGE_TRIES:
            self._ask(wanted["session"], wanted["first"], wanted["last"], wanted["tries"] + 1)
            return
        # nobody answers (the coordinator is gone): what we asked for is lost
        self._lost(wanted["session"], wanted["last"] - wanted["first"] + 1)
        self._next[wanted["session"]] = wanted["last"] + 1
        self._release_held()

    def _take_range(self, frames: list[bytes]) -> None:
        wanted = self._end_request()
        session, first, last = wanted["session"], wanted["first"], wanted["last"]
        try:
            if len(frames) != 2:
                raise protocol.ProtocolError("range reply of wrong shape")
            reply = protocol.decode_range_reply(frames[1])
            covered, past = last, []  # refused: all of it is lost
            if not reply["refused"]:
                covered = min(max(reply["covered"], first - 1), last)
                past = [(s, protocol.decode_body(t, b)) for s, t, b in reply["items"] if first <= s <= covered]
        except protocol.ProtocolError:
            self.dropped += 1
            self._range = {**wanted, "deadline": 0.0}  # a bad answer is no answer: the timeout path decides
            self._sub.setsockopt(zmq.SUBSCRIBE, wanted["topic"])
            return
        expected = first
        for seq, fields in past:
            if seq > expected:
                self._lost(session, seq - expected)
            if seq >= expected:
                self.recovered += 1
                event = Event(fields)
                event.coordinator_seq = seq
                self._deliver(session, event)
                expected = seq + 1
        if covered >= expected:
            self._lost(session, covered - expected + 1)
        self._next[session] = covered + 1
        if covered < last:
            self._ask(session, covered + 1, last)  # the next slice
            return
        self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, collections.deque()
        while held:
            self._place(*held.popleft())
            if self._range is not None:  # another gap among them: hold the rest again
                self._held.extend(held)
                return

    def _deliver(self, session: str, event: Event) -> None:
        """Hand out one event of the whole stream, in order, after counting what its agent copy
        sent that no coordinator run delivered.

        Within one coordinator run, a gap in a copy's own numbers is the coordinator's to count
        (it publishes EVENTS_LOST).  Across runs nobody else can: a coordinator started again
        adopts the copy, and what it sent meanwhile (bus frames that reached the new coordinator
        before its worker registered, or were in flight when the old one was killed) or what the
        old one published and never announced (its send queue at a SIGKILL) was seen by neither
        coordinator as lost.  This subscriber saw both runs, so it knows: the copy's next event
        in the new run has a number past the last one delivered in the old."""
        publisher = event.get("publisher")
        if isinstance(publisher, str) and "/" in publisher and event.get("event") in _COPY_EVENTS:
            run, seq = event.get("incarnation"), event.get("seq")
            if isinstance(run, str) and isinstance(seq, int):
                known = self._copies.get(publisher)
                if known is not None and known[0] == run:
                    if known[1] != session and seq > known[2] + 1:
                        self._report_gap(publisher, seq - known[2] - 1)
                    if seq > known[2]:
                        self._copies[publisher] = (run, session, seq)
                else:
                    self._copies.pop(publisher, None)  # its previous run, if any: this one goes last
                    if len(self._copies) >= MAX_COPIES:  # ends not seen (lost, or before we came): oldest out
                        del self._copies[next(iter(self._copies))]
                    self._copies[publisher] = (run, session, seq)
        elif event.get("event") == "AGENT_TERMINATED":
            # its run's tail came before its end (the coordinator holds the end for it): done
            self._copies.pop(f"{event.get('worker')}/{event.get('agent_name')}", None)
        self._pending.append(event)

    def _lost(self, session: str, lost: int) -> None:
        """``lost`` events of coordinator run ``session`` that history no longer held."""
        if lost > 0:
            self._report_gap(f"coordinator run {session}", lost)

    def _take_history(self, frames: list[bytes]) -> None:
        """Recent events, older than anything live: put them first, minus any already seen live."""
        assert self._history_topic is not None
        self._sub.setsockopt(zmq.UNSUBSCRIBE, self._history_topic)
        self._history_topic = None
        seen, self._live_keys = self._live_keys or set(), None
        if len(frames) == 3:  # refused: live events only
            self.history_refused = frames[2].decode(errors="replace")
            return
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
            self._watch.close()
            self._sub.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> "EventSubscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
