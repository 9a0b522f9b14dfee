"""The worker's sending end of a process agent's pipe: a send never makes the worker's loop wait.

The loop tells each process agent its lease every heartbeat, and passes it stops and messages.  A
process that does not read its pipe (stopped by SIGSTOP, a debugger, or SIGTTIN for reading a
terminal from the background) lets the pipe fill: ~290 lease messages here, 29 s at a 0.1 s
heartbeat (5 minutes at the default 1 s).  The next send then waited, with the loop, for as long as
the process stayed stopped: the worker fell silent, was taken for lost, and every agent it ran was
started elsewhere while still running here.

So a message goes straight into the pipe only while the pipe has room for it (``poll`` says
writable, and a message that small is then taken whole); otherwise it waits in a backlog that a
writer thread of its own (started then, ended once the backlog is empty) sends in order.  In the
backlog only the newest lease is kept: a lease replaces the one before it.

The backlog's deliveries (``orchestrator.send``/``trigger``) are bounded too, by bytes: a script
sending 4 KiB messages to a stopped process agent grew its worker by 45 MB a second (490 MB in
10 s), where the agent's own inbox bound (agents/inbox.py) cannot help, as it never reads.  Past
:data:`BACKLOG_DELIVERIES_MAX` bytes a delivery is refused (the worker counts it); stops and
leases never are.
"""

from __future__ import annotations

import collections
import select
import threading
from typing import Any, Callable

import msgpack

from pyorchestrate import own_threads

#: bytes a message may have to go straight into a writable pipe (a Unix socket that polls writable
#: has three quarters of its buffer free: ~150 KiB by default); longer ones go through the writer
DIRECT_MAX = 16 * 1024
#: bytes of deliveries that may wait in a backlog (a stopped child's); one more is refused
BACKLOG_DELIVERIES_MAX = 16 * 1024 * 1024


class ChildLink:
    """Sends ``[kind, ...]`` messages on ``conn`` (a ``multiprocessing`` connection) in order,
    never waiting for the other end to read."""

    def __init__(self, conn: Any, start: Callable[[threading.Thread], None] = threading.Thread.start) -> None:
        """``start``: how a writer thread is started (the worker hands it to its starter thread:
        ``Thread.start()`` waits until the thread runs, seconds in a worker crowded with threads)."""
        self.conn = conn
        self._start = start
        # reentrant: a writer that cannot be started may be reported (writer_failed) from within send
        self._lock = threading.RLock()
        # (kind, data) waiting for the writer; None while nothing waits (and no writer runs). The
        # writer removes a message only once sent: a backlog is never empty while a send is under way
        self._backlog: collections.deque[tuple[str, bytes]] | None = None
        self._poll: select.poll | None = None
        self.writers = 0  #: writer threads started so far (the pipe was full, or a message long)
        self.lost = 0  #: messages dropped because no writer thread could be started
        self._delivery_bytes = 0  # of the deliveries in the backlog
        self.refused = 0  #: deliveries refused because the backlog held its bound of them

    def send(self, message: list) -> bool:
        """Send or queue ``message``; False if it is a delivery refused for a full backlog (counted)."""
        data = msgpack.packb(message, use_bin_type=True)
        kind = message[0]
        with self._lock:
            if kind == "deliver" and message[1] != "execute":
                if self._backlog and self._delivery_bytes + len(data) > BACKLOG_DELIVERIES_MAX:
                    self.refused += 1
                    return False
            if self._backlog is None and len(data) <= DIRECT_MAX and self._writable():
                try:
                    self.conn.send_bytes(data)
                except (OSError, ValueError):
                    pass  # the child is gone; its watcher reports that
                return True
            if self._backlog is None:
                self._backlog = collections.deque()  # before the writer looks: it waits for our lock
                try:
                    self._start(own_threads.thread(self._write, "child-writer"))
                except RuntimeError:  # no thread to be had (a pids limit): this message is lost, not the loop
                    self._backlog = None
                if self._backlog is None:  # (or its start failed at once: writer_failed has run)
                    self.lost += 1
                    return True
                self.writers += 1
            elif kind == "lease":
                # the newest lease says all the older ones did.  In place (the writer holds this
                # deque), and never the first, which may be being sent
                backlog = self._backlog
                rest = [item for item in list(backlog)[1:] if item[0] != "lease"]
                while len(backlog) > 1:
                    backlog.pop()
                backlog.extend(rest)
            self._backlog.append((kind, data))
            if kind == "deliver":
                self._delivery_bytes += len(data)
            return True

    def writer_failed(self, exc: BaseException) -> None:
        """The writer thread could not be started (a pids limit): what waited for it is lost,
        counted, and the next message tries again (else the backlog grew for ever, unsent)."""
        with self._lock:
            self.lost += len(self._backlog or ())
            self._backlog = None
            self._delivery_bytes = 0

    def _writable(self) -> bool:
        if self._poll is None:
            self._poll = select.poll()
            try:
                self._poll.register(self.conn.fileno(), select.POLLOUT)
            except (OSError, ValueError):  # closed: the send below fails as it would have
                return True
        return bool(self._poll.poll(0))

    def _write(self) -> None:
        while True:
            with self._lock:
                backlog = self._backlog
                if not backlog:
                    self._backlog = None  # what comes next goes straight in again
                    return
                data = backlog[0][1]
            try:
                self.conn.send_bytes(data)  # may wait: this thread, not the loop
            except (OSError, ValueError):
                with self._lock:
                    self._backlog = None  # the child is gone; its watcher reports that
                    self._delivery_bytes = 0
                return
            with self._lock:
                kind, data = backlog.popleft()
                if kind == "deliver":
                    self._delivery_bytes -= len(data)
