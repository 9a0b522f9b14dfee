"""The coordinator's host name, resolved in a thread of ours, never by libzmq.

libzmq resolves a ``tcp://NAME:PORT`` in its I/O thread, at every connect and reconnect, and that
one thread carries every socket of the worker's context.  While DNS does not answer, a reconnect of
any of them (the coordinator's pulse, the bus) held the control connection for the resolver's
whole timeout, 10 s with glibc's defaults, measured here: the coordinator heard nothing, declared
a live worker lost and started its agents again elsewhere (tests/test_dns_netns.py).

So the worker's sockets connect to an address, and the name is looked up here, once before each
registration (each new control connection).  The worker waits for that lookup only a moment when
it has an earlier answer, and keeps the earlier answer when a lookup fails or is late: while DNS
is down it reconnects where its coordinator last was, which finds a coordinator restarted there.
A coordinator that moved is found at the first registration after DNS says so.  libzmq's sockets
never resolve anything again: they reconnect to that address.

Only IPv4 answers are taken, as libzmq takes them with ZMQ_IPV6 off (ours is): the first of
``getaddrinfo``'s list, the one libzmq would have picked.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Callable

from pyorchestrate import own_threads, sockets


def lookup_ipv4(host: str) -> str:
    """The first IPv4 address ``getaddrinfo`` gives for ``host`` (blocks for as long as DNS takes)."""
    return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Resolver:
    """``tcp://HOST:PORT`` with HOST looked up by :meth:`refresh` in a thread of its own.

    An address given as an IP literal is its own answer (no thread, no lookup)."""

    def __init__(self, address: str, lookup: Callable[[str], str] = lookup_ipv4) -> None:
        self._host, self._port = sockets.parse_tcp(address)
        self._lookup = lookup
        self._cond = threading.Condition()
        self._answer: str | None = address if _is_address(self._host) else None
        self._static = self._answer is not None
        self.error = ""  # why the latest lookup failed ("" once one succeeds)
        self._asked = 0  # lookups asked for so far
        self._done = 0  # of them, answered (or failed) by now
        self._closed = False
        self._thread: threading.Thread | None = None

    def address(self) -> str | None:
        """The latest address known (None: no lookup has succeeded yet)."""
        with self._cond:
            return self._answer

    def refresh(self) -> int:
        """Ask for a lookup that starts from now; returns its ticket for :meth:`answered`/:meth:`wait`."""
        with self._cond:
            if self._static:
                return self._done
            self._asked += 1
            if self._thread is None:
                thread = own_threads.thread(self._run, "pyorchestrate-resolver")
                try:
                    thread.start()
                except RuntimeError as exc:
                    # no thread to be had (a pids limit): this lookup failed, the next asks again.
                    # (Kept unstarted, it stood for a thread that never looked anything up, and
                    # raised, it ended the worker's loop)
                    self.error, self._done = f"could not start the lookup thread: {exc}", self._asked
                    return self._asked
                self._thread = thread
            self._cond.notify_all()
            return self._asked

    def answered(self, ticket: int) -> bool:
        """Has the lookup of ``ticket`` ended (answered or failed)?"""
        with self._cond:
            return self._done >= ticket

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the lookup of ``ticket``; has it ended?"""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= ticket or self._closed, timeout) and not self._closed

    def close(self) -> None:
        """No more lookups (a lookup under way is left to end in its daemon thread)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._asked > self._done or self._closed)
                if self._closed:
                    return
                ticket = self._asked  # every ask made before this lookup starts is answered by it
            try:
                address, error = f"tcp://{self._lookup(self._host)}:{self._port}", ""
            except (OSError, UnicodeError, IndexError) as exc:
                address, error = None, f"{type(exc).__name__}: {exc}"
            with self._cond:
                if address is not None:
                    self._answer = address
                self.error = error
                self._done = ticket
                self._cond.notify_all()
