"""Keeping an agent's log lines between its STARTED and its end.  Holding its lifecycle events
until its run's last bus events are in (:class:`TailHold`), and its first bus events until its
STARTED is out (:class:`EarlyHold`).

A worker reports an agent's AGENT_TERMINATED on its control connection and the agent's last log
lines and events on the bus: two connections, so the report often arrives first, and subscribers
(and callbacks) saw log lines *after* the agent's end.  The report carries the run's last bus seq;
until that seq has arrived (or ``wait`` seconds have passed: a tail lost on the way is counted
lost by the coordinator, coordinator.TAIL_GIVE_UP after the end), the events about that agent are
held here, in order, and then published.  Pure bookkeeping: the coordinator's loop owns the
sockets and the clock."""

from __future__ import annotations

from typing import Any, Hashable

WAIT = 2.0  #: seconds an agent's events wait at most for its run's tail


class TailHold:
    def __init__(self, wait: float = WAIT) -> None:
        self.wait = wait
        self._by_subject: dict[str, tuple[Hashable, float, list[Any]]] = {}  # subject -> (key, deadline, held)
        self._subject_of: dict[Hashable, str] = {}
        #: the subjects held, read only: ``subject in hold.subjects`` is :meth:`holds` without a
        #: Python call (the loop asks for every lifecycle event it publishes)
        self.subjects = self._by_subject

    def start(self, subject: str, key: Hashable, now: float) -> None:
        """Hold ``subject``'s events from now on, until ``key``'s tail arrives."""
        if subject in self._by_subject:
            return  # already held (an earlier run's tail): the first release frees both in order
        self._by_subject[subject] = (key, now + self.wait, [])
        self._subject_of[key] = subject

    def holds(self, subject: str) -> bool:
        return subject in self._by_subject

    def add(self, subject: str, item: Any) -> None:
        self._by_subject[subject][2].append(item)

    def arrived(self, key: Hashable) -> list[Any]:
        """``key``'s tail is in: what was held for its subject, in order."""
        subject = self._subject_of.pop(key, None)
        if subject is None:
            return []
        _, _, held = self._by_subject.pop(subject)
        return held

    def expired(self, now: float) -> list[Any]:
        """What waited longer than ``wait``: released anyway, in order per subject."""
        out: list[Any] = []
        for subject, (key, deadline, held) in list(self._by_subject.items()):
            if now >= deadline:
                del self._by_subject[subject]
                self._subject_of.pop(key, None)
                out.extend(held)
        return out

    def everything(self) -> list[Any]:
        """All that is held (closing: nothing may stay unsaid)."""
        out = [item for _, _, held in self._by_subject.values() for item in held]
        self._by_subject.clear()
        self._subject_of.clear()
        return out

    def __len__(self) -> int:
        return len(self._by_subject)


class EarlyHold:
    """The other end of a run: its first log lines can arrive on the bus before the worker's
    STARTED report (an agent that logs at once, or ends at once: STARTED, READY and TERMINATED
    travel together).  Bus events of a run still ASSIGNED wait here until its STARTED is published
    (or ``wait`` seconds: a report lost on the way is repaired by re-registration; the lines are
    not held hostage to it), at most ``limit`` per run (beyond that the coordinator lets out what
    is held, in order, and the rest goes on as it comes)."""

    def __init__(self, wait: float = WAIT, limit: int = 10_000) -> None:
        self.wait, self.limit = wait, limit
        self._runs: dict[Hashable, tuple[float, list[Any]]] = {}
        #: the runs holding lines, read only (truth-tested without ``__len__``'s Python call)
        self.runs = self._runs

    def add(self, key: Hashable, item: Any, now: float) -> bool:
        """Hold ``item`` of run ``key``; False if this run holds ``limit`` already (send it on)."""
        entry = self._runs.get(key)
        if entry is None:
            entry = self._runs[key] = (now + self.wait, [])
        if len(entry[1]) >= self.limit:
            return False
        entry[1].append(item)
        return True

    def started(self, key: Hashable) -> list[Any]:
        """The run's STARTED is out: what it sent before, in order."""
        entry = self._runs.pop(key, None)
        return entry[1] if entry else []

    def expired(self, now: float) -> list[tuple[Hashable, Any]]:
        out = []
        for key, (deadline, held) in list(self._runs.items()):
            if now >= deadline:
                del self._runs[key]
                out.extend((key, item) for item in held)
        return out

    def everything(self) -> list[tuple[Hashable, Any]]:
        out = [(key, item) for key, (_, held) in self._runs.items() for item in held]
        self._runs.clear()
        return out

    def __len__(self) -> int:
        return len(self._runs)
