"""Execution modes: where an agent's lifecycle runs when it is started standalone.

Under an orchestrator, a worker runs thread agents in its own process and process agents in a
child it supervises; the mode only tells it which.  Standalone (``agent.start(); agent.join()``)
the mixins below run the agent themselves.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import cloudpickle


class ThreadMode:
    """Runs the agent in a thread of the current process."""

    execution_mode = "thread"
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the agent in a new thread (standalone use)."""
        self._thread = threading.Thread(target=self.run, name=f"agent-{self.name}", daemon=True)  # type: ignore[attr-defined]
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the agent to end; True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _run_pickled(blob: bytes, state: dict[str, Any], control: dict[str, Any]) -> None:
    agent = cloudpickle.loads(blob)
    agent.state_events.replace(state)
    agent.control_events.replace(control)
    raise SystemExit(0 if agent.run() else 1)


class ProcessMode:
    """Runs the agent in a child process (started with ``spawn``: never a fork of a threaded parent)."""

    execution_mode = "process"
    _process: Any = None

    def start(self) -> None:
        """Start the agent in a new process (standalone use)."""
        ctx = multiprocessing.get_context("spawn")
        # process-shared events, so the parent can wait on state and drive control
        for events in (self.state_events, self.control_events):  # type: ignore[attr-defined]
            shared = {name: ctx.Event() for name in events.names()}
            for name, event in shared.items():
                if getattr(events, name).is_set():
                    event.set()
            events.replace(shared)
        blob = cloudpickle.dumps(self)
        self._process = ctx.Process(target=_run_pickled, name=f"agent-{self.name}",  # type: ignore[attr-defined]
                                    args=(blob, self.state_events.as_dict(), self.control_events.as_dict()))  # type: ignore[attr-defined]
        self._process.start()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # process handles and events belong to the parent; the child gets its own
        for key in ("_process", "_report", "_logger", "_inbox", "_bus", "_bus_args", "_bus_log_handler", "_subscriber",
                    "state_events", "control_events"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from . import signals
        from .inbox import Inbox

        self.__dict__.update(state)
        self._inbox = Inbox()
        # the logger, the bus and _report are the class's lazy defaults again (see BaseAgent.logger)
        self.state_events = type(self).StateEvents(signals.LazyEvent)  # type: ignore[attr-defined]
        self.control_events = type(self).ControlEvents(signals.LazyEvent)  # type: ignore[attr-defined]

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the agent's process to end; True if it has."""
        if self._process is None:
            return True
        self._process.join(timeout)
        return self._process.exitcode is not None

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()
