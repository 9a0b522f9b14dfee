"""An agent's state on the coordinator, and the only moves between states that are allowed.

Every state change goes through :meth:`StateIndex.move`, which checks this table: an illegal
transition is a bug in the cluster core and raises :class:`IllegalTransition` instead of silently
overwriting what the coordinator believes.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Iterable, Iterator

from .pending import PendingLine, lazily


class AgentState(str, enum.Enum):
    """Where an agent is in its life, as the coordinator sees it (also what ``status()`` and
    :class:`AgentHandle` report)."""

    PENDING = "PENDING"  #: waiting to be placed (dependencies, capacity, min_workers, adoption window)
    RESTARTING = "RESTARTING"  #: its run ended; a restart is scheduled after a back-off (or a lease)
    ASSIGNED = "ASSIGNED"  #: sent to a worker, not yet reported started
    STARTED = "STARTED"  #: its worker reported it running (``setup()`` under way)
    READY = "READY"  #: ``setup()`` finished
    DISCONNECTED = "DISCONNECTED"  #: its worker fell silent; the copy there is kept (on_disconnect="keep")
    TERMINATED = "TERMINATED"  #: its run is over (finished, stopped or failed)

    def __str__(self) -> str:
        return self.value


S = AgentState


def plain_members(enum_class: type[enum.Enum]) -> type:
    """A class holding ``enum_class``'s members as plain class attributes, for hot paths: in
    Python 3.11 reading ``AgentState.READY`` is a descriptor call (~70 ns, against ~16 here), and
    one short run's reports read a few dozen members.  The values are the members themselves."""
    return type(f"{enum_class.__name__}Members", (), dict(enum_class.__members__))

#: state -> the states it may move to
TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    S.PENDING: frozenset({S.ASSIGNED, S.TERMINATED,
                          S.STARTED, S.READY}),  # the last two: adopted from a previous coordinator
    S.RESTARTING: frozenset({S.PENDING, S.TERMINATED}),
    # PENDING: its worker said goodbye without ever starting it (placed again: it never ran)
    S.ASSIGNED: frozenset({S.STARTED, S.TERMINATED, S.DISCONNECTED, S.PENDING}),
    S.STARTED: frozenset({S.READY, S.TERMINATED, S.DISCONNECTED}),
    S.READY: frozenset({S.TERMINATED, S.DISCONNECTED}),
    S.DISCONNECTED: frozenset({S.ASSIGNED, S.STARTED, S.READY, S.TERMINATED}),  # back to what the worker reports
    S.TERMINATED: frozenset({S.PENDING, S.RESTARTING}),
}

#: a copy may be alive on a worker in these states
LIVE = frozenset({S.ASSIGNED, S.STARTED, S.READY, S.DISCONNECTED})
#: a copy is running on a worker that is talking to us
RUNNING = frozenset({S.ASSIGNED, S.STARTED, S.READY})


class IllegalTransition(RuntimeError):
    """The cluster core tried a state change the transitions table forbids (a bug)."""


#: read on every move: a module global, not ``AgentState.PENDING`` (an enum member read is a
#: descriptor call, see plain_members)
_PENDING = AgentState.PENDING


class StateIndex:
    """Agents grouped by state, so the loop asks "which are pending?" or "have all finished?"
    without scanning every agent on every turn (which made thousands of agents quadratic).
    Within a state agents are in the order they entered it: FIFO for placement."""

    def __init__(self) -> None:
        self._by_state: dict[AgentState, dict[str, Any]] = collections.defaultdict(dict)
        #: the PENDING agents again, kept apart by what they wait for (pending.py)
        self.pending = PendingLine()

    def add(self, record: Any) -> None:
        self._by_state[record.state][record.name] = record
        if record.state is _PENDING:
            self.pending.enter(record)

    def remove(self, record: Any) -> None:
        self._by_state[record.state].pop(record.name, None)
        if record.state is _PENDING:
            self.pending.leave(record)
        if self.pending.watched and record.name in self.pending.watched:
            self.pending.wake(record.name)

    def move(self, record: Any, new: AgentState) -> None:
        old = record.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"agent {record.name!r}: {old.value} -> {new.value} is not allowed")
        del self._by_state[old][record.name]
        self._by_state[new][record.name] = record
        record.state = new
        if old is _PENDING:
            self.pending.leave(record)
        elif new is _PENDING:
            self.pending.enter(record)
        if self.pending.watched and record.name in self.pending.watched:
            self.pending.wake(record.name)  # agents waiting for it, or settled, are looked at again

    def count(self, *states: AgentState) -> int:
        return sum(len(self._by_state[s]) for s in states)

    def size(self, state: AgentState) -> int:
        """``count(state)`` for one state, without the generator (asked every loop turn)."""
        return len(self._by_state[state])

    def of(self, state: AgentState) -> list[Any]:
        """The agents in ``state`` now (a copy: the caller may change their states)."""
        return list(self._by_state[state].values())

    def oldest_first(self, state: AgentState) -> Iterator[Any]:
        """The agents in ``state``, oldest first, which the caller may move to other states as it
        goes (copied a slice at a time: see :func:`pending.lazily`)."""
        return lazily(self._by_state[state])

    def first(self, states: Iterable[AgentState]) -> Any:
        for state in states:
            for record in self._by_state[state].values():
                return record
        return None
