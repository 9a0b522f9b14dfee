"""Bus frames from a worker this coordinator does not know yet, kept until it registers.

A worker's bus socket reconnects on its own (libzmq, in its I/O thread) as soon as a coordinator
listens on the address again; the worker registers on its control connection only once it has
noticed that its coordinator went silent, up to a liveness window later.  So a coordinator started
again after a crash hears the bus of the workers that served its predecessor before their
registers, and those frames hold the events that their agents, adopted in a moment, sent
meanwhile.  Dropped as "not from a worker" (there is no token to check them against yet), that
was 0.3-0.9 s of every adopted agent's events, lost after each coordinator restart in most runs
of a probe (SIGKILL, start again, an agent publishing 2,000 events a second).

So they wait here, in arrival order, for at most ``wait`` seconds and ``max_bytes`` in all, and
go through the usual checks (the token, the run) once their worker has registered.  Anyone can
send such frames without keys, so the bounds are what an impostor can cost; what goes past them
or waits too long is dropped and counted as before.  Pure bookkeeping: the loop owns the socket
and the clock.
"""

from __future__ import annotations

MAX_BYTES = 32 * 2**20  #: frames held at most, in all (each frame at most max_message_size)


class PreJoinHold:
    def __init__(self, wait: float, max_bytes: int = MAX_BYTES) -> None:
        self.wait = wait
        self.max_bytes = max_bytes
        self.size = 0
        #: worker name -> (when its first held frame gives up, its frames in arrival order)
        self._held: dict[str, tuple[float, list[list[bytes]]]] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def names(self) -> list[str]:
        return list(self._held)

    def add(self, worker: str, frames: list[bytes], now: float) -> bool:
        """Keep one bus frame of ``worker``; False if it does not fit (then it is the caller's
        to drop)."""
        size = sum(len(f) for f in frames)
        if self.size + size > self.max_bytes:
            return False
        entry = self._held.get(worker)
        if entry is None:
            entry = self._held[worker] = (now + self.wait, [])
        entry[1].append(frames)
        self.size += size
        return True

    def take(self, worker: str) -> list[list[bytes]]:
        """Everything held of ``worker``, oldest first, and forget it."""
        entry = self._held.pop(worker, None)
        if entry is None:
            return []
        self.size -= sum(len(f) for frames in entry[1] for f in frames)
        return entry[1]

    def expired(self, now: float) -> list[tuple[str, int]]:
        """Give up on the workers whose first frame waited ``wait`` seconds: (worker, frames)."""
        gone = [worker for worker, (deadline, _) in self._held.items() if deadline <= now]
        return [(worker, len(self.take(worker))) for worker in gone]
