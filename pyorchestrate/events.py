"""Orchestrator events: their names, their common fields, and the callback dispatcher."""

from __future__ import annotations

import concurrent.futures
import datetime
import enum
import inspect
import logging
import threading
from typing import Any, Callable

log = logging.getLogger("pyorchestrate.events")


class OrchestratorEvent(str, enum.Enum):
    """What can happen in a cluster.  Register callbacks with ``Orchestrator.register_event``."""

    AGENT_STARTED = "AGENT_STARTED"  #: the agent's thread or process began running
    AGENT_READY = "AGENT_READY"  #: ``setup()`` finished
    AGENT_TERMINATED = "AGENT_TERMINATED"  #: the agent finished, stopped, or failed
    AGENT_ERROR = "AGENT_ERROR"  #: carries ``error_message`` and ``traceback``
    AGENT_HEARTBEAT = "AGENT_HEARTBEAT"  #: a running agent's worker is alive (every heartbeat interval)
    ALL_AGENTS_TERMINATED = "ALL_AGENTS_TERMINATED"  #: nothing is left running
    WORKER_JOINED = "WORKER_JOINED"  #: a worker registered
    WORKER_LOST = "WORKER_LOST"  #: a worker fell silent for ``heartbeat_interval * heartbeat_liveness``
    WORKER_LEFT = "WORKER_LEFT"  #: a worker said goodbye (clean shutdown)
    EVENTS_LOST = "EVENTS_LOST"  #: a gap in a publisher's sequence numbers: ``lost`` events vanished
    SHUTDOWN = "SHUTDOWN"  #: the coordinator is stopping; nothing follows from it

    def __str__(self) -> str:
        return self.value


def stamp(now: datetime.datetime | None = None) -> dict[str, str]:
    """The ``event_date`` / ``event_time`` fields, in local time as PyOrchestrate reports them."""
    now = now or datetime.datetime.now()
    return {"event_date": now.strftime("%Y-%m-%d"), "event_time": now.strftime("%H:%M:%S.%f")}


def _accepted_kwargs(callback: Callable[..., Any]) -> set[str] | None:
    """Names the callback accepts, or None if it takes ``**kwargs`` (everything)."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return None
    names = set()
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names


class EventDispatcher:
    """Runs user callbacks on a bounded thread pool.

    Each callback receives only the keyword arguments its signature accepts; one that raises is
    logged and counted and never affects the others.
    """

    def __init__(self, max_threads: int = 10) -> None:
        self._callbacks: dict[OrchestratorEvent, list[tuple[Callable[..., Any], set[str] | None]]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_threads, thread_name_prefix="pyorchestrate-callback")
        self._pending = 0
        self._idle = threading.Condition()
        self.failures = 0

    def register(self, event: OrchestratorEvent, callback: Callable[..., Any]) -> None:
        if not isinstance(event, OrchestratorEvent):
            try:
                event = OrchestratorEvent(event)
            except ValueError:
                names = ", ".join(e.name for e in OrchestratorEvent)
                raise ValueError(f"unknown event {event!r}; use an OrchestratorEvent ({names})") from None
        if not callable(callback):
            raise TypeError(f"callback for {event.name} must be callable, got {callback!r}")
        self._callbacks.setdefault(event, []).append((callback, _accepted_kwargs(callback)))

    def wants(self, event: OrchestratorEvent) -> bool:
        return bool(self._callbacks.get(event))

    def dispatch(self, event: OrchestratorEvent, fields: dict[str, Any]) -> None:
        for callback, accepted in self._callbacks.get(event, ()):
            kwargs = fields if accepted is None else {k: v for k, v in fields.items() if k in accepted}
            with self._idle:
                self._pending += 1
            try:
                self._pool.submit(self._run, event, callback, kwargs)
            except RuntimeError:  # pool shut down: the orchestrator is gone
                self._done()

    def _run(self, event: OrchestratorEvent, callback: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        try:
            callback(**kwargs)
        except Exception:
            self.failures += 1
            log.exception("callback %s for %s raised; other callbacks are unaffected",
                          getattr(callback, "__qualname__", callback), event.name)
        finally:
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every dispatched callback has returned."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        self.wait_idle(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
