"""Flow control on a worker's control connection, both ways: what the other side has not read
yet bounds what is sent to it next, so a lease echo or a heartbeat never waits behind a burst.

Everything on a worker's control connection crosses in order: starts, stops and payloads to the
worker, its reports back, and the lease's heartbeats and echoes between them.  Without a bound, a
burst filled the sockets' buffers (libzmq's queue, both kernels', the link) with seconds' worth
of bytes, and the lease waited behind them: 4 MB of starts over a 1 MB/s link with a 2 s window,
and the worker's lease ran out, it registered again, the burst went again, for ever; 100 long
error reports the other way, and it registered again and half of them were lost with the old
connection.

So numbered frames go out only while the bytes in flight (sent, not yet read: each side says how
far it has read, by frame number, in its heartbeats or echoes and every SAY_READ_EVERY bytes
between them) are under a credit.  The coordinator holds what waits here, in order; a worker
leaves its reports unframed in its pending list (worker/node.py).  Heartbeats and echoes are not
numbered and never wait, so one waits behind at most a credit's worth of bytes, and a part: a
start or payload over PART_BYTES crosses in parts.  The credit follows the link: while frames
wait, the other side reads at the link's rate (or its loop's), and the credit is what that rate
carries in a quarter of the lease (never less than FLOOR, never more than CEILING).  On loopback
it reaches the ceiling within the first burst; over 1 MB/s with a 2 s window it settles near
500 kB, half a second of link.  A reader that reads in bursts (starved of the CPU) looks faster
than the link, so the lease's delay rules too (SendWindow.echoed): a worker watches how late its
echoes come back, and tells the coordinator how old its lease is in each heartbeat.

Pure: no socket, no clock (``now`` is passed in).  A ``SendWindow`` per worker connection lives
on its ``WorkerRecord`` (core.py holds and releases frames), and one in the worker for what it sends.
"""

from __future__ import annotations

import collections

#: bytes read from the other side after which we say how far we read, between heartbeats: well
#: under the least credit, so a burst never waits for a heartbeat
SAY_READ_EVERY = 16 * 1024
#: a start or a payload bigger than this crosses in parts of this size, each a frame of its own
#: (protocol "part"), so an echo waits behind at most the credit and one part, never behind all of
#: an 8 MiB payload (8 s of a 1 MB/s link: longer than a 2 s window)
PART_BYTES = 64 * 1024
#: frame types that may be that big (a welcome never is cut: a registering worker reads only it)
CUT_TYPES = frozenset({"starts", "deliver"})
#: the credit a new connection starts with, and the least it falls to: at 1 MB/s, 64 ms of link
FLOOR = 64 * 1024
#: the most: a link that fast never needs more in flight, and an echo never waits behind more
CEILING = 16 * 1024 * 1024
#: the credit carries this share of the lease at the measured rate: the rest of the lease is for the
#: round trip, the tick the echo waits for, and a link that slows down before we measure it
SHARE = 0.25
#: a rate is measured over at least this share of the lease: acks read in one loop turn measure
#: nothing, and a frame read just after a sample began does not make a slow link look fast
SAMPLE_SHARE = 0.05
#: a lease echo that comes back later than the coordinator's echo cadence plus this share of the
#: lease says the lease's messages waited behind more than the credit meant them to (a quarter of
#: the lease): the credit halves, and grows again only once an echo comes within QUICK_SHARE
SLOW_SHARE = 0.2
QUICK_SHARE = 0.1


def longest_crossing(size: int, lease: float) -> float:
    """The longest ``size`` bytes take over the narrowest link this flow control keeps a lease
    on: one that carries a credit at FLOOR and a part within the lease (a heartbeat waits behind
    at most those).  A frame that is never cut, a worker's register, may take that long to arrive:
    a worker that waited 2 s for its welcome, whatever its register's size, never got back after
    a cut over such a link (283 kB of running copies over 50 kB/s: it gave up and sent it again
    every 2-5 s, for ever)."""
    return size * lease / (FLOOR + PART_BYTES)


