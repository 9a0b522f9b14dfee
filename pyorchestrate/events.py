"""Orchestrator events: their names, their common fields, and the callback dispatcher."""

from __future__ import annotations

import collections
import datetime
import enum
import inspect
import logging
import queue
import threading
import time
from typing import Any, Callable

from . import trace

log = logging.getLogger("pyorchestrate.events")


class OrchestratorEvent(str, enum.Enum):
    """What can happen in a cluster.  Register callbacks with ``Orchestrator.register_event``."""

    AGENT_STARTED = "AGENT_STARTED"  #: the agent's thread or process began running
    AGENT_READY = "AGENT_READY"  #: ``setup()`` finished
    AGENT_TERMINATED = "AGENT_TERMINATED"  #: the agent finished, stopped, or failed
    AGENT_ERROR = "AGENT_ERROR"  #: carries ``error_message`` and ``traceback``
    AGENT_RESTARTING = "AGENT_RESTARTING"  #: a restart is scheduled: ``attempt``, ``delay``, ``reason``
    AGENT_DISCONNECTED = "AGENT_DISCONNECTED"  #: its worker fell silent; the copy there is kept running (on_disconnect="keep")
    AGENT_ADOPTED = "AGENT_ADOPTED"  #: a running copy was taken back (its worker returned, or a restarted coordinator adopted it): ``reason``, ``state``
    AGENT_HEARTBEAT = "AGENT_HEARTBEAT"  #: a running agent's worker is alive (every heartbeat interval)
    AGENT_LOG = "AGENT_LOG"  #: a log record of an agent: ``level``, ``logger``, ``message``
    AGENT_EVENT = "AGENT_EVENT"  #: ``self.publish(topic, **data)``: ``topic``, ``data``
    ALL_AGENTS_TERMINATED = "ALL_AGENTS_TERMINATED"  #: nothing is left running
    WORKER_JOINED = "WORKER_JOINED"  #: a worker registered
    WORKER_LOST = "WORKER_LOST"  #: a worker fell silent for ``heartbeat_interval * heartbeat_liveness``
    WORKER_LEFT = "WORKER_LEFT"  #: a worker said goodbye (clean shutdown)
    EVENTS_LOST = "EVENTS_LOST"  #: a gap in a publisher's sequence numbers: ``lost`` events vanished
    SHUTDOWN = "SHUTDOWN"  #: the coordinator is stopping; nothing follows from it

    def __str__(self) -> str:
        return self.value


_second: tuple[int, str, str] = (-1, "", "")  # the last second formatted: (epoch second, date, time)


def stamp(now: datetime.datetime | None = None) -> dict[str, str]:
    """The ``event_date`` / ``event_time`` fields, in local time as PyOrchestrate reports them."""
    global _second
    if now is not None:
        return {"event_date": now.strftime("%Y-%m-%d"), "event_time": now.strftime("%H:%M:%S.%f")}
    # every event is stamped: format the date and time once a second, not twice per event
    t = time.time()
    second = int(t)
    cached = _second  # one read: another thread may replace it meanwhile
    if cached[0] != second:
        local = time.localtime(second)
        cached = _second = (second, time.strftime("%Y-%m-%d", local), time.strftime("%H:%M:%S", local))
    return {"event_date": cached[1], "event_time": f"{cached[2]}.{int((t - second) * 1e6):06d}"}


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


#: events that change no state (an agent's logs, its own events, its heartbeats): their callbacks are
#: dropped, and counted, while more than MAX_BACKLOG events wait for callbacks. A callback slower
#: than the events it gets otherwise grew the coordinator's memory without bound (2 ms a call and
#: one chatty agent: 15 MB a second) and held each agent's lifecycle callbacks behind its backlog.
#: Lifecycle and worker events are never dropped.
DROPPABLE = frozenset({OrchestratorEvent.AGENT_LOG, OrchestratorEvent.AGENT_EVENT, OrchestratorEvent.AGENT_HEARTBEAT})
MAX_BACKLOG = 10_000


