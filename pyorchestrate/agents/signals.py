"""State and control events of an agent (PyOrchestrate's ``StateEvents`` / ``ControlEvents``).

Each is a nested class whose attributes name events; subclass it (``class StateEvents(
BaseAgent.StateEvents): saved_event = None``) to add your own.  An instance holds one real event per
name: ``threading.Event`` for thread agents, a process-shared event for a process agent started
standalone, so ``agent.state_events.ready_event.wait()`` works from the parent in both.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..timeouts import until_done_if_past_max


#: guards the moments a LazyEvent's real Event is made, and any change of a LazyEvent that has
#: one (rare: only events somebody waited on while they were clear have one)
_WAITED_LOCK = threading.Lock()
#: held while an event set's class is walked for its names, and its result kept on it (once a class)
_NAMES_LOCK = threading.Lock()
_make_event = threading.Event  # a name of its own: a test sets the event while one is being made


class LazyEvent:
    """``threading.Event``'s interface, with the Event (a Condition and its lock: ~4 µs to
    create) made only when somebody waits while it is not set.  An agent has six of these and
    most are only ever set or tested, never waited on: a trivial agent's start cost ~25 µs less.

    Making one runs no Python code (no ``__init__``: the class attributes are the defaults), nor
    does setting or testing one nobody waited on: with a lock of its own and an ``__init__``,
    the six of a trivial agent were ~50 of the ~430 lines its worker ran per launch.  Correct
    without a lock on that path because a waiter publishes its Event before it reads the flag
    again, and a setter writes the flag before it looks for an Event: one of them sees the other."""

    _flag = False
    _event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._flag

    isSet = is_set

    def set(self) -> None:
        self._flag = True
        if self._event is not None:  # somebody waits, or waited: set it, unless cleared since
            with _WAITED_LOCK:
                if self._flag:
                    self._event.set()

    def clear(self) -> None:
        with _WAITED_LOCK:
            self._flag = False
            if self._event is not None:
                self._event.clear()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        event = self._event
        if event is None:
            with _WAITED_LOCK:
                event = self._event
                if event is None:
                    event = self._event = _make_event()
                if self._flag:  # set before it could see the Event: it did not set it
                    return True
        return event.wait(until_done_if_past_max(timeout))


class EventSet:
    """A set of named events.  Declare names as class attributes (their values are ignored)."""

    @classmethod
    def names(cls) -> list[str]:
        return list(cls._own_names())

    @classmethod
    def _own_names(cls) -> list[str]:
        cached = cls.__dict__.get("_names")  # this class's own, not a parent's
        if cached is None:
            # under a lock: agents of a class new to this process start at once in their own
            # threads, and one's walk read a class's dict while another wrote ``_names`` into it
            # ("dictionary changed size during iteration" failed an agent in S9; a copy of the
            # keys first was not enough: a collection during the copy can switch threads)
            with _NAMES_LOCK:
                cached = cls.__dict__.get("_names")
                if cached is None:
                    cached = []
                    for klass in reversed(cls.__mro__):
                        for key in vars(klass):
                            if key.endswith("_event") and key not in cached:
                                cached.append(key)
                    cls._names = cached  # every agent start asks: walk the MRO once per class
        return cached

    def __init__(self, make: Callable[[], Any]) -> None:
        # into the instance's dict at once: two sets of three a start, a setattr and a copy of
        # the names each were half of making them
        # (zip stops at the names' end: ``iter(make, None)`` calls make() once per name, at C speed)
        self.__dict__.update(zip(self._own_names(), iter(make, None)))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, events: dict[str, Any]) -> None:
        for name, event in events.items():
            setattr(self, name, event)


class StateEvents(EventSet):
    """Set by the agent as it goes: STARTED, READY (after setup), closed (after on_close)."""

    start_event = None
    ready_event = None
    close_event = None


class ControlEvents(EventSet):
    """Set by whoever drives the agent: it waits for ``setup_event`` before ``setup()`` and for
    ``execute_event`` before its work; ``stop_event`` asks it to stop.  Standalone, setup and
    execute are set for you; under an orchestrator holding agents after READY
    (``Orchestrator.Config(hold_after_ready=True)``), ``orchestrator.execute(name)`` sets
    ``execute_event``."""

    setup_event = None
    execute_event = None
    stop_event = None