class SendWindow:
    """Bytes sent on one connection and not yet read, and the frames waiting for room."""

    __slots__ = ("lease", "floor", "ceiling", "credit", "held", "opening", "last", "_sent", "_read", "_marks",
                 "_sample", "_cap")

    def __init__(self, lease: float = 5.0, floor: int = FLOOR, ceiling: int = CEILING) -> None:
        self.lease = lease
        self.floor, self.ceiling = floor, ceiling
        self.credit = floor
        #: numbered frames waiting for room, in order: (number, frame)
        self.held: collections.deque[tuple[int, bytes]] = collections.deque()
        #: set while a register on a new connection is answered: its welcome (and the stops before
        #: it) never wait, since the worker says how far it read only once it is welcomed
        self.opening = False
        #: the number of the last frame sent (not held): said with each echo or heartbeat, which
        #: follows it on the connection; a side that has not read that far when it comes lost frames
        #: (a frame lost while the credit is used up is followed by no other to show the gap)
        self.last = 0
        self._sent = 0  # bytes sent so far (numbered frames)
        self._read = 0  # of them, bytes the other side said it read
        self._marks: collections.deque[tuple[int, int]] = collections.deque()  # (number, bytes sent through it)
        self._sample: tuple[float, int] | None = None  # (when, bytes read then): frames have waited since
        self._cap = ceiling  # the most the rate may raise the credit to (see echoed)

    @property
    def in_flight(self) -> int:
        """Bytes sent and not yet read (as far as the other side has said)."""
        return self._sent - self._read

    def room(self) -> bool:
        """May a frame go now: nothing waits, and the credit is not used up?"""
        return self.opening or (not self.held and self._sent - self._read < self.credit)

    def admit(self, n: int, frame: bytes) -> bool:
        """Frame ``n`` is to go: True if it may go now (counted as sent), False if it waits (held,
        in order behind any others)."""
        if not self.room():
            self.held.append((n, frame))
            return False
        self.count(n, len(frame))
        return True

    def count(self, n: int, size: int) -> None:
        """Frame ``n`` of ``size`` bytes went (a worker frames its reports only while there is
        room, so it holds them unframed, and counts here what it sends)."""
        self.last = n
        self._sent += size
        self._marks.append((n, self._sent))

    def read(self, n: int, now: float, waiting: bool = False) -> list[bytes]:
        """The other side has read every frame up to number ``n``: the frames that may go now, in
        order.  ``waiting``: frames wait outside this window (a worker holds its reports unframed).
        (An ``n`` of another numbering, a heartbeat written before the worker read our welcome, at
        worst takes frames for read early: a credit overdrawn once, never a frame lost.)"""
        marks = self._marks
        while marks and marks[0][0] <= n:
            self._read = marks.popleft()[1]
        self._measure(now, waiting or bool(self.held))
        return self._release()

    def _measure(self, now: float, waiting: bool) -> None:
        """While frames wait, the other side reads as fast as the link (or its loop) lets it: the
        credit follows that rate."""
        if self._sample is None:
            if waiting:
                self._sample = (now, self._read)
            return
        since, read_then = self._sample
        if now - since < self.lease * SAMPLE_SHARE:
            return
        rate = (self._read - read_then) / (now - since)
        self.credit = int(min(self._cap, max(self.floor, rate * self.lease * SHARE)))
        self._sample = (now, self._read) if waiting else None

    def echoed(self, age: float, cadence: float) -> None:
        """A worker's lease echo came back ``age`` seconds after its heartbeat left (its own
        clock's stamp; the coordinator echoes each heartbeat as it reads it, and every ``cadence``
        seconds if none came, so ``cadence`` is the slack allowed): the worker calls this for what it
        sends, and the coordinator for what it sends the worker, with the lease age the worker's
        heartbeat says (its echoes wait behind those frames).  The rate the other side reads at is
        not the link's when it reads in bursts: a coordinator starved of the CPU (beside 4 CPU
        burners) read a backlog that had crossed meanwhile, its rate looked 2.6 times the 1 MB/s
        link's, the credit grew to 1.3 MB, the heartbeats waited up to 1.35 s behind it, and the
        2 s lease ran out.  So the echo's delay rules too: late, the credit halves (down to the
        floor) and the rate may not raise it past that until an echo comes back quick again."""
        late = age - cadence
        if late > self.lease * SLOW_SHARE:
            self._cap = max(self.floor, min(self.credit, self._cap) // 2)
            self.credit = min(self.credit, self._cap)
        elif late < self.lease * QUICK_SHARE:
            self._cap = self.ceiling

    def _release(self) -> list[bytes]:
        held, going = self.held, []
        while held and self._sent - self._read < self.credit:
            n, frame = held.popleft()
            self.count(n, len(frame))
            going.append(frame)
        return going


def parts(frame: bytes) -> list[bytes]:
    """``frame`` in PART_BYTES pieces, in order (each goes in a numbered "part" frame)."""
    return [frame[i:i + PART_BYTES] for i in range(0, len(frame), PART_BYTES)]


class Reassembly:
    """The parts of one frame as they come, in order (numbered frames: a lost part is a gap the
    worker sees, and it registers again on a new connection, with an empty Reassembly)."""

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, data: bytes, last: bool, most: int) -> bytes | None:
        """One more part: the whole frame once ``last``, else None.  ValueError past ``most`` bytes
        (nothing is kept then)."""
        self._size += len(data)
        if self._size > most:
            self.clear()
            raise ValueError(f"a frame in parts over {most} bytes")
        self._parts.append(data)
        if not last:
            return None
        whole = b"".join(self._parts)
        self.clear()
        return whole

    def clear(self) -> None:
        self._parts.clear()
        self._size = 0
