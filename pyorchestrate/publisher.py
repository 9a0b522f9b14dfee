"""Agents publishing onto the cluster's bus: custom events (``self.publish``) and log records.

One :class:`BusOutbox` per worker process holds the events of every agent it runs; the worker's
loop, the only thread that owns the bus socket, sends them in batches bounded by count and bytes,
a slice per turn.  Each running agent gets an :class:`AgentBus`: it numbers and packs an event and
hands it off, into the outbox (thread agents) or over the pipe to the worker (process agents).
No per-agent thread, no per-agent socket, and an agent's exit never waits on the network: its
TERMINATED report carries the last ``seq`` it handed off, and the coordinator (not the agent)
waits for that.

The outbox is bounded: past its limit the oldest events go, counted, and still numbered, so the
coordinator sees the gap and reports it as ``EVENTS_LOST``.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable

import msgpack

from . import protocol
from .events import stamp

MAX_BUFFER = 200_000  # events a worker holds for the bus (beyond: the oldest go, counted)
MAX_BUFFER_BYTES = 256 * 1024 * 1024
BATCH_ITEMS = 2000
BATCH_BYTES = 1024 * 1024
#: the largest event an agent may publish; a batch carries at least one, so every frame stays
#: under the coordinator's default max_message_size (a bigger frame would cost the connection)
MAX_EVENT_BYTES = protocol.DEFAULT_MAX_MESSAGE_SIZE // 4
#: the most of a log line an AGENT_LOG carries (characters, at most 4 bytes each): it fits in a
#: frame under the smallest max_message_size a coordinator accepts (4 MiB) with room to spare
MAX_LOG_CHARS = 64 * 1024

#: (publisher, incarnation, topic, seq, body): one event on its way to the coordinator
Item = tuple[str, str, str, int, bytes]


class BusOutbox:
    """The events of every agent of one worker process, waiting for the worker's loop."""

    def __init__(self, wake: Callable[[], None] | None = None, max_items: int = MAX_BUFFER,
                 max_bytes: int = MAX_BUFFER_BYTES) -> None:
        self._items: collections.deque[Item] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._wake = wake
        self._max_items = max_items
        self._max_bytes = max_bytes
        #: events discarded because the outbox was full (their seqs are a gap the coordinator sees)
        self.dropped = 0

    def put(self, item: Item) -> None:
        """Queue one event (any thread; never blocks on the network)."""
        with self._lock:
            was_empty = not self._items
            self._items.append(item)
            self._bytes += len(item[4])
            while len(self._items) > self._max_items or self._bytes > self._max_bytes:
                old = self._items.popleft()
                self._bytes -= len(old[4])
                self.dropped += 1
        if was_empty and self._wake is not None:
            self._wake()  # one wake per batch: the owner takes everything it finds

    def take(self, max_items: int = BATCH_ITEMS, max_bytes: int = BATCH_BYTES) -> list[Item]:
        """Up to one batch (at least one event if any is waiting), oldest first."""
        batch: list[Item] = []
        size = 0
        with self._lock:
            while self._items and len(batch) < max_items and (not batch or size + len(self._items[0][4]) <= max_bytes):
                item = self._items.popleft()
                size += len(item[4])
                batch.append(item)
            self._bytes -= size
        return batch

    def __len__(self) -> int:
        return len(self._items)


class AgentBus:
    """One agent run's numbered stream of events; ``sink`` takes each packed event."""

    def __init__(self, sink: Callable[[Item], None], publisher: str, incarnation: str, base: dict[str, Any]) -> None:
        self.publisher = publisher
        # the run's identity (coordinator incarnation.epoch): the coordinator forwards only what
        # the current run of an agent publishes, never a stale copy's events
        self.incarnation = incarnation
        self._sink = sink
        self.base = base
        self._seq = 0
        self._lock = threading.Lock()

    def publish(self, event: str, subject: str, fields: dict[str, Any]) -> None:
        """Number, pack and hand off one event (thread-safe, non-blocking).  Raises ValueError
        for an event larger than :data:`MAX_EVENT_BYTES` (nothing is numbered for it)."""
        with self._lock:
            seq = self._seq + 1
            # packed here, once: the coordinator forwards the bytes as they are
            body = msgpack.packb({**self.base, **fields, **stamp(), "event": event, "seq": seq,
                                  "publisher": self.publisher, "incarnation": self.incarnation},
                                 use_bin_type=True, default=repr)
            if len(body) > MAX_EVENT_BYTES:
                raise ValueError(f"{event} of {len(body):,} bytes is over the bus limit of {MAX_EVENT_BYTES:,} bytes "
                                 "per event: publish a reference (a path, a URL, a key) instead of the data")
            self._seq = seq
            self._sink((self.publisher, self.incarnation, protocol.event_topic(event, subject), seq, body))

    @property
    def seq(self) -> int:
        return self._seq

    def flush(self) -> dict[str, Any]:
        """The marker the coordinator waits for: this run's publisher, incarnation and last
        ``seq`` (nothing if it never published).  Returns at once."""
        if not self._seq:
            return {}
        return {"bus_publisher": self.publisher, "bus_incarnation": self.incarnation, "bus_seq": self._seq}


