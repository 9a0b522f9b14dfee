"""An agent's state on the coordinator, and the only moves between states that are allowed.

Every state change goes through :meth:`StateIndex.move`, which checks this table: an illegal
transition is a bug in the cluster core and raises :class:`IllegalTransition` instead of silently
overwriting what the coordinator believes.
"""

from __future__ import annotations

import collections
import enum
import itertools
from typing import Any, Iterable, Iterator


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


def particular(record: Any) -> bool:
    """Does a pending agent need a look of its own in a placement pass that found no room (it is
    bound for particular workers, or waits for others: a dependency may have failed)?"""
    return record.pin is not None or bool(record.labels) or bool(record.depends_on)


class StateIndex:
    """Agents grouped by state, so the loop asks "which are pending?" or "have all finished?"
    without scanning every agent on every turn (which made thousands of agents quadratic).
    Within a state agents are in the order they entered it: FIFO for placement."""

    def __init__(self) -> None:
        self._by_state: dict[AgentState, dict[str, Any]] = collections.defaultdict(dict)
        #: the PENDING agents that need a look of their own, oldest first: bound for particular
        #: workers (a pin or labels) or waiting for others (dependencies).  Once no worker has room,
        #: or no slot is left under max_workers, placement looks only at these (ClusterCore._to_place)
        self._particular: dict[str, Any] = {}

    def add(self, record: Any) -> None:
        self._by_state[record.state][record.name] = record
        if record.state is S.PENDING and particular(record):
            self._particular[record.name] = record

    def remove(self, record: Any) -> None:
        self._by_state[record.state].pop(record.name, None)
        if record.state is S.PENDING:
            self._particular.pop(record.name, None)

    def move(self, record: Any, new: AgentState) -> None:
        old = record.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"agent {record.name!r}: {old.value} -> {new.value} is not allowed")
        del self._by_state[old][record.name]
        self._by_state[new][record.name] = record
        record.state = new
        if (old is S.PENDING or new is S.PENDING) and particular(record):
            if new is S.PENDING:
                self._particular[record.name] = record
            else:
                self._particular.pop(record.name, None)

    def count(self, *states: AgentState) -> int:
        return sum(len(self._by_state[s]) for s in states)

    def size(self, state: AgentState) -> int:
        """``count(state)`` for one state, without the generator (asked every loop turn)."""
        return len(self._by_state[state])

    def of(self, state: AgentState) -> list[Any]:
        """The agents in ``state`` now (a copy: the caller may change their states)."""
        return list(self._by_state[state].values())

    def oldest_first(self, state: AgentState, head: int = 512) -> Iterator[Any]:
        """The agents in ``state``, oldest first, which the caller may move to other states as it
        goes: copied ``head`` at a time, then the rest at once.  A placement pass usually stops
        early (its quota placed, or no room left), and a copy of every pending agent in each pass
        made a burst of 40,000 agents over full workers quadratic (with :meth:`particular_pending`:
        4,074 agents a second, the coordinator's loop 90 % in placement)."""
        agents = self._by_state[state]
        first = list(itertools.islice(agents.values(), head))
        yield from first
        if len(first) < head:
            return
        seen = {id(record) for record in first}
        for record in list(agents.values()):
            if id(record) not in seen:
                yield record

    def particular_pending(self) -> list[Any]:
        """The PENDING agents that need a look of their own (see ``_particular``), oldest first (a copy)."""
        return list(self._particular.values())

    def refresh(self, record: Any) -> None:
        """``record`` was given dependencies: a PENDING one now needs a look of its own."""
        if record.state is S.PENDING and particular(record):
            self._particular[record.name] = record

    def first(self, states: Iterable[AgentState]) -> Any:
        for state in states:
            for record in self._by_state[state].values():
                return record
        return None
