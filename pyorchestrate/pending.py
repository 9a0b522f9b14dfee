"""The pending agents, in the order placement looks at them, kept apart by what they wait for.

A placement pass looks at pending agents oldest first.  Looking at every one of them in every pass
made bursts quadratic: 40,000 agents over two full workers went at 4,074 a second (the
coordinator's loop 90 % in placement), 20,000 under ``max_workers=40`` took 10.2 s, 20,000 pinned
to one full worker 18.1 s.  Kept apart, a pass skips a whole kind at once: the agents that may go
anywhere once no worker has room (or no slot is left), those bound for the same workers (the same
pin and labels) once those have none.  Agents with dependencies are looked at in every pass (a
dependency that failed fails them), except those found waiting for one (parked) and those whose
dependencies were all met but found no room (settled: they wait for room with the agents of their
kind; 20,000 agents waiting for one setup agent over two workers of capacity 20 took 16.9 s when
each was looked at in every pass), both until a dependency that may change their verdict changes
state (PendingLine._watched_by).  The kinds are merged back into one line by the order the agents
entered it, so placement stays first come, first served.
"""

from __future__ import annotations

import heapq
import itertools
from operator import attrgetter
from typing import Any, Callable, Iterator

#: the order an agent entered the line in (AgentRecord.queued)
_queued = attrgetter("queued")


def _in_line(item: tuple[str, Any]) -> int:
    return item[1].queued


def target(record: Any) -> tuple | None:
    """The workers an agent is bound for, as a key (its pin and labels), or None: it may go anywhere."""
    if record.pin is None and not record.labels:
        return None
    return record.pin, tuple(record.labels.items())


def lazily(agents: dict[str, Any], stop: Callable[[], bool] | None = None, head: int = 512) -> Iterator[Any]:
    """``agents``' values in order, which the caller may remove from ``agents`` as it goes: copied
    ``head`` at a time, then the rest at once, so a pass that stops early copies little.  Ends as
    soon as ``stop()`` says so (asked before each after the first)."""
    first = list(itertools.islice(agents.values(), head))
    if stop is None:
        yield from first
    else:
        for i, record in enumerate(first):
            if i and stop():
                return
            yield record
    if len(first) < head:
        return
    seen = {id(record) for record in first}
    for record in list(agents.values()):
        if id(record) not in seen:
            if stop is not None and stop():
                return
            yield record


