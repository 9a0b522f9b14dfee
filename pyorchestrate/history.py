"""The coordinator's memory of recent bus events, for subscribers that missed some.

Every numbered event the coordinator publishes (its own and those it forwards) is kept here under
its coordinator seq, bounded by count *and* bytes: the oldest go first.  A subscriber that sees a
gap (or joins late) asks for a range; it is served in slices (bounded items and bytes per reply)
so a large request costs the coordinator's loop bounded time, and one beyond ``max_range`` is
refused outright.  What history no longer holds is reported back as the exact count lost.  A
subscriber with a topic filter asks instead for the recent events of its topics, in one answer;
the loop builds that answer a slice at a time (:class:`RecentScan`).
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator

SLICE_ITEMS = 2000
SLICE_BYTES = 1024 * 1024
#: the most bytes of events one answer to a history request carries (a quarter of what a
#: subscriber's socket takes: protocol.DEFAULT_MAX_MESSAGE_SIZE)
RECENT_BYTES = 16 * 1024 * 1024
MAX_RANGE = 1_000_000


class History:
    """Numbered events ``(seq, topic, body)``, contiguous in seq, oldest first."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[int, str, bytes]] = collections.deque()
        self.bytes = 0

    def add(self, seq: int, topic: str, body: bytes) -> None:
        if self.max_events <= 0:
            return
        items = self._items
        items.append((seq, topic, body))
        self.bytes += len(body) + len(topic)
        while len(items) > self.max_events or (self.bytes > self.max_bytes and len(items) > 1):
            _, old_topic, old_body = items.popleft()
            self.bytes -= len(old_body) + len(old_topic)

    @property
    def oldest(self) -> int | None:
        """The seq of the oldest event still held (None: nothing)."""
        return self._items[0][0] if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def slice(self, first: int, last: int, max_items: int = SLICE_ITEMS,
              max_bytes: int = SLICE_BYTES) -> tuple[list[tuple[int, str, bytes]], int]:
        """Events ``first..last`` still held, at most one slice of them; and the seq up to which
        this answer covers the range (the asker continues from there + 1)."""
        items = self._items
        if not items or last < items[0][0]:
            return [], last  # all of it is gone (or never was)
        oldest = items[0][0]
        out: list[tuple[int, str, bytes]] = []
        size = 0
        limited = False
        for entry in itertools.islice(items, max(first, oldest) - oldest, None):
            if entry[0] > last:
                break
            if len(out) >= max_items or (out and size + len(entry[2]) > max_bytes):
                limited = True
                break
            out.append(entry)
            size += len(entry[2])
        covered = out[-1][0] if limited else last
        return out, covered

    def items(self) -> Iterator[tuple[int, str, bytes]]:
        """Every event held, oldest first."""
        return iter(self._items)

    def recent(self, prefixes: list[str], max_items: int = SLICE_ITEMS,
               max_bytes: int = RECENT_BYTES) -> list[tuple[str, bytes]]:
        """The newest events held whose topic starts with one of ``prefixes``, oldest first, as
        ``(topic, body)``: at most ``max_items``, and only as many as fit in ``max_bytes`` (at least
        one).  The answer goes in one frame: 1,100 log lines of 64 KB made one over a subscriber's
        64 MiB limit, which cost it the connection; it subscribed again on reconnecting, was sent
        the same frame, and so on (the coordinator's loop stalled 1.9 s), never receiving a line.
        All at once; the coordinator's loop asks a :class:`RecentScan` a slice at a time."""
        scan = RecentScan(self, prefixes, max_items, max_bytes)
        while not scan.step(len(self._items)):
            pass
        return scan.answer()


class RecentScan:
    """One answer of :meth:`History.recent`, built a slice of events at a time, newest first from
    the newest held when it began.  One request can cost the loop half a second (2,000 prefixes
    a topic, 100,000 events): a subscriber sending such requests held every turn that long
    (status() waited 0.26 s in the median), so the loop steps it between its other work.  Events
    published meanwhile are not in the answer: its asker subscribed to them live before asking."""

    __slots__ = ("history", "wanted", "max_items", "max_bytes", "next", "out", "size", "done")

    def __init__(self, history: History, prefixes: list[str], max_items: int = SLICE_ITEMS,
                 max_bytes: int = RECENT_BYTES) -> None:
        self.history = history
        # one C call a topic for all the prefixes: a generator over them took 6.5 s for a request
        # of 1,000 prefixes matching nothing in a full history (100,000 events), 0.26 s so
        self.wanted = tuple(prefixes)
        self.max_items = max_items
        self.max_bytes = max_bytes
        items = history._items
        self.next = items[-1][0] if items else 0  # the seq to look at next (going back)
        self.out: list[tuple[str, bytes]] = []  # newest first
        self.size = 0
        self.done = not items or not self.wanted

    def step(self, events: int) -> bool:
        """Look at up to ``events`` more events; True once the answer is complete."""
        if self.done:
            return True
        items = self.history._items
        if not items or self.next < items[0][0]:
            self.done = True  # the rest has left history meanwhile
            return True
        wanted, out = self.wanted, self.out
        seq = self.next + 1
        # (from the newest: events published since this scan began are skipped, in C)
        for seq, topic, body in itertools.islice(reversed(items), items[-1][0] - self.next,
                                                 items[-1][0] - self.next + events):
            if topic.startswith(wanted):
                if out and (len(out) >= self.max_items or self.size + len(body) > self.max_bytes):
                    self.done = True
                    return True
                out.append((topic, body))
                self.size += len(body)
        self.next = seq - 1
        self.done = self.next < items[0][0]
        return self.done

    def answer(self) -> list[tuple[str, bytes]]:
        """The events found, oldest first."""
        return self.out[::-1]
