"""Runs the agents assigned to this worker and reports what happens to them.

Thread agents run in this process.  Process agents run in children started by a forkserver (never
a fork of this threaded process); a watcher thread per child relays its events and reports its
death the moment it exits, without waiting for heartbeats.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import multiprocessing
# RawArray (a process agent's tally) imports it at its first use: here, at start, not in the loop
import multiprocessing.sharedctypes  # noqa: F401
import os
import queue
import signal
import socket
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from pyorchestrate import own_threads, publisher, shipping, trace
from pyorchestrate.agents.base import AGENT_LOGGERS
from pyorchestrate.agents.inbox import tally_fields
from pyorchestrate.events import stamp
from pyorchestrate.log_thread import deferrable

from . import child, clock, stack_dump, watch
from .agent_threads import AgentThreads
from .child_link import ChildLink
from .handoff import Handoff
from .hosts import AgentHost
from .lease_guard import Lease
from .errors import error_fields, how_it_exited

log = deferrable(logging.getLogger("pyorchestrate.worker.supervisor"))

# agent name, run, epoch, event name, fields
Report = Callable[[str, str, int, str, dict], None]
# one copy: (agent name, run, epoch)
Key = tuple[str, str, int]

_CLASS_CACHE_SIZE = 256


def _stderr_level() -> int:
    """The level this worker prints at (its handlers' level), for its children to copy."""
    levels = [h.level for h in logging.getLogger().handlers if h.level]
    return min(levels) if levels else logging.INFO


@dataclass(slots=True)
class Running:
    name: str
    run: str  #: the coordinator incarnation that started it
    epoch: int
    mode: str
    keep: bool = False  #: keeps running while no coordinator can be reached
    coordinator: str = ""  #: the name of the coordinator that started it
    definition: str = ""
    ready: bool = False
    process: Any = None  # process agents
    conn: Any = None
    link: ChildLink | None = field(default=None, repr=False)  #: how the loop sends on ``conn`` (child_link.py)
    tally: Any = field(default=None, repr=False)  #: its inbox's (taken, dropped), shared with its process
    terminated: bool = False
    stop_requested_at: float | None = None
    stop_timeout: float = 10.0
    forced: bool = False  #: it ignored a stop past its timeout
    #: stopped because the lease ran out: the coordinator starts its replacement elsewhere at the
    #: end of its stop timeout (and a margin), so a process agent is killed at that end, not
    #: terminated first and killed 2 s later (they overlapped)
    deadline: bool = False
    #: its worker's shutdown asked it to stop (before it ended): its end says so, and the
    #: coordinator starts it again elsewhere, as after a drain, rather than taking the end for its own
    leaving: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)
    host: AgentHost | None = field(default=None, repr=False)  #: thread agents run by an agent host
    slot: int = 0  #: its number in that host
    local: bool = False  #: a thread agent run in this process (counted in _local_threads)
    #: the way in to a thread agent of this process, which its own thread makes (handoff.py)
    handoff: Handoff | None = field(default=None, repr=False)

    @property
    def key(self) -> Key:
        return (self.name, self.run, self.epoch)

    @property
    def tag(self) -> str:
        return f"{self.run}.{self.epoch}"

    def report(self) -> dict[str, Any]:
        """What the worker tells a coordinator it registers with about this copy."""
        return {"agent": self.name, "run": self.run, "epoch": self.epoch, "state": "READY" if self.ready else "STARTED",
                "coordinator": self.coordinator, "definition": self.definition,
                "stopping": self.stop_requested_at is not None}


def _messages_lost(record: Running) -> dict[str, int]:
    """What a process agent that ended without a word of its own took and dropped, as its tally
    says (its end would have said both): the coordinator counts the rest of what it sent as
    unhandled, wherever it was (its inbox, the pipe, the link's backlog; Core._count_lost_messages)."""
    return {} if record.tally is None else tally_fields(record.tally)


