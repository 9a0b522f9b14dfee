"""An agent's inbox: what ``orchestrator.send`` and ``trigger`` handed it, waiting to be taken.

Bounded (the agent's ``Config.inbox_max``).  Unbounded, a script that sends faster than its agent
handles grew the worker's memory without end: 4 KiB messages to an agent taking 5 ms each grew its
worker by 25 MB a second (57,000 messages waiting after 10 s), on its way to the out-of-memory
killer and every agent of that worker with it.  Past the bound a message is dropped, never the
process: counted (its run's end says how many, and the coordinator counts them in ``dropped``) and
said as a WARNING on the agent's log at most every :data:`SAY_EVERY` seconds.  The newest is the
one dropped, as a ZeroMQ socket at its high-water mark does: what the agent handles stays in the
order it was sent, with nothing missing before the first drop.

A process agent's inbox also keeps its counts where its worker can read them after the process is
gone (:attr:`Inbox.tally`, memory shared with the worker): a process killed (at its stop timeout,
by the out-of-memory killer, a segfault) reports no end of its own, and what it had been handed
but had not taken was lost uncounted.  So does a thread agent in an agent host, in its place in
memory its host shares with the worker (:class:`TallyPlace`): a host that dies reports nothing.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable

INBOX_MAX = 10_000  #: the default bound, in messages
SAY_EVERY = 5.0  #: seconds between two warnings of one run about its full inbox


class TallyPlace:
    """Two counts of one agent in a shared array of many (an agent host's: see worker/hosts.py),
    indexed as a tally of its own is: ``[0]`` taken, ``[1]`` dropped."""

    __slots__ = ("_array", "_base")

    def __init__(self, array: Any, index: int) -> None:
        self._array, self._base = array, 2 * index

    def clear(self) -> None:
        """Both counts to 0, for a new agent (a place is used again once its agent ended)."""
        self._array[self._base] = self._array[self._base + 1] = 0

    def __getitem__(self, i: int) -> int:
        return self._array[self._base + i]

    def __setitem__(self, i: int, value: int) -> None:
        self._array[self._base + i] = value


def tally_fields(tally: Any) -> dict[str, int]:
    """What a tally says, as the end of an agent that could not say it itself carries it (the
    worker reports it): the coordinator counts the rest of what it sent as unhandled."""
    taken, dropped = tally[0], tally[1]
    return {"messages_taken": taken, **({"messages_dropped": dropped} if dropped else {})}


class Inbox:
    """One run's messages, ``(kind, payload)``, first in first out.  One thread puts (the worker's
    loop, or a process agent's reader), any thread takes."""

    __slots__ = ("_queue", "dropped", "taken", "_said", "_clock", "tally")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # C, ~40 times cheaper to make than a Queue
        self.dropped = 0  #: messages refused because the inbox was full
        #: messages taken (to be handled): its run's end says it, and the coordinator, which knows
        #: how many it sent, counts the rest as lost wherever they were (inbox, pipe, wire)
        self.taken = 0
        self._said: float | None = None  # when the last warning went (None: never)
        self._clock = clock
        #: (taken, dropped) kept in memory shared with the worker, or None (set in a process agent)
        self.tally: Any = None

    def put(self, item: tuple[str, Any], limit: int) -> bool:
        """Queue ``item`` unless ``limit`` (> 0) messages wait already; False: it was dropped
        (counted).  ``limit`` < 0: no bound."""
        if 0 < limit <= self._queue.qsize():
            self.dropped += 1
            if self.tally is not None:
                self.tally[1] = self.dropped
            return False
        self._queue.put(item)
        return True

    def due_to_say(self) -> bool:
        """Is a warning about drops due (the first drop, then one per :data:`SAY_EVERY` s)?"""
        now = self._clock()
        if self._said is not None and now - self._said < SAY_EVERY:
            return False
        self._said = now
        return True

    def get(self, timeout: float) -> tuple[str, Any] | None:
        """The oldest message, or None after ``timeout`` seconds."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self.taken += 1
        if self.tally is not None:
            self.tally[0] = self.taken  # (this thread alone writes it: the putter writes the other slot)
        return item

    def waiting(self) -> int:
        """How many messages wait to be taken."""
        return self._queue.qsize()
