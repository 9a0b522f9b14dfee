"""AgentHandle: the coordinator's side of an agent's state and control events, across the network."""

from __future__ import annotations

import threading
from typing import Any, Protocol

from .timeouts import until_done_if_past_max

_READY_OR_LATER = ("READY", "TERMINATED")


class AgentStates:
    """The latest state and worker of every agent, with a condition to wait on (thread-safe)."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[str, str | None, int]] = {}
        self._changed = threading.Condition()
        self._waiting = 0  # threads in wait(): the loop notifies only when somebody listens

    def update_many(self, changes: list[tuple[str, str, str | None, int]]) -> None:
        """Several agents' latest (state, worker, epoch) under one acquisition: the loop hands
        over one batch of decisions at a time (three state changes an agent in a short run)."""
        with self._changed:
            states = self._states
            for name, state, worker, epoch in changes:
                states[name] = (state, worker, epoch)
            if self._waiting:
                self._changed.notify_all()

    def forget(self, name: str) -> None:
        with self._changed:
            self._states.pop(name, None)

    def get(self, name: str) -> tuple[str, str | None, int]:
        with self._changed:
            return self._states.get(name, ("PENDING", None, 0))

    def wait(self, name: str, states: tuple[str, ...], timeout: float | None) -> bool:
        with self._changed:
            self._waiting += 1
            try:
                return self._changed.wait_for(lambda: self._states.get(name, ("",))[0] in states,
                                              until_done_if_past_max(timeout))
            finally:
                self._waiting -= 1


class AgentControl(Protocol):
    """What a handle may ask of its orchestrator (and nothing more)."""

    def execute(self, name: str | None = None) -> None: ...

    def stop_agent(self, name: str, timeout: float | None = None) -> None: ...


class AgentHandle:
    """Returned by ``orchestrator.agent(name)``: watch and drive one agent wherever it runs."""

    def __init__(self, control: AgentControl, name: str, states: AgentStates) -> None:
        self.name = name
        self._control = control
        self._states = states

    @property
    def state(self) -> str:
        """PENDING, RESTARTING, ASSIGNED, STARTED, READY, DISCONNECTED or TERMINATED
        (the values of :class:`AgentState`)."""
        return self._states.get(self.name)[0]

    @property
    def worker(self) -> str | None:
        """The worker it runs (or last ran) on."""
        return self._states.get(self.name)[1]

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the agent is READY (or already finished); False on timeout."""
        return self._states.wait(self.name, _READY_OR_LATER, timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the agent has terminated for good; False on timeout."""
        return self._states.wait(self.name, ("TERMINATED",), timeout)

    def execute(self) -> None:
        """Let an agent held after READY proceed (``Config(hold_after_ready=True)``)."""
        self._control.execute(self.name)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the agent (it is not restarted)."""
        self._control.stop_agent(self.name, timeout)

    def __repr__(self) -> str:
        state, worker, _ = self._states.get(self.name)
        return f"<AgentHandle {self.name} {state} on {worker}>"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, AgentHandle) and other.name == self.name and other._control is self._control

    def __hash__(self) -> int:
        return hash(self.name)
