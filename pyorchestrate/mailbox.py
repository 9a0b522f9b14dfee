"""A thread-safe way to hand work to a thread that owns ZeroMQ sockets.

ZeroMQ sockets belong to one thread.  Other threads (user code, agent threads, process-agent
watchers) put items into a Mailbox; the owning thread polls :attr:`Mailbox.wake_socket` (a pipe's
read end) with its sockets and drains the box when it becomes readable.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable


class _WakePipe:
    """A non-blocking pipe whose read end (:attr:`fd`) a ``zmq.Poller`` polls like a socket: one
    byte written wakes the owner.  The two queues below keep their own flag of whether a byte is
    on its way (one write per batch, not one per item)."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write, False)

    def ring(self) -> None:
        try:
            os.write(self._write, b"\0")
        except OSError:
            pass  # the pipe is full (the owner is due to wake anyway) or closed at shutdown

    def empty(self) -> None:
        """Read what was written (owner only): one read, as writes are one per batch."""
        try:
            os.read(self.fd, 65536)
        except OSError:  # nothing to read (BlockingIOError), or closed
            pass

    def close(self) -> None:
        os.close(self._write)
        os.close(self.fd)


class Mailbox:
    """A FIFO of Python objects with a file descriptor that becomes readable when items arrive.

    :attr:`wake_socket` is the read end of a pipe (``zmq.Poller`` polls it like a socket).  It was
    an ``inproc`` PUSH/PULL pair: on this 2-core VM the PUSH's send cost a registering thread
    ~20 µs and the owner's receive loop ~15 µs per wake (S2, timestamps around them), against a
    few µs for a pipe's write and read.  A wake byte is written only when nobody has since the
    owner's last drain (the flag protocol of :class:`WakeQueue`)."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        #: the queue itself, for an owner's inline :meth:`has_query` (read only, owner thread only)
        self.items = self._items
        self._queued_by: collections.Counter[int] = collections.Counter()  # thread -> items still queued
        self._lock = threading.Lock()
        self._pipe = _WakePipe()
        self._woken = False  # a wake byte is in the pipe, or about to be (under _lock)
        self._closed = False
        self.wake_socket = self._pipe.fd

    def put(self, item: Any, *, query: bool = False) -> bool:
        """Queue ``item`` and wake the owner; False if the box is closed (nothing was queued).
        Safe from any thread.  A ``query`` (it reads, it changes nothing) goes ahead of what
        other threads queued, never ahead of what this thread queued: a status() call is not
        held up by another thread's 10,000 registrations, yet always sees the caller's own."""
        thread = threading.get_ident()
        with self._lock:
            if self._closed:
                return False
            if query and not self._queued_by[thread]:
                ahead = 0  # behind the queries already waiting at the head (first come, first served)
                while ahead < len(self._items) and self._items[ahead][0] is None:
                    ahead += 1
                self._items.insert(ahead, (None, item))
            else:
                self._items.append((thread, item))
                self._queued_by[thread] += 1
            if not self._woken:  # one wake byte per batch: the owner drains everything it finds
                self._woken = True
                # under the lock, as the close it must not race (a write after close could land
                # in whatever reused the descriptor's number)
                self._pipe.ring()
        return True

    def drain(self, limit: int | None = None) -> list[Any]:
        """Take the queued items, at most ``limit`` of them (owner thread only).  If some are
        left, the wake stays set, so the owner's next poll comes back for them."""
        # the bytes first, then the flag: an item put after this read either finds the flag
        # still set and is taken below, or finds it clear and writes a byte of its own
        self._pipe.empty()
        with self._lock:
            self._woken = False
            count = len(self._items) if limit is None else min(limit, len(self._items))
            taken = [self._items.popleft() for _ in range(count)]
            for thread, _ in taken:
                if thread is not None:
                    self._queued_by[thread] -= 1
                    if not self._queued_by[thread]:
                        del self._queued_by[thread]
            if self._items and not self._closed:
                self._woken = True
                self._pipe.ring()
        return [item for _, item in taken]

    def holds(self, predicate: Callable[[Any], bool]) -> bool:
        """Does an item waiting (not yet drained) satisfy ``predicate``?  Safe from any thread."""
        with self._lock:
            return any(predicate(item) for _, item in self._items)

    def has_query(self) -> bool:
        """Is a query waiting at the head?  Lock-free (owner thread only): cheap enough to ask
        between any two messages of a long phase."""
        # no try/except IndexError: the box is empty most of the times this is asked (eight a
        # launch in S2), and a raised exception cost 0.45 against 0.06 us here.  Only the owner
        # takes items out, so a box found not empty stays so until items[0] is read.
        items = self._items
        return bool(items) and items[0][0] is None

    def queries(self) -> list[Any]:
        """Take the queries waiting at the head (owner thread only): served between the phases
        of a loop turn, they wait for no slice of other work."""
        if not self.has_query():  # lock-free, as has_query: asked several times a turn, mostly for nothing
            return []
        with self._lock:
            taken = []
            while self._items and self._items[0][0] is None:
                taken.append(self._items.popleft()[1])
            return taken

    def close(self) -> list[Any]:
        """No more items (put returns False from now on); returns those never drained."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            # every write is under the lock and checks _closed first: none comes after this
            self._pipe.close()
            left = [item for _, item in self._items]
            self._items.clear()
            self._queued_by.clear()
            return left


class WakeQueue:
    """A FIFO many threads put into and one thread drains, with no lock at all.

    For the worker, where thousands of agent threads report: a :class:`Mailbox` serializes its
    producers with a lock (held across its wake's write, a system call that releases the GIL), so
    a producer could keep the lock for as long as it then waited to get the GIL back; with
    thousands of threads queued for it (then behind a ZeroMQ send) the worker's loop sat 0.5-1.5 s
    on that lock per flush.  Here a producer appends to a deque (atomic under the GIL) and wakes
    the owner through a pipe (a write is thread-safe) only if nobody has since the owner's last
    drain.  :attr:`wake_socket` is the pipe's read end: a file descriptor ``zmq.Poller`` polls
    like a socket.
    """

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._pipe = _WakePipe()
        self._woken = False
        self._closed = False
        self.wake_socket = self._pipe.fd

    def put(self, item: Any) -> None:
        """Queue ``item`` and wake the owner.  Safe from any thread; never blocks."""
        self._items.append(item)
        # unsynchronized on purpose: the owner empties the pipe, then clears the flag, then takes
        # items, so an item appended after its last take finds the flag clear, or set by a wake
        # whose byte is still in the pipe (at worst one wake too many, never one too few)
        if not self._woken:
            self._wake()

    def _wake(self) -> None:
        self._woken = True
        if not self._closed:
            self._pipe.ring()

    def drain(self, limit: int | None = None) -> list[Any]:
        """Take the queued items, at most ``limit`` (owner thread only); if some are left, the
        wake stays set, so the owner's next poll comes back for them."""
        # one read: a wake is one byte written only while the flag was clear, so few wait here;
        # each read releases the GIL, which costs this loop a place in its queue
        self._pipe.empty()
        # only now: cleared before the read, a producer could set the flag and have its byte
        # consumed by that read, leaving the flag set with no byte to wake us for the next item
        self._woken = False
        # as many as are there now: only this thread takes items out, so each popleft finds one
        # (popping until IndexError raised that exception once a drain: 0.4 us a launch in S2)
        items = self._items
        count = len(items) if limit is None else min(limit, len(items))
        popleft = items.popleft
        taken = [popleft() for _ in range(count)]
        if items:
            self._wake()
        return taken

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pipe.close()