_HANDLERS_LOCK = threading.Lock()  # agents' loggers' handler lists (see hook_logger)
_OPEN_LOCK = threading.Lock()  # an agent's bus is opened once, whichever of its threads is first


class BusLogHandler:
    """Turns an agent's log records into AGENT_LOG events on its bus (opened by the first).

    A handler as the logger calls one (``level``, ``handle(record)``), not a ``logging.Handler``:
    making one of those registers it in logging's module-wide handler list and makes it a lock,
    under logging's one global lock, and a worker makes one per agent run while its loop takes
    the same lock for the next agent's logger (S3: 14 us a wait for it on the worker's loop)."""

    def __init__(self, agent: Any, level: int = logging.DEBUG) -> None:
        self.level = level
        self._agent = agent

    def handle(self, record: logging.LogRecord) -> bool:
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            bus = open_bus(self._agent)
            if bus is None:  # the run is over (detached): nothing to publish on
                return
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            name = bus.base["agent_name"]
            bus.publish("AGENT_LOG", name, {
                "agent_name": name, "level": record.levelname, "levelno": record.levelno,
                "logger": record.name, "message": protocol.cut_text(message, MAX_LOG_CHARS)})
        except Exception:
            logging.Handler.handleError(logging.Handler(), record)  # printed as logging does, once


def attach(agent: Any, sink: Callable[[Item], None] | None, worker: str, host: str, run: str) -> None:
    """Put a running agent on the bus: what it publishes and logs goes there.  ``run`` is the
    run's tag (``incarnation.epoch``): the publisher's incarnation on the bus.

    Lazily: the run's :class:`AgentBus` is made by the first event or log record, and its log
    handler joins the agent's logger when the logger is made (``BaseAgent.logger``), so an agent
    that never logs nor publishes (most short ones) costs neither a logger nor a bus (making the
    logger takes logging's global lock, which the worker's loop takes too)."""
    if sink is None:
        return
    agent._bus_args = (sink, f"{worker}/{agent.name}", run, {"agent_name": agent.name, "worker": worker, "host": host})
    if agent.__dict__.get("_logger") is not None:  # made already (say, in the agent's __init__)
        hook_logger(agent)


def open_bus(agent: Any) -> AgentBus | None:
    """The agent's bus for this run (made on first use), or None if it runs standalone."""
    bus = agent._bus
    if bus is None and agent._bus_args is not None:
        with _OPEN_LOCK:  # two threads of one agent publishing at once make one bus, not two
            bus = agent._bus
            args = agent._bus_args
            if bus is None and args is not None:
                bus = agent._bus = AgentBus(*args)
    return bus


def hook_logger(agent: Any) -> None:
    """Send the agent's log records to its bus too (its logger exists and it is attached)."""
    logger = agent.logger
    # a new list under a lock of our own, not addHandler(), which takes logging's global lock (see
    # BusLogHandler); a lock still, as two copies of one agent (one stopping, one starting) share
    # a logger and attach and detach from their own threads, and two threads of one agent may
    # make its logger at once (one handler, not two)
    with _HANDLERS_LOCK:
        if agent._bus_args is None or agent.__dict__.get("_bus_log_handler") is not None:
            return
        handler = agent._bus_log_handler = BusLogHandler(agent)
        logger.handlers = [*logger.handlers, handler]


def detach(agent: Any) -> None:
    """Undo :func:`attach` (nothing to wait for: the events are already handed off), and drop the
    run's logger from logging's registry, which would otherwise keep one per agent name the
    process ever ran (agents with unique names grew it without bound)."""
    with _OPEN_LOCK:  # a thread of the agent's still publishing opens no bus after this
        agent._bus_args = None
        agent._bus = None
    logger = agent.__dict__.get("_logger")
    if logger is None and agent.__dict__.get("_bus_log_handler") is None:
        return  # it never logged (most short runs): no handler to take off, no logger to drop
    with _HANDLERS_LOCK:  # see hook_logger
        handler = agent.__dict__.get("_bus_log_handler")
        if handler is not None and logger is not None:
            logger.handlers = [h for h in logger.handlers if h is not handler]
        agent._bus_log_handler = None
    if logger is not None:
        registry = logging.Logger.manager.loggerDict
        if registry.get(logger.name) is logger and not logger.handlers:
            registry.pop(logger.name, None)


def check_publishable(topic: str, data: dict[str, Any]) -> None:
    """Raise a clear TypeError for data that cannot travel as msgpack."""
    if not isinstance(topic, str) or not topic or any(c.isspace() for c in topic):
        raise TypeError(f"publish: topic {topic!r} must be a non-empty string without spaces")
    for key, value in data.items():
        protocol.pack_plain(value, f"publish({topic!r}): field {key!r} ({type(value).__name__}) cannot be sent")
