"""Agents publishing onto the cluster's bus: custom events (``self.publish``) and log records.

Each running agent gets a :class:`BusPublisher`; at its first event it opens its own XPUB socket
into the coordinator's bus input (on the process's shared context), so an agent that never
publishes or logs costs nothing.  ``publish`` only appends to a buffer (microseconds, never blocks on the network); a flusher
thread sends the buffer as one batch frame every few milliseconds, which the coordinator unpacks
and republishes event by event, each under its own topic.  The buffer is bounded: when nobody
drains it fast enough the oldest events are dropped, counted, and still numbered, so subscribers
see the gap.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import Any

import msgpack
import zmq

from . import protocol, sockets
from .events import stamp

FLUSH_INTERVAL = 0.005
MAX_BATCH = 2000
MAX_BUFFER = 100_000


class BusPublisher:
    """Numbered, batched, bounded publishing for one agent."""

    def __init__(self, address: str, publisher: str, base: dict[str, Any], incarnation: str | None = None) -> None:
        self.publisher = publisher
        # the run's identity (coordinator incarnation.epoch) on a worker: the coordinator forwards
        # only what the current run of an agent publishes, never a stale copy's events
        self.incarnation = incarnation or uuid.uuid4().hex
        self.dropped = 0
        self._base = base
        self._seq = 0
        self._buffer: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._address = address
        self._sock: zmq.Socket | None = None
        self._subscribed = False
        self._thread: threading.Thread | None = None

    def _open(self) -> None:
        """Called with the lock held, at the first event."""
        self._sock = sockets.make_socket(zmq.Context.instance(), zmq.XPUB)
        self._sock.connect(self._address)
        self._thread = threading.Thread(target=self._flush_loop, name=f"publish-{self.publisher}", daemon=True)
        self._thread.start()

    def publish(self, event: str, subject: str, fields: dict[str, Any]) -> None:
        """Queue one event (thread-safe, non-blocking)."""
        with self._lock:
            if self._thread is None:
                self._open()
            self._seq += 1
            # packed here, once: the coordinator forwards the bytes as they are
            body = msgpack.packb({**self._base, **fields, **stamp(), "event": event, "seq": self._seq,
                                  "publisher": self.publisher, "incarnation": self.incarnation},
                                 use_bin_type=True, default=repr)
            item = (protocol.event_topic(event, subject), self._seq, body)
            if len(self._buffer) >= MAX_BUFFER:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(item)
            if len(self._buffer) >= MAX_BATCH:
                self._wake.set()

    def _take(self) -> list:
        with self._lock:
            count = min(len(self._buffer), MAX_BATCH)
            return [self._buffer.popleft() for _ in range(count)]

    def _ready(self) -> bool:
        # an XPUB learns when the coordinator's subscription has arrived: nothing is sent before
        assert self._sock is not None
        while self._sock.poll(0):
            frame = self._sock.recv()
            if frame[:1] in (b"\x00", b"\x01"):
                self._subscribed = frame[:1] == b"\x01"
        return self._subscribed

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            closing = self._closing
            while self._buffer and self._ready():
                batch = self._take()
                try:
                    assert self._sock is not None
                    self._sock.send_multipart(protocol.encode_batch(self.publisher, self.incarnation, batch),
                                              zmq.NOBLOCK)
                except zmq.Again:
                    with self._lock:
                        self.dropped += len(batch)
            if closing:
                return

    def flush(self, timeout: float = 2.0) -> dict[str, Any]:
        """Wait (up to ``timeout``) until everything queued is sent; return the marker the
        coordinator waits for: this publisher's id, incarnation and last ``seq`` (nothing if it
        never published)."""
        if self._thread is None:
            return {}
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._buffer and time.monotonic() < deadline:
            time.sleep(0.002)
        return {"bus_publisher": self.publisher, "bus_incarnation": self.incarnation, "bus_seq": self._seq}

    def close(self, timeout: float = 2.0) -> None:
        """Send what is buffered (up to ``timeout`` s for the subscription), then close."""
        deadline = time.monotonic() + timeout
        while self._buffer and time.monotonic() < deadline:  # the flusher drains it once subscribed
            time.sleep(0.01)
        if self._thread is None:
            return
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        assert self._sock is not None
        self._sock.close(linger=int(timeout * 1000))


class BusLogHandler(logging.Handler):
    """Turns an agent's log records into AGENT_LOG events on its publisher."""

    def __init__(self, publisher: BusPublisher, agent: str, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self._publisher = publisher
        self._agent = agent

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._publisher.publish("AGENT_LOG", self._agent, {
                "agent_name": self._agent, "level": record.levelname, "levelno": record.levelno,
                "logger": record.name, "message": message})
        except Exception:
            self.handleError(record)


def attach(agent: Any, bus_address: str | None, worker: str, host: str, run: str | None = None) -> BusPublisher | None:
    """Give a running agent its publisher and send its log records to the bus too.  ``run`` is
    the run's tag (``incarnation.epoch``): the publisher's incarnation on the bus."""
    if not bus_address:
        return None
    publisher = BusPublisher(bus_address, f"{worker}/{agent.name}",
                             {"agent_name": agent.name, "worker": worker, "host": host}, run)
    agent._bus = publisher
    agent._bus_log_handler = BusLogHandler(publisher, agent.name)
    agent.logger.addHandler(agent._bus_log_handler)
    return publisher


def detach(agent: Any) -> None:
    """Flush and close what :func:`attach` set up."""
    handler = getattr(agent, "_bus_log_handler", None)
    if handler is not None:
        agent.logger.removeHandler(handler)
    if agent._bus is not None:
        agent._bus.close()
        agent._bus = None


def check_publishable(topic: str, data: dict[str, Any]) -> None:
    """Raise a clear TypeError for data that cannot travel as msgpack."""
    if not isinstance(topic, str) or not topic or any(c.isspace() for c in topic):
        raise TypeError(f"publish: topic {topic!r} must be a non-empty string without spaces")
    for key, value in data.items():
        protocol.pack_plain(value, f"publish({topic!r}): field {key!r} ({type(value).__name__}) cannot be sent")
