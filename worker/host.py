"""Entry point of an agent host: a child process of the worker that runs many thread agents.

Why: one CPython process serves a few thousand threads well and ~10,000 badly.  Every thread
waiting for the GIL wakes each switch interval to demand it; at 10,000 threads a stall of a
fraction of a second can tip the process into a convoy where its threads (the worker's loop
among them) wait seconds for the GIL (``benchmarks/threads.py``: 2 of 3 runs of plain threads,
no pyorchestrate).  So a worker keeps at most ``--threads-per-process`` thread agents in its own
process and runs the rest in hosts like this one, each holding at most as many.  Its own loop (its
heartbeats, its lease) then never shares a GIL with more than that many agent threads.

The pipe to the worker carries msgpack lists:

* worker → host: ``["start", slot, class_id, class_blob | None, config_blob, name, tag, hold, place]``
  (the class is sent once per host; ``place``: where its inbox counts in the tally shared with the
  worker, -1: none), ``["stop", slot]``, ``["deliver", slot, kind, payload]``, ``["exit"]`` (no
  agents left: end);
* host → worker: ``[slot, event, fields]`` (a lifecycle report of one agent) and
  ``[BUS, slot, *item]`` (one bus event, numbered by the agent's publisher).

When the worker is done with it ("exit"), every agent is asked to stop and the host exits once
they ended (a thread that ignores the stop is abandoned after ``EXIT_GRACE`` seconds).  If the
worker dies the pipe closes and the host exits at once (child.worker_gone); if the worker is
stopped past its lease, the host stops the agents that lease covers (lease_guard.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import msgpack

from pyorchestrate import publisher, shipping
from pyorchestrate.agents.inbox import TallyPlace
from pyorchestrate.events import stamp
from pyorchestrate.log_thread import EXIT_WAIT, LOG_THREAD

from . import crowd, stack_dump, stop_signals
from .child import BUS, end_strays, end_with_group, leave_the_worker_group, setup_logging, worker_gone
from .errors import error_fields
from .handoff import Handoff
from .lease_guard import LeaseGuard

#: after the worker said "exit", how long agents get to end before the host exits anyway
EXIT_GRACE = 10.0
#: within a burst of starts, the switch interval and the collector are tuned every so many agents
TUNE_EVERY = 100


class _SlotLease:
    """The worker's lease as the agent in ``slot`` sees it (``BaseAgent._lease``): it holds that
    agent only while the lease covers its slot, as last told (a kept agent's never is)."""

    def __init__(self, host: "Host", slot: int) -> None:
        self.host, self.slot = host, slot

    def hold(self, stop: threading.Event, stop_timeout: float) -> None:
        if self.slot in self.host._leased:
            self.host._guard.hold(stop, stop_timeout)


class Host:
    """The agents of one host process (runs in that process)."""

    def __init__(self, conn: Any, worker: str, host: str, events_address: str | None, events_key: Any,
                 bus: bool, worker_pid: int = 0, tally: Any = None) -> None:
        self._conn = conn
        self._tally = tally  # the agents' inbox counts, shared with the worker (see hosts.py)
        self._worker, self._host = worker, host
        self._events_address, self._events_key, self._bus = events_address, events_key, bus
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self.agents: dict[int, Handoff] = {}  # by slot: each agent's way in, made or being made
        self._threads: dict[int, threading.Thread] = {}
        self._classes: dict[str, tuple[type, type]] = {}
        self._blobs: dict[str, bytes] = {}  # class blobs by id, unpickled by the first agent that needs one
        self._unpacking = threading.Lock()  # taken by agent threads only: an import may take seconds
        self._gc = crowd.FreezePolicy()
        self._leased: set[int] = set()  # the slots the worker's lease covers (not kept), as last told
        self._guard = LeaseGuard(worker_pid, self._stop_leased, self._only_leased_left, end=end_with_group)
        self._stop_signalled = False

    def _stop(self, leased_only: bool) -> None:
        with self._lock:
            agents = [a for slot, a in self.agents.items() if not leased_only or slot in self._leased]
        for agent in agents:
            agent.give("stop")

    def _stop_leased(self) -> None:
        self._stop(leased_only=True)

    def stop_agents(self) -> None:
        """Ask every agent here to stop (SIGTERM or SIGINT to this process); asked again, end now,
        as their default action did (a thread stuck in its cycle cannot be stopped otherwise)."""
        if self._stop_signalled:
            os._exit(128 + signal.SIGTERM)
        self._stop_signalled = True
        self._stop(leased_only=False)

    def _only_leased_left(self) -> bool:
        """May this process end at its stopped worker's lease: does nothing kept run here?"""
        with self._lock:
            return set(self.agents) <= self._leased

    def send(self, message: list) -> None:
        with self._send_lock:
            try:
                self._conn.send_bytes(msgpack.packb(message, use_bin_type=True, default=repr))
            except (OSError, ValueError):
                pass  # the worker is gone: the listener sees the pipe close and stops everything

    def serve(self) -> None:
        """Act on the worker's messages until it closes the pipe or says exit."""
        try:
            while True:
                if not self._conn.poll(1.0):
                    self._tune()
                    continue
                message = msgpack.unpackb(self._conn.recv_bytes(), raw=False)
                kind = message[0]
                if kind == "start":
                    self._start(*message[1:])
                elif kind == "stop":
                    agent = self.agents.get(message[1])
                    if agent is not None:
                        agent.give("stop")
                elif kind == "deliver":
                    agent = self.agents.get(message[1])
                    if agent is not None:
                        agent.give(message[2], message[3])
                elif kind == "lease":  # [until, the slots it covers, their longest stop timeout]
                    self._leased = set(message[2])
                    self._guard.renewed(message[1], message[3])
                elif kind == "exit":
                    break
                if kind == "start" and len(self.agents) % TUNE_EVERY == 0 or not self._conn.poll(0):
                    self._tune()  # now and then within a burst of starts, and after it
        except (EOFError, OSError):
            worker_gone()  # not "exit": the worker died, and its thread agents here must too
        self._stop_all()

    def _tune(self) -> None:
        # the same two counters a crowded worker applies to itself (crowd.py)
        interval = crowd.host_switch_interval(threading.active_count())
        if sys.getswitchinterval() != interval:
            sys.setswitchinterval(interval)
        with self._lock:
            action = self._gc.decide(len(self.agents))
        crowd.apply(action)

    def _start(self, slot: int, class_id: str, class_blob: bytes | None, config_blob: bytes, name: str, tag: str,
               hold: bool, place: int = -1) -> None:
        def report(event: str, **fields: Any) -> None:
            fields.update(stamp())
            self.send([slot, event, fields])

        if class_blob is not None:
            self._blobs[class_id] = class_blob
        blob = self._blobs.get(class_id)
        handoff = Handoff()
        # zeroed here, in the order of the worker's messages: after any delivery to the agent that
        # had this place before (its end was reported and forgotten before this start was sent)
        tally = TallyPlace(self._tally, place) if self._tally is not None and place >= 0 else None
        if tally is not None:
            tally.clear()

        def sink(item: Any) -> None:
            self.send([BUS, slot, *item])

        def run() -> None:
            # made here, in its own thread, not in serve(): an import or a slow __init__ must not
            # hold up the worker's messages to the other agents of this host (handoff.py)
            try:
                agent_class, config_class = shipping.cached_class(self._classes, self._unpacking, class_id, blob)
                self._blobs.pop(class_id, None)  # unpickled: the class is kept, its blob need not be
                config, plugin = shipping.unpack_config(config_class, config_blob)
                agent = agent_class(name, config, plugin)
                if tally is not None:
                    agent._inbox.tally = tally
                agent._report = report
                agent._lease = _SlotLease(self, slot)
                agent.events_address = self._events_address
                agent.events_key = self._events_key
                if hold:
                    agent.control_events.execute_event.clear()  # until the coordinator says execute
            except BaseException as exc:  # noqa: BLE001 - any failure to load is this agent's, not the host's
                handoff.failed()
                self._forget(slot)
                report("AGENT_STARTED")
                report("AGENT_ERROR", **error_fields(exc))
                report("AGENT_TERMINATED", ok=False, messages_taken=0)
                return
            handoff.made(agent)
            if self._bus:
                publisher.attach(agent, sink, self._worker, self._host, tag)
            try:
                agent.run()
            finally:
                publisher.detach(agent)
                self._forget(slot)

        thread = threading.Thread(target=run, name=f"agent-{name}", daemon=True)
        with self._lock:
            self.agents[slot] = handoff
            self._threads[slot] = thread
            self._gc.started()
        try:
            thread.start()
        except Exception as exc:  # noqa: BLE001 - e.g. RuntimeError: can't start new thread (limits)
            self._forget(slot)  # the collector's count too (it was left counted before)
            report("AGENT_STARTED")
            report("AGENT_ERROR", **error_fields(exc, " (could not start its thread)"))
            report("AGENT_TERMINATED", ok=False, messages_taken=0)

    def _forget(self, slot: int) -> None:
        with self._lock:
            self.agents.pop(slot, None)
            self._threads.pop(slot, None)
            self._gc.ended()

    def _stop_all(self) -> None:
        with self._lock:
            agents = list(self.agents.values())
            threads = list(self._threads.values())
        for agent in agents:
            agent.give("stop")
        deadline = time.monotonic() + EXIT_GRACE
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def main(conn: Any, worker: str, host: str, events_address: str | None, events_key: Any, bus: bool,
         log_level: int = logging.INFO, worker_pid: int = 0, tally: Any = None) -> None:
    """Run thread agents for the worker at the other end of ``conn`` until it is done with us."""
    leave_the_worker_group(worker_pid)
    stack_dump.register()  # SIGUSR1: its stacks, as the worker's, not its end
    setup_logging(f"agent host {worker}", log_level)
    crowd.settle()  # a process of ours, like the worker's
    serving = Host(conn, worker, host, events_address, events_key, bus, worker_pid, tally)
    # SIGTERM or SIGINT sent to this process itself (systemd's default KillMode=control-group): its
    # agents stop, as their worker would stop them (before, they died with it, as failures)
    stop_signals.request_on_signals(serving.stop_agents)
    serving.serve()
    end_strays()  # what its agents started and left running goes with it
    conn.close()
    sys.stdout.flush()
    if LOG_THREAD.flush(EXIT_WAIT):  # else stderr takes nothing: flushing it would wait for ever
        sys.stderr.flush()
    # skip interpreter teardown: a stuck agent thread (or a non-daemon thread of user code) must
    # not keep the host alive
    os._exit(0)
