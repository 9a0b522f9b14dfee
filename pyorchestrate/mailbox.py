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
        self._queued_by: collections.Counter[int] = collections.Counter()  # thread -> items still queued
        self._lock = threading.Lock()
        self.wake_socket = ctx.socket(zmq.PULL)
        self.wake_socket.setsockopt(zmq.LINGER, 0)
        self.wake_socket.bind(endpoint)
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(endpoint)
        self._closed = False

    def put(self, item: Any, *, query: bool = False) -> None:
        """Queue ``item`` and wake the owner.  Safe from any thread.  A ``query`` (it reads, it
        changes nothing) goes ahead of what other threads queued, never ahead of what this
        thread queued: a status() call is not held up by another thread's 10,000 registrations,
        yet always sees the caller's own."""
        thread = threading.get_ident()
        with self._lock:
            if self._closed:
                return
            was_empty = not self._items
            if query and not self._queued_by[thread]:
                ahead = 0  # behind the queries already waiting at the head (first come, first served)
                while ahead < len(self._items) and self._items[ahead][0] is None:
                    ahead += 1
                self._items.insert(ahead, (None, item))
            else:
                self._items.append((thread, item))
                self._queued_by[thread] += 1
            if was_empty:
                # one wake byte per batch: the owner drains everything it finds
                self._push.send(b"", zmq.NOBLOCK)

    def drain(self, limit: int | None = None) -> list[Any]:
        """Take the queued items, at most ``limit`` of them (owner thread only).  If some are
        left, the wake socket stays readable, so the owner's next poll comes back for them."""
        while True:
            try:
                self.wake_socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        with self._lock:
            count = len(self._items) if limit is None else min(limit, len(self._items))
            taken = [self._items.popleft() for _ in range(count)]
            for thread, _ in taken:
                if thread is not None:
                    self._queued_by[thread] -= 1
                    if not self._queued_by[thread]:
                        del self._queued_by[thread]
            if self._items:
                self._push.send(b"", zmq.NOBLOCK)
        return [item for _, item in taken]

    def queries(self) -> list[Any]:
        """Take the queries waiting at the head (owner thread only): served between the phases
        of a loop turn, they wait for no slice of other work."""
        with self._lock:
            taken = []
            while self._items and self._items[0][0] is None:
                taken.append(self._items.popleft()[1])
            return taken

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._push.close()
        self.wake_socket.close()