class PendingLine:
    """The PENDING agents of a :class:`~pyorchestrate.states.StateIndex`, by kind, each kind in the
    order its agents entered the line."""

    def __init__(self) -> None:
        self._count = itertools.count(1)
        self.anywhere: dict[str, Any] = {}  #: no pin, no labels, no dependencies
        self.bound: dict[tuple, dict[str, Any]] = {}  #: by target(): those with a pin or labels
        #: those with dependencies (bound ones as well) to be looked at in the next pass...
        self.waiting: dict[str, Any] = {}
        #: waiting is in the order its agents entered the line (woken ones go back in their place
        #: when a pass asks, once: sorted at each wake, 10,000 pairs of agents registered at once,
        #: one of each depending on the other, took 8.76 s on 2 workers; 1.5 s now)
        self._waiting_sorted = True
        #: ...and those taken out of it: found waiting for a dependency (parked: 20,000 agents waiting
        #: for one that does not start cut other agents' launches from 25,494 to 5,377 a second
        #: when every pass looked at each of them), or with every dependency met but no room
        #: (settled).  dependency -> those it may change the verdict of: back in ``waiting`` when
        #: it changes state (see _watched_by)
        self.watched: dict[str, dict[str, Any]] = {}
        #: the settled ones that may go anywhere: left out with the agents that may go anywhere (a
        #: bound one waits in its target's group, where it is already)
        self.settled: dict[str, Any] = {}
        self._settled_sorted = True  #: settled is in the order its agents entered the line
        self.woke = False  #: agents were woken (placement should look again), until it is told

    def enter(self, record: Any) -> None:
        record.queued = next(self._count)
        if record.pin is None and not record.labels and not record.depends_on:
            self.anywhere[record.name] = record  # most agents: no call to target() (S3: 2,000 in 0.1 s)
            return
        bound_for = target(record)
        if bound_for is not None:
            self.bound.setdefault(bound_for, {})[record.name] = record
        elif not record.depends_on:
            self.anywhere[record.name] = record
        if record.depends_on:
            self.waiting[record.name] = record

    def leave(self, record: Any) -> None:
        name = record.name
        if self.anywhere.pop(name, None) is not None:
            return  # (an agent that may go anywhere is of no other kind)
        bound_for = target(record)
        if bound_for is not None:
            group = self.bound.get(bound_for)
            if group is not None:
                group.pop(name, None)
                if not group:
                    del self.bound[bound_for]
        if record.depends_on:
            self.waiting.pop(name, None)
            self._unwatch(record)

    def park(self, record: Any, dependency: str) -> None:
        """A pending ``record`` waits for ``dependency``: left out of the line until that one, or
        one before it in its ``depends_on``, changes state (:meth:`wake`)."""
        self.waiting.pop(record.name, None)
        self._unwatch(record)  # (a bound one, looked at again in its target's group: watched already)
        record.parked_on = dependency
        self._watch(record)

    def settle(self, record: Any) -> None:
        """A pending ``record``'s dependencies are all met, but it found no room: it waits for room
        with the agents of its kind, left out with them (a bound one is in its target's group
        already), until one of its dependencies changes state (:meth:`wake`: looked at for them
        again).  Placement looks at its dependencies again before it places it."""
        if self.waiting.pop(record.name, None) is None:
            return  # settled already, or without dependencies (or a bound one, looked at in its group)
        record.settled = True
        if target(record) is None:
            if self.settled and record.queued < next(reversed(self.settled.values())).queued:
                self._settled_sorted = False  # (woken after newer ones were settled)
            self.settled[record.name] = record
        self._watch(record)

    @staticmethod
    def _watched_by(record: Any) -> list[str]:
        """The dependencies whose change may change what placement says of ``record``: all of a
        settled one's (any may fail, or be met no longer); of a parked one, those up to the one
        it waits for.  Placement looks at them in order and stops at the first not met, which
        it names (and it fails only if that one failed), so one after it changes nothing: 5,000
        agents parked on the first of 200 services, woken by each of the others starting, took
        124.8 s of placement (0.01 s watching only the first).  (Dependencies added later go at
        the end: the list's start does not change.)"""
        deps = record.depends_on
        if record.settled:
            return deps
        return deps[:deps.index(record.parked_on) + 1]

    def _watch(self, record: Any) -> None:
        for dependency in self._watched_by(record):
            self.watched.setdefault(dependency, {})[record.name] = record

    def _unwatch(self, record: Any) -> None:
        if record.settled or record.parked_on is not None:
            for dependency in self._watched_by(record):
                group = self.watched.get(dependency)
                if group is not None:
                    group.pop(record.name, None)
                    if not group:
                        del self.watched[dependency]
        record.parked_on = None
        if record.settled:
            record.settled = False
            self.settled.pop(record.name, None)

    def wake(self, dependency: str) -> None:
        """``dependency`` changed state: the agents parked or settled whose verdict it may change
        (:meth:`_watched_by`) are back in the line, in their place (from the next pass)."""
        group = self.watched.pop(dependency, None)
        if not group:
            return
        self.woke = True
        for record in group.values():
            self._unwatch(record)
        self.waiting.update(group)
        self._waiting_sorted = False

    def gained_dependencies(self, record: Any) -> None:
        """A pending ``record`` was given dependencies (add_dependency): it keeps its place."""
        self.anywhere.pop(record.name, None)
        self._unwatch(record)
        if record.name not in self.waiting:
            self.waiting[record.name] = record
            self._waiting_sorted = False

    def for_placement(self, anywhere_stops: Callable[[], bool],
                      bound_stops: Callable[[tuple], bool]) -> Iterator[Any]:
        """The line oldest first, leaving out the agents that may go anywhere once
        ``anywhere_stops()``, and those bound for a target once ``bound_stops(target)``.  An agent
        with dependencies comes in every case unless parked or settled; a settled one comes with
        its kind, as if it had none (a bound one in its target's group, so twice when neither,
        and even when parked: looking again changes nothing)."""
        if not self.bound and not self.waiting and not self.settled:
            return lazily(self.anywhere, anywhere_stops)  # the common case: one kind, nothing to merge
        if not self._waiting_sorted:  # (woken, or given dependencies: back in their place)
            self.waiting = dict(sorted(self.waiting.items(), key=_in_line))
            self._waiting_sorted = True
        if not self._settled_sorted:
            self.settled = dict(sorted(self.settled.items(), key=_in_line))
            self._settled_sorted = True
        streams = [lazily(self.anywhere, anywhere_stops), lazily(self.settled, anywhere_stops), lazily(self.waiting)]
        # (a target's group most often stops at its first, full: a short first slice, since a
        # pass opens every group; 20,000 agents pinned over 100 full workers, 0.31 -> 0.24 s of
        # placement over 100 passes)
        streams += [lazily(group, lambda bound_for=bound_for: bound_stops(bound_for), head=8)
                    for bound_for, group in self.bound.items()]
        return heapq.merge(*streams, key=_queued)
