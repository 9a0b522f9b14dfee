"""What the dashboard shows, kept current by two threads of its own: one asks the coordinator's
control port for status, workers and agents every ``interval`` seconds; one follows the event bus
(its events port) into a bounded buffer the page streams from.  The web handlers only read here, so
a slow browser never slows the coordinator (which answers a handful of requests a second)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from ..client import ControlClient, ControlError
from ..sockets import parse_tcp, with_port
from ..subscriber import EventSubscriber

log = logging.getLogger("pyorchestrate.dashboard")

EVENTS_KEPT = 2000  # events the page can scroll back through
TRACEBACKS_KEPT = 500
AGENTS_SHOWN = 500  # rows of the agents table (errors first)


class Feed:
    def __init__(self, address: str, *, keys: Any = None, key_name: str | None = None, interval: float = 1.0,
                 timeout: float = 5.0) -> None:
        self.address = address
        self.keys, self.key_name = keys, key_name
        self.interval = interval
        self.timeout = timeout
        self.lock = threading.Lock()
        self.status: dict[str, Any] | None = None
        self.agents: list[dict[str, Any]] = []
        self.workers: list[dict[str, Any]] = []
        self.error: str | None = None  # why the last refresh failed ("" / None: it did not)
        self.updated = 0.0
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.event_seq = 0
        self.tracebacks: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._stop = threading.Event()
        self._control = ControlClient(address, keys=keys, key_name=key_name, timeout=timeout)
        #: may this dashboard act (start/stop/...)? an admin key, or no keys at all
        self.can_act = self._control.key is None or self._control.key.role == "admin"
        self._threads = [threading.Thread(target=self._poll, name="dashboard-poll", daemon=True),
                         threading.Thread(target=self._follow, name="dashboard-events", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 2)
        self._control.close()

    # ------------------------------------------------------------ control port

    def act(self, op: str, **args: Any) -> Any:
        """An action for the coordinator, on a connection of its own (the poller owns its socket)."""
        with ControlClient(self.address, keys=self.keys, key_name=self.key_name, timeout=self.timeout,
                           roles=("admin",)) as client:
            return client.request(op, **args)

    def act_query(self, op: str, **args: Any) -> Any:
        """A query outside the poll (history), on a connection of its own."""
        with ControlClient(self.address, keys=self.keys, key_name=self.key_name, timeout=self.timeout,
                           roles=("reader", "admin")) as client:
            return client.request(op, **args)

    def refresh(self) -> None:
        try:
            status = self._control.status()
            workers = self._control.workers()
            agents = self._control.agents(limit=AGENTS_SHOWN)  # the page's rows only: the loop stays lean
        except ControlError as exc:
            with self.lock:
                self.error = str(exc)
            return
        with self.lock:
            self.status, self.workers, self.agents = status, workers, agents
            self.error, self.updated = None, time.time()

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.refresh()
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - started)))

    # ------------------------------------------------------------ event bus

    def events_address(self) -> str | None:
        """The coordinator's events port, at the host we reach its control port on (it may have
        bound 0.0.0.0)."""
        with self.lock:
            status = self.status
        if status is None:
            return None
        events = status["addresses"].get("events")
        if not events:
            return None
        return with_port(self.address, int(parse_tcp(events)[1]))

    def _follow(self) -> None:
        while not self._stop.is_set():
            address = self.events_address()
            if address is None:
                self._stop.wait(0.2)
                continue
            try:
                with EventSubscriber(address, history=True, keys=self.keys, key_name=self.key_name) as sub:
                    while not self._stop.is_set():
                        ev = sub.recv(timeout=0.5)
                        if ev is not None:
                            self._keep(ev)
                        elif not sub.connected and sub.handshake_failure():
                            with self.lock:
                                self.error = f"events: {sub.handshake_failure()}"
                            break
            except Exception as exc:  # a bad address or keys: said on the page, tried again
                with self.lock:
                    self.error = f"events: {exc}"
            self._stop.wait(1.0)

    def _keep(self, ev: Any) -> None:
        if ev.event.endswith("_HEARTBEAT"):
            return  # every second per agent: the tables show heartbeat ages instead
        row = {k: v for k, v in dict(ev).items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
        row["event"], row["subject"] = ev.event, ev.subject
        with self.lock:
            self.event_seq += 1
            row["n"] = self.event_seq
            self.events.append(row)
            if ev.event == "AGENT_ERROR" and ev.get("traceback"):
                self.tracebacks[ev.subject] = str(ev["traceback"])
                self.tracebacks.move_to_end(ev.subject)
                while len(self.tracebacks) > TRACEBACKS_KEPT:
                    self.tracebacks.popitem(last=False)

    def events_after(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["n"] > n]

    def state(self) -> dict[str, Any]:
        """What the page shows: at most AGENTS_SHOWN agents, those with an error first (asked so of
        the coordinator: a page of 10,000 rows twice a second helps nobody; ``pyorchestrate ps``
        lists all)."""
        with self.lock:
            agents = [{**a, "traceback": self.tracebacks.get(a["name"])} for a in self.agents]
            total = self.status["agents"]["total"] if self.status else len(agents)
            return {"status": self.status, "workers": self.workers, "agents": agents, "agents_total": total,
                    "error": self.error, "updated": self.updated, "can_act": self.can_act, "address": self.address}