class Supervisor:
    """Starts, stops and watches agents; every lifecycle event goes to ``report``."""

    def __init__(self, report: Report, worker_name: str, bus: publisher.BusOutbox | None = None,
                 threads_per_process: int = 0) -> None:
        self._report = report
        #: most thread agents run in this process, then in agent hosts of as many each (0: no hosts;
        #: see host.py)
        self.threads_per_process = threads_per_process
        self._local_threads = 0  # thread agents placed in this process and not yet forgotten
        self._hosts: list[AgentHost] = []
        self._slots = itertools.count(1)
        self._host_numbers = itertools.count(1)
        #: where agents' bus events wait for the worker's loop (None: no bus)
        self.bus = bus
        self._worker_name = worker_name
        self._lock = threading.Lock()
        self._agents: dict[Key, Running] = {}
        # what the loop needs without walking every agent (thousands run at once): copies by
        # agent name, copies that ended (appended by agent threads), copies asked to stop
        self._by_name: dict[str, list[Key]] = {}
        self._ended: collections.deque[Key] = collections.deque()
        self._stopping: set[Key] = set()
        # threads are started by a thread of their own: Thread.start() waits until the new
        # thread runs, and with thousands of agent threads queued for the GIL that wait took 11 s
        # in one loop turn (the worker fell silent and was declared lost)
        self._to_start: queue.SimpleQueue[tuple[Callable[[], None], Callable[[BaseException], None] | None] | None] = \
            queue.SimpleQueue()  # (start, failed); None: stop
        self._starter: threading.Thread | None = None
        #: the threads thread agents run on (reused, isolated: see agent_threads.py)
        self.threads = AgentThreads()
        self._blobs: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._classes: dict[str, tuple[type, type]] = {}
        self._unpacking = threading.Lock()  # taken by agent threads only: an import may take seconds
        self.events_address: str | None = None
        self.events_key: Any = None  # the worker's key (ClientKey) when the coordinator uses keys
        self.host = socket.gethostname()
        self._mp = multiprocessing.get_context("forkserver")
        self._processes_started = False  #: a process agent was started (see renew_lease)
        #: the worker's lease as its loop last renewed it, which holds its thread agents that do
        #: not keep running (lease_guard.Lease; the loop sets ``until``)
        self.lease = Lease()
        # (sharedctypes: the tally of a process agent's inbox; imported in each child instead, it
        # made a process agent's launch 11 -> 19 ms)
        self._mp.set_forkserver_preload(["pyorchestrate_worker.child", "pyorchestrate_worker.host",
                                         "multiprocessing.sharedctypes"])
        if AGENT_LOGGERS.level == logging.NOTSET:
            AGENT_LOGGERS.setLevel(logging.INFO)  # agents' INFO records reach the bus
        # a weak reference: a hook cannot be unregistered, and a process may make several of us
        os.register_at_fork(after_in_child=functools.partial(_forked, weakref.ref(self)))

    def forked(self) -> None:
        """In a copy of the worker that an agent forked (``os.fork``, a fork-started
        ``multiprocessing`` child): close the worker's ends of its children's pipes.  The copy
        inherits them, and while it held them a process agent or agent host never saw its worker
        die (its pipe never closed): it ran on beside the copy the coordinator started elsewhere.
        Runs with only the forking thread alive: no lock is taken (its holder may be gone)."""
        conns = [r.conn for r in list(self._agents.values()) if r.conn is not None]
        conns += [h.conn for h in self._hosts]
        for conn in conns:
            try:
                conn.close()  # this copy's object: nothing is sent, the worker's own is untouched
            except OSError:
                pass

    # ------------------------------------------------------------------ queries

    def running(self) -> list[dict[str, Any]]:
        """Reports of the copies still running.  A copy leaves this list only after its
        TERMINATED report was queued (see ``_finished``), so the two together are complete."""
        with self._lock:
            return [r.report() for r in self._agents.values() if not r.terminated]

    def _bus_sink(self) -> Callable[[publisher.Item], None] | None:
        return self.bus.put if self.bus is not None else None

    def count(self, include_stuck: bool = True) -> int:
        """Agents still running; ``include_stuck=False`` leaves out threads that ignored a stop
        past their timeout (they cannot be killed, so nobody should wait for them)."""
        with self._lock:
            return sum(not r.terminated and (include_stuck or not (r.forced and r.mode == "thread"))
                       for r in self._agents.values())

    def threads_past(self, lease_end: float, now: float) -> list[str]:
        """Thread agents (here or in an agent host) that the lease covers (not kept) and that still
        run past ``lease_end`` (or their stop request, if later: the orphan timeout's) + their stop
        timeout: when their replacements are due elsewhere.  (Process agents are killed then:
        ``enforce_stop_timeouts``.)"""
        with self._lock:
            return [r.name for r in self._agents.values()
                    if r.mode == "thread" and not r.keep and not r.terminated
                    and now >= max(lease_end, r.stop_requested_at or lease_end) + r.stop_timeout]

    def local_threads_due(self, lease_end: float) -> float | None:
        """When the first replacement of a thread agent running in this process (not in an agent
        host) is due elsewhere if the lease ended at ``lease_end`` (its end plus the agent's stop
        timeout); None if none runs here."""
        with self._lock:
            return min((lease_end + r.stop_timeout for r in self._agents.values()
                        if r.local and not r.terminated), default=None)

    def keeps_any(self) -> bool:
        """Does a copy that keeps running without a coordinator run here (in any of our processes)?"""
        with self._lock:
            return any(r.keep and not r.terminated for r in self._agents.values())

    def longest_stop_timeout(self) -> float:
        """The longest stop timeout among the copies still running (0 if none)."""
        with self._lock:
            return max((r.stop_timeout for r in self._agents.values() if not r.terminated), default=0.0)

    def size(self) -> int:
        """Copies tracked (running, or ended since the last ``forget_finished``): O(1)."""
        return len(self._agents)

    # ------------------------------------------------------------------ start

    def _emit(self, record: Running, event: str, fields: dict[str, Any]) -> None:
        fields.update(stamp())
        self._report(record.name, record.run, record.epoch, event, fields)

    def _relay(self, record: Running, event: str, fields: dict[str, Any]) -> None:
        """Pass on one event of a running copy, keeping what the worker must know of it."""
        if event == "AGENT_READY":
            record.ready = True
        if event == "AGENT_TERMINATED":
            if trace.enabled:
                trace.mark("ended", record.name)
            # how far the run got: if its STARTED and READY went on a connection the coordinator
            # no longer reads, this end (repeated in every registration) still tells them
            fields["reached"] = "READY" if record.ready else "STARTED"
            if record.leaving:
                fields["worker_leaving"] = True
            self._report(record.name, record.run, record.epoch, event, fields)
            # only now: a register composed meanwhile lists the copy or carries this report
            record.terminated = True
            self._ended.append(record.key)
            return
        self._report(record.name, record.run, record.epoch, event, fields)

    def _fail_before_start(self, record: Running, exc: BaseException, hint: str = "") -> None:
        self._emit(record, "AGENT_STARTED", {})
        self._emit(record, "AGENT_ERROR", error_fields(exc, hint))
        self._emit(record, "AGENT_TERMINATED", {"ok": False, "messages_taken": 0})  # (see BaseAgent.run's end)

    def start(self, name: str, run: str, epoch: int, class_id: str, class_blob: bytes | None,
              config_blob: bytes, mode: str, stop_timeout: float = 10.0, hold: bool = False, keep: bool = False,
              coordinator: str = "", definition: str = "") -> None:
        if class_blob is not None:
            self._blobs[class_id] = class_blob
            self._blobs.move_to_end(class_id)
            while len(self._blobs) > _CLASS_CACHE_SIZE:
                old, _ = self._blobs.popitem(last=False)
                self._classes.pop(old, None)
        record = Running(name, run, epoch, mode, keep=keep, coordinator=coordinator, definition=definition,
                         stop_timeout=stop_timeout)
        blob = self._blobs.get(class_id)
        if blob is None:
            self._fail_before_start(record, LookupError(f"class {class_id} was never sent to this worker"))
            return
        with self._lock:
            others = [r for r in map(self._agents.get, self._by_name.get(name, ())) if r is not None and not r.terminated]
        for previous in others:
            # the coordinator waits for an old copy to stop before it starts a new one; if one is
            # still here all the same, it gets its normal stop timeout, and both are tracked
            log.warning("agent %s: a copy of run %s is still running here; stopping it", name, previous.tag)
            self._request_stop(previous, None)
        if mode == "process":
            self._start_process(record, blob, config_blob, hold)
        else:
            self._start_thread(record, class_id, blob, config_blob, hold)

    def _add(self, record: Running) -> None:
        with self._lock:
            self._agents[record.key] = record
            self._by_name.setdefault(record.name, []).append(record.key)

    def _start_thread(self, record: Running, class_id: str, blob: bytes, config_blob: bytes, hold: bool) -> None:
        """Hand a thread agent to a thread, which makes it and runs it.  Nothing of the user's runs
        here, on the worker's loop: unpickling a class imports its modules (seconds for a big
        library), and an agent's ``__init__`` may connect somewhere or sleep.  Made here, a 3 s
        ``__init__`` silenced the worker: its coordinator took it for lost, and the agents running
        there were stopped at its lease and started again (elsewhere, with a longer wait: beside
        the copies still running)."""
        name = record.name
        if self.threads_per_process and self._local_threads >= self.threads_per_process:
            self._start_hosted(record, class_id, blob, config_blob, hold)
            return
        record.local = True
        record.handoff = Handoff()
        self._local_threads += 1
        sink = self._bus_sink()

        def report(event: str, **fields: Any) -> None:
            self._relay(record, event, fields)

        def run() -> None:
            agent = self._make(record, class_id, blob, config_blob, hold)
            if agent is None:
                return
            agent._report = report
            if not record.keep:
                agent._lease = self.lease
            if trace.enabled:
                trace.mark("running", name)
            publisher.attach(agent, sink, self._worker_name, self.host, record.tag)
            try:
                agent.run()
            finally:
                publisher.detach(agent)  # and its logger leaves logging's registry

        self._add(record)
        if self.threads.submit(run, f"agent-{name}", lambda exc: self._no_thread(record, exc)):
            self._start_soon(self.threads.start_one)  # no idle thread: a new one, unless one comes free first
        if trace.enabled:
            trace.mark("handed", name)

    def _make(self, record: Running, class_id: str, blob: bytes, config_blob: bytes, hold: bool) -> Any:
        """In the agent's thread: the agent, made from what the coordinator sent, or None if that
        failed (reported as the agent's STARTED, ERROR and TERMINATED).  ``record.handoff`` holds
        what the loop hands it meanwhile."""
        try:
            agent_class, config_class = shipping.cached_class(self._classes, self._unpacking, class_id, blob)
            config, plugin = shipping.unpack_config(config_class, config_blob)
            agent = agent_class(record.name, config, plugin)
            agent.events_address = self.events_address
            agent.events_key = self.events_key
            if hold:
                agent.control_events.execute_event.clear()  # until the coordinator says execute
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in __init__ or at the import of its module
            # too (as a process agent's and a host's): it ended the pool's thread, and the agent
            # stayed ASSIGNED for good
            record.handoff.failed()
            self._end_unstarted(record, exc)
            return None
        record.handoff.made(agent)
        return agent

    def _start_hosted(self, record: Running, class_id: str, blob: bytes, config_blob: bytes, hold: bool) -> None:
        """Run a thread agent in an agent host with room (a new one if none has)."""
        slot = next(self._slots)
        # the first live host with room takes it (add() refuses if its reader just saw it die)
        host = next((h for h in self._hosts if not h.retired and h.count < self.threads_per_process
                     and h.add(slot, record)), None)
        if host is None:
            self._processes_started = True  # see renew_lease
            host = AgentHost(self._mp, next(self._host_numbers), self._worker_name, self.host, self.events_address,
                             self.events_key, self.bus is not None, _stderr_level(), self.threads_per_process)
            host.add(slot, record)
            self._hosts.append(host)
            log.info("agent host %d: started for thread agents beyond %d in one process", host.number,
                     self.threads_per_process)
            # started by its reader, on the starter thread: booting the forkserver takes seconds
            # on a busy machine, and this loop must stay responsive
            self._start_soon(own_threads.thread(host.serve, f"host-{host.number}",
                                                args=(self._relay, self._emit, self._bus_sink())).start,
                             functools.partial(host.unstarted, self._relay, self._emit))
        record.host, record.slot = host, slot
        self._add(record)
        host.send(["start", slot, class_id, None if class_id in host.classes else blob, config_blob, record.name,
                   record.tag, hold, host.place.get(slot, -1)])
        host.classes.add(class_id)

    def _start_soon(self, start: Callable[[], None],
                    failed: Callable[[BaseException], None] | None = None) -> None:
        """Call ``start`` (a thread's ``start``, or the pool's ``start_one``) on the starter thread;
        ``failed`` with the error if it raises (no thread to be had: a pids limit), so that what the
        thread was for is reported as failed instead of waiting for ever."""
        if self._starter is None:
            starter = own_threads.thread(self._start_threads, "thread-starter")
            try:
                starter.start()
            except RuntimeError as exc:
                # not even this thread (a pids limit): ``start`` is tried here, where it fails as
                # fast and is reported; the next start asks for a starter again.  (Kept though not
                # started, the starter stood for one that never read its queue: every agent
                # started after it waited for ever, in ASSIGNED.)
                log.error("could not start the thread-starter thread: %s", exc)
                self._start_now(start, failed)
                return
            self._starter = starter
        self._to_start.put((start, failed))

    @staticmethod
    def _start_now(start: Callable[[], None], failed: Callable[[BaseException], None] | None) -> None:
        try:
            start()
        except Exception as exc:  # noqa: BLE001 - e.g. RuntimeError: can't start new thread (limits)
            log.error("could not start thread %s: %s", getattr(getattr(start, "__self__", None), "name", "?"), exc)
            if failed is not None:
                failed(exc)

    def close(self) -> None:
        """End the starter thread (threads still queued are not started), idle agent threads and
        agent hosts."""
        for host in self._hosts:
            host.retire()
        self.threads.close()
        if self._starter is not None:
            self._to_start.put(None)
            self._starter.join(5.0)
            self._starter = None

    def _start_threads(self) -> None:
        # the pool's start_one reports its own failure (the agent is failed: _no_thread)
        while (item := self._to_start.get()) is not None:
            self._start_now(*item)

    def _no_thread(self, agent: Running, exc: BaseException) -> None:
        """A thread agent no thread could be started for: failed (it would otherwise count as
        running for ever)."""
        log.error("could not start a thread for agent %s: %s", agent.name, exc)
        self._end_unstarted(agent, exc, " (could not start its thread)")

    def _end_unstarted(self, record: Running, exc: BaseException, hint: str = "") -> None:
        """A tracked copy that could not run: its STARTED, ERROR and TERMINATED (which ends it here)."""
        self._emit(record, "AGENT_STARTED", {})
        self._emit(record, "AGENT_ERROR", error_fields(exc, hint))
        self._relay(record, "AGENT_TERMINATED", {**stamp(), "ok": False, "messages_taken": 0})

    def _start_process(self, record: Running, blob: bytes, config_blob: bytes, hold: bool) -> None:
        name = record.name
        self._processes_started = True
        parent_conn, child_conn = self._mp.Pipe()
        # what its inbox took and dropped, in shared memory: read here if the process is killed
        record.tally = self._mp.RawArray("q", 2)
        process = self._mp.Process(target=child.main, args=(blob, config_blob, name, child_conn,
                                                                    _stderr_level(),
                                                                    self.events_address,
                                                                    [self._worker_name, self.host, record.tag]
                                                                    if self.bus is not None else None,
                                                                    hold, self.events_key, os.getpid(), record.tally),
                                   name=f"agent-{name}", daemon=False)
        record.process, record.conn = process, parent_conn
        record.link = ChildLink(parent_conn, start=lambda thread: self._start_soon(thread.start,
                                                                                  record.link.writer_failed))
        self._add(record)
        # started by its watcher, not here: the first start boots the forkserver (a Python that
        # imports pyorchestrate: seconds on a busy machine) and every start waits for the
        # forkserver's answer; on this loop that silenced the worker (a false death beside 4
        # CPU burners).  Until then a stop or a message waits in the pipe; is_alive() is False.
        record.thread = own_threads.thread(self._watch_process, f"watch-{name}", args=(record, child_conn))
        self._start_soon(record.thread.start,
                         functools.partial(self._unstarted_process, record, child_conn, " (could not start the "
                                           "thread that starts and watches its process)"))

    def _unstarted_process(self, record: Running, child_conn: Any, hint: str, exc: BaseException) -> None:
        child_conn.close()
        record.conn.close()
        log.error("could not start process agent %s: %s", record.name, exc)
        self._end_unstarted(record, exc, hint)

    def _watch_process(self, record: Running, child_conn: Any) -> None:
        try:
            stack_dump.start_forkserver()  # deaf to SIGUSR1, and its children until they listen
            record.process.start()
        except Exception as exc:
            self._unstarted_process(record, child_conn, " (could not start the process)", exc)
            return
        child_conn.close()
        seen_error = False
        sink = self._bus_sink()
        last_bus: dict[str, Any] = {}  # the marker of the child's last bus event (see below)
        watched = watch.ChildWatch(record.conn, record.process)
        try:
            while True:
                if not watched.readable():
                    break  # its process ended, and all it wrote before has been read
                message = msgpack.unpackb(record.conn.recv_bytes(), raw=False)
                if message[0] == child.BUS:  # one bus event, numbered and packed by the child
                    if sink is not None:
                        item = tuple(message[1:])
                        sink(item)
                        last_bus = child.bus_marker(item)
                    continue
                event, fields = message
                if event == "AGENT_ERROR":
                    seen_error = True
                self._relay(record, event, fields)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("bad message from process agent %s", record.name)
        record.process.join(5.0)
        code = record.process.exitcode
        if not record.terminated:
            # the child died without saying goodbye (SIGKILL, segfault, os._exit): report it now,
            # once what it started in its group is gone too (it could not end them itself:
            # child.end_strays), or they would run on beside the copy the coordinator starts next
            watch.kill_group_left_by(record.process.pid)
            how = how_it_exited(code)
            if record.forced:
                how = f"ignored stop for {record.stop_timeout:.1f} s and was terminated ({how})"
            if not seen_error:
                self._emit(record, "AGENT_ERROR", {
                    "error_message": f"process agent {record.name} {how} on worker {self._worker_name}",
                    "traceback": "", "exitcode": code})
            # with the last bus seq the child sent: the coordinator waits for the events still on
            # their way (log lines written just before an os._exit) instead of dropping them as stale
            self._relay(record, "AGENT_TERMINATED", {**stamp(), "ok": False, "exitcode": code, **last_bus,
                                                     **_messages_lost(record)})
        record.conn.close()
        watch.release(record.process)

    # ------------------------------------------------------------------ stop

    def stop(self, name: str, run: str, epoch: int, timeout: float | None = None) -> bool:
        """Ask one copy to stop; False if it is not running here."""
        with self._lock:
            record = self._agents.get((name, run, epoch))
        if record is None or record.terminated:
            return False
        self._request_stop(record, timeout)
        return True

    def _request_stop(self, record: Running, timeout: float | None) -> None:
        if timeout is not None:
            record.stop_timeout = timeout
        if record.stop_requested_at is None:
            record.stop_requested_at = clock.now()
            self._stopping.add(record.key)
        if record.host is not None:
            record.host.send(["stop", record.slot])
        elif record.mode == "thread":
            record.handoff.give("stop")
        else:
            # with the seconds it has left: what it started and leaves running must be gone by
            # then too (child.end_strays)
            left = record.stop_timeout - (clock.now() - record.stop_requested_at)
            self._to_child(record, ["stop", max(0.0, left)])

    def deliver(self, name: str, run: str, epoch: int, kind: str, payload: Any) -> str | None:
        """Hand a message to a running copy; None if handed, else why it was dropped."""
        with self._lock:
            record = self._agents.get((name, run, epoch))
        if record is None or record.terminated:
            return "deliver_to_unknown_agent"
        if record.host is not None:
            handed = record.host.send(["deliver", record.slot, kind, payload])
        elif record.mode == "thread":
            record.handoff.give(kind, payload)  # (the agent's inbox counts what it refuses)
            handed = True
        else:
            handed = self._to_child(record, ["deliver", kind, payload])
        return None if handed else "deliver_backlog_full"

    @staticmethod
    def _to_child(record: Running, message: list) -> bool:
        # never waits: a child that does not read (stopped) must not stop this loop (child_link.py)
        return record.link.send(message)

    def renew_lease(self, until: float) -> None:
        """Tell the process agents and agent hosts that run agents this worker would stop when its
        lease runs out (those that do not keep running) until when it holds: they are not frozen
        with this process, and each stops those agents itself if this process is stopped past it
        (see lease_guard.py).  A host is told which of its agents that covers."""
        if not self._processes_started:  # every heartbeat: no walk over thousands of thread agents
            return
        with self._lock:
            records = [r for r in self._agents.values() if not r.keep and not r.terminated
                       and (r.mode == "process" or r.host is not None)]
        hosted: dict[AgentHost, list[Running]] = {}
        for record in records:
            if record.host is None:
                self._to_child(record, ["lease", until, record.stop_timeout])
            else:
                hosted.setdefault(record.host, []).append(record)
        for host, mine in hosted.items():
            host.send(["lease", until, [r.slot for r in mine], max(r.stop_timeout for r in mine)])

    def stop_all(self, timeout: float | None = None, *, keep: bool = False, leaving: bool = False,
                 lease_end: float | None = None, orphaned: bool = False) -> int:
        """Ask every copy to stop (``keep=True``: all but those that keep running without a
        coordinator; ``leaving``: because this worker shuts down, which their ends will say;
        ``lease_end``: because the lease ran out then (clock.now()), which their stop timeouts
        count from, the coordinator's replacement waiting for no word of theirs; ``orphaned``: at
        the orphan timeout, after which the coordinator replaces kept copies too (a
        disconnect_timeout), so they are kept no more: held to their stop timeouts as the lease's
        copies are); return how many were asked."""
        with self._lock:
            records = [r for r in self._agents.values() if not r.terminated and not (keep and r.keep)]
        for record in records:
            record.leaving = record.leaving or leaving
            if orphaned:
                record.keep = False
            if lease_end is not None and record.stop_requested_at is None:
                record.deadline = True
                record.stop_requested_at = min(lease_end, clock.now())
                self._stopping.add(record.key)
            self._request_stop(record, timeout)
        return len(records)

    def upkeep(self) -> int:
        """Once a loop turn: :meth:`enforce_stop_timeouts`, then :meth:`forget_finished` (its
        count), with one look for the usual turn where neither has anything to do."""
        if not self._stopping and not self._ended:  # read without the lock, as both do
            return 0
        self.enforce_stop_timeouts()
        return self.forget_finished()

    def enforce_stop_timeouts(self) -> None:
        """Terminate process agents that ignored a stop request past their timeout (call often)."""
        if not self._stopping:  # read without the lock: a stop requested meanwhile is seen next turn
            return
        now = clock.now()
        with self._lock:
            records = [r for r in map(self._agents.get, list(self._stopping)) if r is not None]
        for record in records:
            if record.terminated or record.stop_requested_at is None:
                self._stopping.discard(record.key)
                continue
            overdue = now - record.stop_requested_at - record.stop_timeout
            if overdue < 0:
                continue
            if record.mode == "process" and record.process.is_alive():
                first, record.forced = not record.forced, True
                if overdue < 2.0 and not record.deadline:
                    if first:  # said once, not once a turn for those 2 s (40 lines at the loop's pace)
                        log.warning("process agent %s ignored stop for %.1f s: terminating it", record.name,
                                    record.stop_timeout)
                    _signal_process_group(record.process, signal.SIGTERM)
                else:
                    _signal_process_group(record.process, signal.SIGKILL)
            elif record.mode == "thread" and not record.forced:
                record.forced = True  # threads cannot be killed: say so once
                message = (f"thread agent {record.name} has not stopped {record.stop_timeout:.1f} s after the "
                           "request: it is stuck (threads cannot be terminated; make cycle() return or use a "
                           "process agent)")
                log.warning("%s", message)
                self._emit(record, "AGENT_ERROR", {"error_message": message, "traceback": "", "stuck": True})

    def forget_finished(self) -> int:
        """Drop the copies that ended since the last call; return how many."""
        if not self._ended:  # read without the lock: an end added meanwhile is taken next turn
            return 0
        forgotten = 0
        with self._lock:
            while self._ended:
                key = self._ended.popleft()
                record = self._agents.pop(key, None)
                if record is None:
                    continue
                forgotten += 1
                if record.host is not None:
                    record.host.forget(record.slot)
                elif record.local:
                    self._local_threads -= 1
                # the agent reports through a closure holding this record: a cycle, which left
                # each ended agent (~28 objects) to the cyclic collector, whose full passes then
                # cost the worker ~15 µs per agent in S3
                record.handoff = None
                self._stopping.discard(key)
                keys = self._by_name.get(key[0])
                if keys is not None:
                    keys.remove(key)
                    if not keys:
                        del self._by_name[key[0]]
        if self._hosts and forgotten:
            self._retire_idle_hosts()
        return forgotten

    def _retire_idle_hosts(self) -> None:
        """Let hosts with no agents left exit (they cost a process each); a dead one is dropped
        once its agents were forgotten."""
        keep = []
        for host in self._hosts:
            if host.count == 0:
                host.retire()
            else:
                keep.append(host)
        self._hosts = keep


def _signal_process_group(process: Any, sig: int) -> None:
    """Signal a process agent's process and every process of its group (it leads one:
    child.leave_the_worker_group), so that what it started ends with it; just the process if
    it does not lead one."""
    pid = process.pid
    try:
        if pid and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except OSError:  # gone meanwhile: its group, if it had one, is what watch.kill_group_left_by ends
        pass
    (process.terminate if sig == signal.SIGTERM else process.kill)()


def _forked(supervisor: weakref.ref) -> None:
    """os.register_at_fork's hook (a weak reference: a hook cannot be unregistered, and a
    process may make several supervisors)."""
    alive = supervisor()
    if alive is not None:
        alive.forked()
