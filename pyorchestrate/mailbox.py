"""A thread-safe way to hand work to a thread that owns ZeroMQ sockets.

ZeroMQ sockets belong to one thread.  Other threads (user code, agent threads, process-agent
watchers) put items into a Mailbox; the owning thread polls :attr:`Mailbox.wake_socket` with its
other sockets and drains the box when it becomes readable.
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Any

import zmq

_ids = itertools.count()


class Mailbox:
    """A FIFO of Python objects with a ZeroMQ socket that becomes readable when items arrive."""

    def __init__(self, ctx: zmq.Context) -> None:
        endpoint = f"inproc://mailbox-{id(self)}-{next(_ids)}"
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self.wake_socket = ctx.socket(zmq.PULL)
        self.wake_socket.setsockopt(zmq.LINGER, 0)
        self.wake_socket.bind(endpoint)
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(endpoint)
        self._closed = False

    def put(self, item: Any) -> None:
        """Queue ``item`` and wake the owner.  Safe from any thread."""
        with self._lock:
            if self._closed:
                return
            was_empty = not self._items
            self._items.append(item)
            if was_empty:
                # one wake byte per batch: the owner drains everything it finds
                self._push.send(b"", zmq.NOBLOCK)

    def drain(self) -> list[Any]:
        """Take every queued item (owner thread only)."""
        while True:
            try:
                self.wake_socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._push.close()
        self.wake_socket.close()