class EventDispatcher:
    """Runs user callbacks on a bounded set of runner threads.

    Each callback receives only the keyword arguments its signature accepts; one that raises is
    logged and counted and never affects the others.  Callbacks for one subject (an agent or a
    worker) run one at a time, in event order; different subjects run in parallel.

    One thread dispatches (the coordinator's loop) and it never waits on a lock: it puts events
    (one batch of its decisions at a time, see :meth:`hold`) into a queue the runners take from.
    One runner at a time (the *leader*) waits on that queue, so batches are filed by subject in
    the order they were handed over; it files a batch's events under the dispatcher's lock (a
    subject not being run goes on the *ready* list), gives up the lead and runs the first ready
    subject itself (one hand-over from the loop to a callback, not two).  The other runners sleep
    until woken: by a runner that left ready subjects behind, or by the loop when it hands over a
    batch while nobody leads.  A runner that finishes a subject takes a ready one, or leads.  So
    one batch costs one wake-up however many runners there are, a batch of many subjects wakes at
    most one runner per runner, and a slow callback holds up only its own subject (each wake is
    a thread switch that also takes the GIL from the loop: S3 spent a sixth of the coordinator's
    CPU on its callbacks when every subject and every filed batch woke runners).  A subject
    being run takes further events in its own queue, in order.
    """

    def __init__(self, max_threads: int = 10) -> None:
        self._callbacks: dict[OrchestratorEvent, list[tuple[Callable[..., Any], tuple[str, ...] | None]]] = {}
        self._max_threads = max(1, max_threads)
        self._runners: list[threading.Thread] = []
        # taken with the plain lock (C-level enter/exit) on every hand-over; the Condition on it is
        # only for wait_idle: a Condition's own enter/exit are Python calls, ~5 % of the
        # coordinator's time in S3 (py-spy)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._leader = False  # a runner waits on _incoming (under _lock; the loop reads it bare)
        self._sleeping = 0  # runners waiting on _wake (under _lock; the loop reads it bare)
        self._wake: queue.SimpleQueue = queue.SimpleQueue()  # a token wakes one sleeping runner
        self._queues: dict[str, collections.deque] = {}  # subjects ready or being run -> their events
        self._ready: collections.deque[str] = collections.deque()  # subjects no runner has taken yet
        self._dispatched = 0  # written by the dispatching thread only
        self._done = 0  # under _lock
        self._waiting = 0  # wait_idle callers, under _lock: only they need a notify
        # in a runner: the events of the batch it is running (not done until it returns), which
        # wait_idle called from one of their callbacks must not wait for (stop() in a callback
        # waited 15 s for itself, the script's join() long returned: plugins never finalized)
        self._running = threading.local()
        self.failures = 0
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._held: list | None = None  # events of the loop's current batch (see hold())
        self._holding = 0
        self.max_backlog = MAX_BACKLOG
        #: told of each callback dropped (kind, detail): the coordinator counts them with what it drops
        self.on_drop: Callable[[str, str], None] = lambda kind, detail: None

    def register(self, event: OrchestratorEvent, callback: Callable[..., Any]) -> None:
        if not isinstance(event, OrchestratorEvent):
            try:
                event = OrchestratorEvent(event)
            except ValueError:
                names = ", ".join(e.name for e in OrchestratorEvent)
                raise ValueError(f"unknown event {event!r}; use an OrchestratorEvent ({names})") from None
        if not callable(callback):
            raise TypeError(f"callback for {event.name} must be callable, got {callback!r}")
        self._start_runners()
        accepted = _accepted_kwargs(callback)
        self._callbacks.setdefault(event, []).append((callback, None if accepted is None else tuple(sorted(accepted))))

    def _start_runners(self) -> None:
        # here, in the thread that registers a callback, and never in the coordinator's loop:
        # each Thread.start() waits until the new thread runs, and on a loaded machine ten of
        # them held the loop long enough for a worker to be taken for lost (seen beside 4 CPU
        # burners with a 0.5 s window)
        with self._lock:
            if self._runners:
                return
            for i in range(self._max_threads):
                runner = threading.Thread(target=self._run, name=f"pyorchestrate-callback_{i}", daemon=True)
                runner.start()
                self._runners.append(runner)

    def wants(self, event: OrchestratorEvent) -> bool:
        return bool(self._callbacks.get(event))

    def dispatch(self, event: OrchestratorEvent, fields: dict[str, Any]) -> None:
        """Queue the callbacks of ``event``.  Never blocks: the coordinator's loop calls this, and
        it must not wait on a lock a callback thread holds (a thread preempted while holding it
        keeps it until it gets the GIL back, behind every other busy thread)."""
        callbacks = self._callbacks.get(event)
        if not callbacks or self._closed:
            return
        # the backlog first: an enum member's hash is a Python call, and this runs for every event
        if self._dispatched - self._done > self.max_backlog and event in DROPPABLE:  # _done read bare: an int
            self.on_drop("callback_backlog", f"{event.name} callbacks: more than {self.max_backlog:,} events wait "
                         "for callbacks (make them faster; lifecycle callbacks are never dropped)")
            return
        self._dispatched += 1
        if self._held is not None:
            self._held.append((event, callbacks, fields))
            return
        self._hand_over([(event, callbacks, fields)])

    def _hand_over(self, batch: list) -> None:
        # runners exist: only events with a callback are handed over, and registering one
        # started them
        self._incoming.put(batch)
        # read without the lock (the loop never waits on it): a leader that is giving up the lead
        # just now looks at _incoming after it did, so one of us sees the other
        if not self._leader and self._sleeping:
            self._wake.put(True)

    def hold(self) -> None:
        """Keep what is dispatched until :meth:`release` (calls nest), then hand it all over at once.

        The loop holds while it carries out one batch of decisions: a runner would otherwise
        wake at the first event and take the GIL from the loop at each of its next sends (every
        ZeroMQ send lets the GIL go), and one hand-over a batch costs one wake-up, not one an
        event.  Only the thread that dispatches may call this."""
        self._holding += 1
        if self._held is None:
            self._held = []

    def release(self) -> None:
        self._holding -= 1
        if self._holding > 0:
            return
        held, self._held = self._held, None
        if held:
            self._hand_over(held)

    def flush(self) -> None:
        """Hand over what is held now (and go on holding): before anything that lets another
        thread call :meth:`wait_idle`, which must count these."""
        if self._held:
            held, self._held = self._held, []
            self._hand_over(held)

    def _run(self) -> None:
        lock, ready = self._lock, self._ready
        while True:
            subject, lead, wake = None, False, False
            with lock:
                if ready:
                    subject = ready.popleft()
                    wake = bool(ready) and self._sleeping > 0  # more to run: one more runner
                elif not self._leader:
                    self._leader = lead = True
                else:
                    self._sleeping += 1
            if wake:
                self._wake.put(True)
            if subject is not None:
                self._drain(subject)
                continue
            if not lead:
                token = self._wake.get()
                with lock:
                    self._sleeping -= 1
                if token is None:
                    return
                continue
            batch = self._incoming.get()
            with lock:
                self._leader = False
                if batch is not None:
                    self._file(batch)
                    subject = ready.popleft() if ready else None
                wake = (bool(ready) or not self._incoming.empty()) and self._sleeping > 0
            if wake:
                self._wake.put(True)
            if batch is None:
                return
            if subject is not None:
                self._drain(subject)

    def _file(self, batch: list) -> None:
        """Under ``_lock``: each event to its subject's queue, in order."""
        queues = self._queues
        for one in batch:
            fields = one[2]
            subject = str(fields.get("agent_name") or fields.get("worker") or "")
            pending = queues.get(subject)
            if pending is None:  # nobody runs this subject: it waits for a runner
                queues[subject] = collections.deque((one,))
                self._ready.append(subject)
            else:  # its runner takes this too, after what it has
                pending.append(one)

    def _drain(self, subject: str) -> None:
        lock = self._lock
        with lock:
            pending = self._queues[subject]
            # every event the subject has now, in order (a short run's three come together): one
            # acquisition of the lock for them all, not one each
            taken = list(pending)
            pending.clear()
        running = self._running
        while True:
            running.count = len(taken)
            for event, callbacks, fields in taken:
                if trace.enabled and event is OrchestratorEvent.AGENT_TERMINATED:
                    trace.mark("callback", str(fields.get("agent_name")))
                for callback, accepted in callbacks:
                    # the names it takes that the event has.  A comprehension over the callback's
                    # few names, not ``fields.keys() & accepted`` + ``dict(zip(...))``: that looked
                    # cheaper in traced lines but walks all of the event's ~13 keys into a new set,
                    # 1.5-1.9 against 0.7-1.1 us a call here (timeit, 1-6 names, CPython 3.11)
                    if accepted is None:
                        kwargs = fields
                    else:
                        kwargs = {name: fields[name] for name in accepted if name in fields}
                    try:
                        callback(**kwargs)
                    except Exception:
                        self.failures += 1
                        log.exception("callback %s for %s raised; other callbacks are unaffected",
                                      getattr(callback, "__qualname__", callback), event.name)
                    except SystemExit as exc:
                        # sys.exit() here would end this runner only, holding its subject: the
                        # agent's later callbacks never ran.  In a thread it ends nothing else
                        self.failures += 1
                        log.error("callback %s for %s called sys.exit(%r): callbacks run in threads of their "
                                  "own, where that ends nothing; to end the script, call orchestrator.stop() "
                                  "and exit from its main thread", getattr(callback, "__qualname__", callback),
                                  event.name, exc.code)
            with lock:  # one acquisition: these events done, and what came meanwhile taken
                running.count = 0
                self._done += len(taken)
                if self._waiting:
                    self._idle.notify_all()
                if not pending:
                    del self._queues[subject]
                    return
                taken = list(pending)
                pending.clear()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every callback dispatched so far has returned; called from a callback, all
        but those of the batch its thread is running."""
        # what is held has not been handed over
        wanted = self._dispatched - len(self._held or ()) - getattr(self._running, "count", 0)
        with self._lock:
            self._waiting += 1
            try:
                return self._idle.wait_for(lambda: self._done >= wanted, timeout)
            finally:
                self._waiting -= 1

    def close(self, timeout: float = 5.0) -> None:
        self.wait_idle(timeout)
        self._closed = True
        for _ in self._runners:  # whether a runner leads or sleeps, a None ends it
            self._incoming.put(None)
            self._wake.put(None)
