"""The cluster core: every decision the coordinator takes, as one pure state machine.

Stimuli go in (a worker registers or reports, a tick with ``now``, a user command); actions come
out in :attr:`ClusterCore.actions` (send this frame to that worker, publish this event, forget
that agent, the run is finished).  The core owns no socket, starts no thread, reads no clock
(``now`` is passed in, wall time for display comes from the ``wall`` callable) and draws
randomness only from the ``rng`` it is given, so a simulation can drive it step by step and
replay any run from its seed.  :mod:`pyorchestrate.coordinator` is the loop that feeds it.

Guarantees it keeps (the simulation in tests/test_core_simulation.py checks them):

- a run is named by (coordinator incarnation, epoch): nothing naming another pair is taken for it;
- ``restart="never"`` starts at most once; an agent whose fate is unknown is reported failed;
- a replacement for an agent on a silent worker starts only after that worker's lease ran out;
- a worker is judged only over time this coordinator was listening (its own stalls don't count).
"""

from __future__ import annotations

import collections
import logging
import random
from typing import Any, Callable, NamedTuple

from . import commands as cmd
from . import protocol
from .commands import handles
from .dependencies import check_graph
from .events import OrchestratorEvent as E
from .limits import Limits
from .placement import choose
from .records import AgentRecord, WorkerRecord
from .states import LIVE, RUNNING, AgentState, StateIndex
from .versions import compare, table

log = logging.getLogger("pyorchestrate.coordinator")

S = AgentState


class Send(NamedTuple):
    identity: bytes
    frame: bytes


class Publish(NamedTuple):
    event: E
    subject: str
    fields: dict[str, Any]
    record: AgentRecord | None  #: the agent the event is about (its state changed, log it)


class AwaitBus(NamedTuple):
    """A finished run's publisher sent up to ``seq``: wait for it before declaring the run over."""
    publisher: str
    incarnation: str
    seq: int


class Forget(NamedTuple):
    """A finished agent left the core's memory (finished_agents_max): its name is free again."""
    name: str


class Finished(NamedTuple):
    pass


Action = Send | Publish | AwaitBus | Forget | Finished


class ClusterCore:
    """Workers, agents, assignments and leases; see the module docstring."""

    def __init__(self, name: str, incarnation: str, config: Any, *, now: float, rng: random.Random,
                 wall: Callable[[], float], drop: Callable[[str, Any], None], min_workers: int = 1,
                 adopt_window: float = 0.0, strict_hold: bool = False,
                 versions: dict[str, str] | None = None) -> None:
        self.name = name
        self.incarnation = incarnation
        self.config = config
        self.limits = Limits(config.heartbeat_interval, config.heartbeat_liveness)
        self.rng = rng
        self.wall = wall
        self.drop = drop
        self.min_workers = min_workers
        self.versions = versions or {}
        self.agents: dict[str, AgentRecord] = {}
        self.states = StateIndex()
        self.workers: dict[str, WorkerRecord] = {}
        self.by_identity: dict[bytes, str] = {}
        self.actions: list[Action] = []
        self.class_blobs_sent = 0
        self.forgotten = 0
        self.stop_requested = False  #: the script called stop()
        self.joined = False  #: the script is in join()
        self.finished = False
        self._order = 0
        self._dirty = True  # something changed that placement should look at
        self._workers_ready = False
        self._wait_deadline = now + config.worker_wait_timeout
        self._stopping_deadline: float | None = None
        self._last_tick = now
        self._started = now
        self._adopt_window = adopt_window
        self._adopt_until = now + adopt_window
        self._holding = adopt_window > 0  # some pending agent waits out the adoption window
        #: after a crash: also wait until copies on workers that never report have stopped
        self._strict_hold = strict_hold
        self._found: set[str] = set()  # agents of which a previous coordinator's copy was reported
        self.bus_port = 0  #: told to workers in their welcome (set by the loop once bound)
        self.events_port: int | None = None
        self.start_error: str | None = None  #: too few workers joined in time
        #: copies of agents a previous coordinator started, not (yet) registered by this script:
        #: name -> (worker, report, deadline)
        self._foreign: dict[str, tuple[str, dict[str, Any], float]] = {}
        #: agents that wait until an old copy has stopped: name -> (worker, run, epoch, deadline)
        self._old_copies: dict[str, tuple[str, str, int, float]] = {}
        self._ended: collections.deque[str] = collections.deque()  # finished for good, oldest first
        self._depended: collections.Counter[str] = collections.Counter()  # never forget these

    # ================================================================== helpers

    def take(self) -> list[Action]:
        """The actions decided since the last call, in order."""
        actions, self.actions = self.actions, []
        return actions

    def _send(self, worker: WorkerRecord, type_: str, **fields: Any) -> int:
        worker.sent_n += 1
        self.actions.append(Send(worker.identity, protocol.encode(type_, n=worker.sent_n, **fields)))
        return worker.sent_n

    def received(self, worker: WorkerRecord, message: dict[str, Any]) -> bool:
        """Check a live worker's frame number: False (and a request to register again, on a new
        connection) if frames from it were lost."""
        n = message["n"]
        if n == 0:
            return True
        expected, worker.recv_n = worker.recv_n + 1, n
        if n == expected:
            return True
        log.info("worker %s: frames %d..%d were lost on the way; asking it to register again", worker.name,
                 expected, n - 1)
        self._send(worker, "reregister")
        return False

    def _publish(self, event: E, subject: str, fields: dict[str, Any], record: AgentRecord | None = None) -> None:
        self.actions.append(Publish(event, subject, fields, record))

    def _publish_agent(self, record: AgentRecord, event: E, fields: dict[str, Any]) -> None:
        worker = self.workers.get(record.worker or "")
        self._publish(event, record.name, {**fields, "agent_name": record.name, "worker": record.worker,
                                           "host": worker.host if worker else None, "epoch": record.epoch},
                      record)

    def _record(self, name: str) -> AgentRecord:
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            raise ValueError(f"unknown agent {name!r} (registered: {known})") from None

    def worker_of(self, identity: bytes) -> WorkerRecord | None:
        """The live worker speaking on ``identity`` (None for strangers and the lost)."""
        worker = self.workers.get(self.by_identity.get(identity, ""))
        if worker is None or not worker.alive or worker.identity != identity:
            return None
        return worker

    def bus_accepts(self, agent: str, worker: str, tag: str) -> bool:
        """Is a bus event from ``worker``'s copy of ``agent`` in run ``tag`` from the current run?
        (A stale copy's logs and events never reach subscribers, the log or a callback.)"""
        record = self.agents.get(agent)
        return record is not None and record.worker == worker and record.tag == tag

    # ================================================================== workers

    def control(self, identity: bytes, message: dict[str, Any], now: float) -> None:
        """One decoded control frame from the connection ``identity``."""
        kind = message["type"]
        if kind == "register":
            self.register(identity, message, now)
            return
        worker = self.worker_of(identity)
        if worker is None:
            if kind in ("heartbeat", "agent_events"):
                self.stranger(identity, message, now)
            elif kind != "goodbye":
                self.drop("unexpected", kind)
            return
        self.received(worker, message)  # a gap: it registers again; this frame still counts
        if kind == "heartbeat":
            self.heartbeat(worker, message, now)
        elif kind == "agent_events":
            self.heard(worker, now)
            for item in message["events"]:
                try:
                    self.agent_event(worker, item, now)
                except protocol.ProtocolError as exc:  # one bad item spoils no other
                    self.drop("bad_frame", exc)
        elif kind == "goodbye":
            self.goodbye(worker, now)
        else:
            self.drop("unexpected", kind)

    def register(self, identity: bytes, message: dict[str, Any], now: float) -> None:
        """A worker registers (first time, after a reconnect, or after we restarted)."""
        name = message["name"]
        errors, warnings = compare(self.versions, message["versions"])
        if errors:
            reason = "incompatible versions (" + "; ".join(errors) + "):\n" + table(self.versions, message["versions"])
            log.error("refused worker %s: %s", name, reason)
            self.actions.append(Send(identity, protocol.encode("refused", reason=reason)))
            return
        if self.incarnation in message["drained_by"]:
            # drained from this coordinator: it waits for the next one
            self.actions.append(Send(identity, protocol.encode("refused", reason="drained", retry=True)))
            return
        existing = self.workers.get(name)
        if existing is not None and existing.alive and existing.incarnation != message["incarnation"]:
            # maybe a restarted worker whose old self is not declared lost yet: let it retry
            reason = (f"a live worker named {name!r} is already registered (host {existing.host}, pid "
                      f"{existing.pid}); give each worker a unique --name (retrying until the old one is gone)")
            log.warning("worker %s: %s", name, reason)
            self.actions.append(Send(identity, protocol.encode("refused", reason=reason, retry=True)))
            return
        same_process = existing is not None and existing.alive
        same_connection = same_process and existing.identity == identity
        if existing is not None and existing.incarnation == message["incarnation"] and message["conn"] < existing.conn:
            self.drop("stale_register", name)  # from a connection it has since replaced
            return
        if existing is not None:
            self.by_identity.pop(existing.identity, None)
        self._order += 1
        worker = WorkerRecord(
            name=name, identity=identity, incarnation=message["incarnation"], host=message["host"],
            pid=message["pid"], labels=dict(message["labels"]), capacity=message["capacity"],
            versions=message["versions"], order=self._order, last_seen=now, last_t=float(message["t"]),
            recv_n=message["n"], conn=message["conn"])
        if same_process:
            worker.agents, worker.order = existing.agents, existing.order
            if same_connection:  # it answered "register again": what we sent it still arrives in order
                worker.sent_classes, worker.sent_n = existing.sent_classes, existing.sent_n
        self.workers[name] = worker
        self.by_identity[identity] = name
        # what happened while it was away comes first, then the list of what runs there now: a
        # worker lists copies only after queueing their last reports, so together they are complete
        for item in message["events"]:
            self.agent_event(worker, item, now)
        stop: list[dict[str, Any]] = []
        reported = set()
        for report in message["agents"]:
            if self._take_report(worker, report, now, stop):
                reported.add(report["agent"])
        worker.stopping = {(item["agent"], item["run"], item["epoch"]) for item in stop}
        self._send(worker, "welcome", coordinator=self.name, session=self.incarnation,
                   heartbeat_interval=float(self.config.heartbeat_interval),
                   heartbeat_liveness=int(self.config.heartbeat_liveness),
                   bus_port=self.bus_port, events_port=self.events_port, stop=stop, warnings=warnings, echo=float(message["t"]))
        seen = message["seen"] if same_connection else -1  # on a new connection nothing unseen arrives
        for agent_name in sorted(worker.agents - reported):
            record = self.agents.get(agent_name)
            if record is None:
                worker.agents.discard(agent_name)
            elif not (record.state is S.ASSIGNED and record.start_n > seen >= 0):
                self._not_reported(worker, record, now)  # else its start is still on its way
        # a copy we kept for it while it was silent, that it does not run any more, is gone
        for record in self.states.of(S.DISCONNECTED):
            if record.worker == name and record.name not in reported:
                self._fail_run(record, f"worker {name!r} came back without agent {record.name!r}", now)
        self._dirty = True
        if not same_process:
            log.info("worker %s joined%s (host %s, pid %d, labels %s, capacity %s)", name,
                     " again" if existing else "", worker.host, worker.pid, worker.labels or "{}",
                     worker.capacity or "unlimited")
            self._publish(E.WORKER_JOINED, name, {
                "worker": name, "host": worker.host, "pid": worker.pid, "labels": worker.labels,
                "capacity": worker.capacity, "rejoined": existing is not None})

    def _take_report(self, worker: WorkerRecord, report: dict[str, Any], now: float,
                     stop: list[dict[str, Any]]) -> bool:
        """One copy a registering worker runs: ours (keep it), a previous coordinator's (adopt it
        or stop it), or stale (stop it).  True if it stays as the current run."""
        name, run, epoch = report["agent"], report["run"], report["epoch"]
        record = self.agents.get(name)
        if record is not None and record.worker == worker.name and (record.run, record.epoch) == (run, epoch):
            if record.state in RUNNING:
                worker.agents.add(name)
                if record.stop_requested or record.then:  # the stop may have been lost: say it again
                    self._send(worker, "stop", agent=name, run=run, epoch=epoch, timeout=record.stop_timeout)
                # its STARTED / READY reports may have been lost with a connection: catch up
                for state, event in ((S.STARTED, E.AGENT_STARTED), (S.READY, E.AGENT_READY)):
                    if record.state is S.ASSIGNED or (state is S.READY and report["state"] == "READY"
                                                      and record.state is S.STARTED):
                        self.states.move(record, state)
                        self._publish_agent(record, event, {"recovered": True})
                        self._dirty = True
                return True
            if record.state is S.DISCONNECTED:
                self._reconnect(record, worker, report, "its worker is back")
                return True
        elif run != self.incarnation and report["coordinator"] == self.name and self.config.on_restart == "adopt":
            self._found.add(name)
            if record is None:
                # the script may register it in a moment: hold it (running) for the adoption window
                self._foreign[name] = (worker.name, report, max(now, self._adopt_until) + self.limits.silence)
                worker.agents.add(name)
                return True
            if record.state is S.PENDING and record.definition == report["definition"] and name not in self._old_copies:
                self._adopt(record, worker, report)
                return True
        if run != self.incarnation and report["coordinator"] == self.name:
            self._found.add(name)
        timeout = record.stop_timeout if record is not None else float(self.config.stop_timeout)
        stop.append({"agent": name, "run": run, "epoch": epoch, "timeout": timeout})
        if record is not None and record.state in (S.PENDING, S.RESTARTING):
            # an older copy (a previous coordinator's with another definition, or ours from before
            # its worker was declared lost) still runs: it is stopped before a new one starts
            self._old_copies[name] = (worker.name, run, epoch, self.limits.replace_after(now, timeout))
        return False

    def _adopt(self, record: AgentRecord, worker: WorkerRecord, report: dict[str, Any]) -> None:
        """Take over a copy a previous coordinator (same name, same definition) started."""
        record.worker, record.run, record.epoch = worker.name, report["run"], report["epoch"]
        record.started_at = self.wall()
        self.states.move(record, S.READY if report["state"] == "READY" else S.STARTED)
        worker.agents.add(record.name)
        self._publish_agent(record, E.AGENT_ADOPTED, {"reason": "still running from a previous coordinator",
                                                      "state": record.state.value})

    def _reconnect(self, record: AgentRecord, worker: WorkerRecord, report: dict[str, Any], reason: str) -> None:
        self.states.move(record, S.READY if report["state"] == "READY" else S.STARTED)
        worker.agents.add(record.name)
        self._publish_agent(record, E.AGENT_ADOPTED, {"reason": reason, "state": record.state.value})

    def _not_reported(self, worker: WorkerRecord, record: AgentRecord, now: float) -> None:
        """A re-registering worker does not list an agent we had there, and its reports (which
        come first and are complete) did not end it."""
        worker.agents.discard(record.name)
        if record.state is S.ASSIGNED:
            # the start went to its old socket and never arrived: it never ran, so sending it
            # again cannot make it run twice
            self._assign(record, worker, now)
        elif record.state in LIVE:
            self._fail_run(record, f"worker {worker.name!r} no longer runs agent {record.name!r} "
                                   "and its end was not reported", now)

    def heartbeat(self, worker: WorkerRecord, message: dict[str, Any], now: float) -> None:
        worker.last_seen = now
        worker.last_t = max(worker.last_t, float(message["t"]))
        worker.disconnected_at = None
        running = message["running"]
        if running < 0 or running == len(worker.agents) + len(worker.stopping):
            worker.mismatches = 0
            return
        # a report or a start can be lost when a connection resets; reports in flight explain a
        # difference for a moment, never for three heartbeats: then registration sets it right
        worker.mismatches += 1
        if worker.mismatches >= 3:
            worker.mismatches = 0
            log.info("worker %s runs %d copies, we count %d: asking it to register again", worker.name, running,
                     len(worker.agents) + len(worker.stopping))
            self._send(worker, "reregister")

    def heard(self, worker: WorkerRecord, now: float) -> None:
        """Any message from a live worker: it is alive and connected."""
        worker.last_seen = now
        worker.disconnected_at = None

    def disconnected(self, identity: bytes, now: float) -> None:
        """The connection a worker spoke on closed (its process died, or it reconnects), or a
        send to it found no route."""
        worker = self.worker_of(identity)
        if worker is not None and worker.disconnected_at is None:
            worker.disconnected_at = now

    def goodbye(self, worker: WorkerRecord, now: float) -> None:
        self._worker_gone(worker, E.WORKER_LEFT, f"worker {worker.name!r} shut down", now, certain=True)

    def stranger(self, identity: bytes, message: dict[str, Any], now: float) -> None:
        """A message from a connection that is not a live worker's: we restarted, or gave up on
        it (it was frozen).  It must register again; stale copies it reports are stopped."""
        self.actions.append(Send(identity, protocol.encode("reregister")))

    def _worker_gone(self, worker: WorkerRecord, event: E, reason: str, now: float, *, certain: bool) -> None:
        """``certain``: its process is gone (goodbye, closed connection), so are its thread agents.
        Otherwise it is merely silent: it may be cut off and still running them."""
        worker.alive = False
        worker.gone_at = now
        (log.warning if event is E.WORKER_LOST else log.info)("%s", reason)
        self._publish(event, worker.name, {"worker": worker.name, "host": worker.host, "reason": reason,
                                           "agents": sorted(worker.agents)})
        for agent_name in sorted(worker.agents):
            record = self.agents.get(agent_name)
            if record is None:
                self._foreign.pop(agent_name, None)
                continue
            if record.state not in RUNNING:
                continue
            if not certain and record.keeps_running and not record.stop_requested:
                self.states.move(record, S.DISCONNECTED)
                record.disconnected_at = now
                self._publish_agent(record, E.AGENT_DISCONNECTED, {"reason": reason})
                continue
            # a replacement waits until the worker's lease has certainly run out
            not_before = 0.0 if certain else self.limits.replace_after(worker.last_seen, record.stop_timeout)
            self._fail_run(record, f"{reason}; agent {agent_name!r} was running there", now, not_before=not_before)
        worker.agents = {n for n in worker.agents if n in self.agents and self.agents[n].state is S.DISCONNECTED}
        self._dirty = True

    # ================================================================== agent reports

    def agent_event(self, worker: WorkerRecord, item: dict[str, Any], now: float) -> None:
        """One lifecycle event a worker reports for the copy named (agent, run, epoch)."""
        record = self.agents.get(item["agent"])
        if (record is None or record.worker != worker.name or (record.run, record.epoch) != (item["run"], item["epoch"])
                or record.state not in LIVE):
            self._stale_event(worker, item, now)
            return
        try:
            event = E(item["event"])
        except ValueError:
            raise protocol.ProtocolError(f"unknown agent event {item['event']!r}") from None
        fields = {k: v for k, v in item["fields"].items() if isinstance(k, str)}
        if record.state is S.DISCONNECTED and event is not E.AGENT_TERMINATED:
            # its worker is back and reports on it: the copy was kept running all along
            self._reconnect(record, worker, {"state": "READY" if event is E.AGENT_READY else "STARTED"},
                            "its worker is back")
        if event is E.AGENT_TERMINATED:
            marker = [fields.pop(k, None) for k in ("bus_publisher", "bus_incarnation", "bus_seq")]
            if isinstance(marker[0], str) and isinstance(marker[1], str) and type(marker[2]) is int:
                self.actions.append(AwaitBus(marker[0], marker[1], marker[2]))
            ok = fields.pop("ok", True) is True and not record.run_errored
            record.run_errored = False
            self._run_over(record, ok, fields, now)
            return
        if event is E.AGENT_STARTED:
            if record.state is S.ASSIGNED:
                self.states.move(record, S.STARTED)
            record.run_errored = False
        elif event is E.AGENT_READY:
            if record.state is S.STARTED:
                self.states.move(record, S.READY)
            self._dirty = True  # dependents may start now
        elif event is E.AGENT_ERROR:
            record.error = str(fields.get("error_message", ""))
            if fields.get("recoverable") is not True:  # a recoverable error does not fail the run
                record.run_errored = True
        else:
            raise protocol.ProtocolError(f"agent event {event.name} is not a lifecycle event")
        self._publish_agent(record, event, fields)

    def _stale_event(self, worker: WorkerRecord, item: dict[str, Any], now: float) -> None:
        """A report about a copy that is not the current run (replaced, or a previous coordinator's)."""
        name = item["agent"]
        if item["event"] == "AGENT_TERMINATED":
            worker.stopping.discard((name, item["run"], item["epoch"]))
            old = self._old_copies.get(name)
            if old is not None and old[:3] == (worker.name, item["run"], item["epoch"]):
                del self._old_copies[name]  # the old copy is gone: ours may start
                self._dirty = True
            foreign = self._foreign.get(name)
            if foreign is not None and (foreign[1]["run"], foreign[1]["epoch"]) == (item["run"], item["epoch"]):
                del self._foreign[name]
                worker.agents.discard(name)
            return
        if worker.alive and name not in self._foreign:
            # an agent copy we no longer consider running there: make sure it stops
            record = self.agents.get(name)
            timeout = record.stop_timeout if record is not None else float(self.config.stop_timeout)
            self._send(worker, "stop", agent=name, run=item["run"], epoch=item["epoch"], timeout=timeout)
            worker.stopping.add((name, item["run"], item["epoch"]))

    # ================================================================== time

    def tick(self, now: float) -> None:
        """Judge liveness, send heartbeats, start what is due.  Call at :meth:`next_wake`."""
        limits = self.limits
        if now - self._last_tick > limits.stall:
            # we were not listening (GC, SIGSTOP, a burst): the queue has been read by now, and
            # nobody's silence during our stall counts against them
            log.warning("coordinator loop stalled for %.1f s: every worker gets a fresh window", now - self._last_tick)
            for worker in self.workers.values():
                worker.last_seen = max(worker.last_seen, now)
        self._last_tick = now
        for worker in list(self.workers.values()):
            if not worker.alive:
                continue
            if worker.disconnected_at is not None and now - worker.disconnected_at > limits.reconnect_grace:
                self._worker_gone(worker, E.WORKER_LOST, f"worker {worker.name!r} was lost (its connection closed "
                                                         "and it did not come back)", now, certain=True)
            elif now - worker.last_seen > limits.silence:
                self._worker_gone(worker, E.WORKER_LOST, f"worker {worker.name!r} was lost (no heartbeat for "
                                                         f"{now - worker.last_seen:.1f} s)", now, certain=False)
            elif now - worker.last_beat_sent >= limits.interval:
                worker.last_beat_sent = now
                self._send(worker, "heartbeat_reply", echo=worker.last_t)
        if any(now >= r.restart_at for r in self.states.of(S.RESTARTING)):
            self._dirty = True
        if self._holding:
            self._dirty = True  # a held agent may be free to go now
        self._expire(now)
        if self._stopping_deadline is not None and now > self._stopping_deadline:
            for record in list(self.agents.values()):
                if record.state is not S.TERMINATED:
                    self._fail_run(record, f"agent {record.name!r} did not stop in time", now, final=True)
            self._stopping_deadline = None
        if not self._workers_ready and now > self._wait_deadline and self.states.count(S.PENDING):
            self._give_up_waiting(now)

    def _expire(self, now: float) -> None:
        limit = self.config.disconnect_timeout
        if limit is not None:
            for record in self.states.of(S.DISCONNECTED):
                if now - record.disconnected_at > limit:
                    self._fail_run(record, f"its worker {record.worker!r} has been unreachable for {limit} s "
                                           "(disconnect_timeout)", now)
        for name, (worker_name, report, deadline) in list(self._foreign.items()):
            if now > deadline:
                # a previous coordinator's agent this script did not register: stop it
                del self._foreign[name]
                worker = self.workers.get(worker_name)
                if worker is not None and worker.alive:
                    worker.agents.discard(name)
                    self._send(worker, "stop", agent=name, run=report["run"], epoch=report["epoch"],
                               timeout=float(self.config.stop_timeout))
                    worker.stopping.add((name, report["run"], report["epoch"]))
        for name, old in list(self._old_copies.items()):
            if now > old[3]:
                del self._old_copies[name]  # its worker's lease has run out: it has stopped
                self._dirty = True
        retention = self.config.worker_retention
        for name in [n for n, w in self.workers.items() if not w.alive and now - w.gone_at > retention]:
            if not any(r.worker == name for r in self.states.of(S.DISCONNECTED)):
                del self.workers[name]
        keep = self.config.finished_agents_max
        while len(self._ended) > keep:
            self._forget(self._ended.popleft())

    def _forget(self, name: str) -> None:
        record = self.agents.get(name)
        if record is None or record.state is not S.TERMINATED or self._depended[name]:
            return  # started again, or something depends on it
        self.states.remove(record)
        del self.agents[name]
        self.forgotten += 1
        self.actions.append(Forget(name))

    def next_wake(self, now: float) -> float:
        """When :meth:`tick` should run next: the regular beat, sooner while a closed connection
        waits out its grace, and no later than the moment the quietest worker's silence limit runs
        out (so a hung worker is declared lost on time, not up to a tick late)."""
        limits = self.limits
        alive = [w for w in self.workers.values() if w.alive]
        soonest = now + (0.05 if any(w.disconnected_at is not None for w in alive) else min(limits.interval, 0.25))
        return min([soonest] + [w.last_seen + limits.silence + 0.001 for w in alive])

    # ================================================================== placement

    def place(self, now: float) -> None:
        """Place what can be placed (after each batch of stimuli; cheap when nothing changed)."""
        if not self._dirty or self._stopping_deadline is not None:
            return
        self._dirty = False
        if not self._workers_ready:
            if sum(w.alive for w in self.workers.values()) < max(1, self.min_workers):
                for record in self.states.of(S.PENDING):
                    record.pending_reason = f"waiting for min_workers={self.min_workers} worker(s) to join"
                return
            self._workers_ready = True
        for record in self.states.of(S.RESTARTING):
            if now >= record.restart_at:
                self.states.move(record, S.PENDING)
        self._holding = False
        cap = self.config.max_workers
        running = self.states.count(*LIVE)
        for record in self.states.of(S.PENDING):
            if record.state is not S.PENDING:  # failed meanwhile, as a dependent of one that failed
                continue
            held = self._hold_until(record) - now
            if held > 0:
                self._holding = True
                record.pending_reason = (f"waiting {held:.1f} s for workers to report (or stop) copies a previous "
                                         "coordinator left running (adoption window)")
                continue
            if record.name in self._old_copies:
                record.pending_reason = f"waiting for the previous copy on {self._old_copies[record.name][0]} to stop"
                continue
            verdict, detail = self._dependency_state(record)
            if verdict == "failed":
                self._fail_run(record, f"dependency {detail} failed", now, final=True)
                continue
            if verdict == "wait":
                record.pending_reason = f"waiting for dependency {detail}"
                continue
            if cap and running >= cap:
                record.pending_reason = f"waiting for a slot: max_workers={cap} agents are running"
                continue
            worker, why = choose(self.workers.values(), record.pin, record.labels)
            if worker is None:
                record.pending_reason = why
                continue
            self._assign(record, worker, now)
            running += 1

    def _hold_until(self, record: AgentRecord) -> float:
        """After a crash of the previous coordinator (``adopt_window`` > 0): a copy it left running
        is reported within the window, unless its worker is cut off.  Once one was reported it was
        adopted or is stopped before ours starts (the old coordinator ran one at a time); if none
        was, a cut-off copy may still run until its lease (or, kept, the orphan timeout) and the
        stop timeout have passed.  Until then no new copy may start."""
        if self._adopt_window <= 0:
            return 0.0
        if not self._strict_hold or record.name in self._found:
            return self._adopt_until
        gone = self.limits.unknown_copy_gone(record.keeps_running, record.stop_timeout)
        return self._started + max(self._adopt_window, gone)

    def _dependency_state(self, record: AgentRecord) -> tuple[str, str]:
        # a long-running dependency (Looping/Periodic) must be READY; a one-shot one (a migration,
        # say) must have finished without error
        for name in record.depends_on:
            dep = self.agents[name]
            if (dep.state is S.READY and not dep.one_shot) or (dep.state is S.TERMINATED and not dep.failed):
                continue
            if dep.state is S.TERMINATED:
                return "failed", name
            return "wait", f"{name} ({dep.state.value})"
        return "ok", ""

    def _assign(self, record: AgentRecord, worker: WorkerRecord, now: float) -> None:
        record.epoch += 1
        record.run = self.incarnation
        record.worker = worker.name
        if record.state is not S.ASSIGNED:
            self.states.move(record, S.ASSIGNED)
        record.pending_reason = ""
        record.started_at = self.wall()
        worker.agents.add(record.name)
        first = record.class_id not in worker.sent_classes
        worker.sent_classes.add(record.class_id)
        self.class_blobs_sent += first
        record.start_n = self._send(worker, "start", agent=record.name, run=record.run, epoch=record.epoch, class_id=record.class_id,
                   class_blob=record.class_blob if first else None, config=record.config_blob, mode=record.mode,
                   stop_timeout=record.stop_timeout, hold=bool(self.config.hold_after_ready),
                   keep=record.keeps_running, definition=record.definition)

    # ================================================================== the end of a run

    def _fail_run(self, record: AgentRecord, reason: str, now: float, *, final: bool = False,
                  not_before: float = 0.0) -> None:
        """End the current run (or the wait for one) as failed, with an AGENT_ERROR first."""
        record.error = reason
        self._publish_agent(record, E.AGENT_ERROR, {"error_message": reason, "traceback": ""})
        self._run_over(record, ok=False, fields={"reason": reason}, now=now, final=final, not_before=not_before)

    def _run_over(self, record: AgentRecord, ok: bool, fields: dict[str, Any], now: float, *,
                  final: bool = False, not_before: float = 0.0) -> None:
        """Publish AGENT_TERMINATED for the run that ended and decide what happens next."""
        worker = self.workers.get(record.worker or "")
        if worker is not None:
            worker.agents.discard(record.name)
        record.failed = not ok
        then, record.then = record.then, None
        policy = record.policy
        if final or record.stop_requested:
            nxt = "final"
        elif then in ("move", "restart"):
            nxt = "again"
        elif policy.wants_restart(failed=not ok):
            nxt = "give_up" if policy.exhausted(record.restarts) else "restart"
        else:
            nxt = "final"
        self.states.move(record, S.TERMINATED)
        self._publish_agent(record, E.AGENT_TERMINATED, {**fields, "ok": ok, "final": nxt == "final"})
        self._dirty = True
        if nxt == "again":
            if not_before > now:
                self._schedule_restart(record, now, not_before - now, "waiting for its worker's lease to run out")
            else:
                self.states.move(record, S.PENDING)
        elif nxt == "restart":
            record.restarts += 1
            delay = max(policy.delay(record.restarts, self.rng), not_before - now)
            reason = record.error if not ok else "finished (restart=always)"
            self._schedule_restart(record, now, delay, reason or "failed", attempt=record.restarts)
        elif nxt == "give_up":
            record.failed = True
            message = f"gave up after {record.restarts} restart(s); last run: {record.error or 'finished'}"
            record.error = message
            self._publish_agent(record, E.AGENT_ERROR, {"error_message": message, "traceback": ""})
            self._publish_agent(record, E.AGENT_TERMINATED, {"ok": False, "final": True})
        if record.state is S.TERMINATED:
            record.ended_at = now
            self._ended.append(record.name)

    def _schedule_restart(self, record: AgentRecord, now: float, delay: float, reason: str,
                          attempt: int | None = None) -> None:
        self.states.move(record, S.RESTARTING)
        record.restart_at = now + delay
        record.pending_reason = f"restarting in {delay:.2f} s"
        self._publish_agent(record, E.AGENT_RESTARTING, {
            "attempt": attempt if attempt is not None else record.restarts, "delay": round(delay, 3), "reason": reason})

    def _give_up_waiting(self, now: float) -> None:
        alive = sum(w.alive for w in self.workers.values())
        self.start_error = (
            f"only {alive} of min_workers={self.min_workers} worker(s) joined within "
            f"worker_wait_timeout={self.config.worker_wait_timeout} s")
        for record in self.states.of(S.PENDING):
            self._fail_run(record, "no worker to run it: " + self.start_error, now, final=True)

    # ================================================================== finishing

    def all_done(self) -> bool:
        """Has the run ended (every agent terminated, and the script waits or stopped)?"""
        if self.finished or self.states.count(S.TERMINATED) != len(self.agents):
            return False
        batch_done = self.config.run_mode.name == "STOP_ON_EMPTY" and self.joined
        return batch_done or self._stopping_deadline is not None or self.stop_requested

    def finish(self) -> None:
        if self.agents or self.forgotten:
            self._publish(E.ALL_AGENTS_TERMINATED, self.name, {"agents": len(self.agents) + self.forgotten})
        self.finished = True
        self._stopping_deadline = None
        self.actions.append(Finished())

    # ================================================================== commands

    def command(self, command: cmd.Command, now: float) -> Any:
        """Carry out a user command (from :mod:`pyorchestrate.commands`); may raise ValueError."""
        return cmd.HANDLERS[type(command)](self, command, now)

    @handles(cmd.AddAgent)
    def _add(self, c: cmd.AddAgent, now: float) -> None:
        record = c.record
        if not c.graph_checked:
            # nothing can depend on a new agent yet, so it closes no cycle (unless it names itself):
            # checking its own dependencies is enough, and keeps adding O(1) however many agents run
            check_graph({record.name: record.depends_on, **{d: [] for d in record.depends_on if d in self.agents}})
        self.agents[record.name] = record
        self.states.add(record)
        self._depended.update(record.depends_on)
        self._dirty = True
        foreign = self._foreign.pop(record.name, None)
        if foreign is not None:
            worker_name, report, _ = foreign
            worker = self.workers.get(worker_name)
            if worker is None or not worker.alive:
                return
            worker.agents.discard(record.name)
            stop: list[dict[str, Any]] = []
            if not self._take_report(worker, report, now, stop):
                for item in stop:
                    self._send(worker, "stop", **item)
                    worker.stopping.add((item["agent"], item["run"], item["epoch"]))

    @handles(cmd.AddDependency)
    def _add_dependency(self, c: cmd.AddDependency, now: float) -> None:
        record = self._record(c.name)
        graph = {n: r.depends_on for n, r in self.agents.items()}
        graph[c.name] = list(dict.fromkeys(record.depends_on + c.deps))
        check_graph(graph)
        self._depended.update(d for d in graph[c.name] if d not in record.depends_on)
        record.depends_on = graph[c.name]
        self._dirty = True

    @handles(cmd.StartAgent)
    def _start_agent(self, c: cmd.StartAgent, now: float) -> None:
        record = self._record(c.name)
        if record.state is not S.TERMINATED:
            raise ValueError(f"agent {c.name!r} is {record.state.value}, not terminated; use restart_agent to restart it")
        record.stop_requested = False
        record.restarts = 0
        record.error = None
        self.states.move(record, S.PENDING)
        self._dirty = True

    def _live_worker(self, record: AgentRecord) -> WorkerRecord | None:
        worker = self.workers.get(record.worker or "")
        return worker if record.state in RUNNING and worker is not None and worker.alive else None

    @handles(cmd.Deliver)
    def _deliver(self, c: cmd.Deliver, now: float) -> None:
        record = self._record(c.name)
        worker = self._live_worker(record)
        if worker is None:
            raise ValueError(f"agent {c.name!r} is not running (state {record.state.value}); nothing to deliver to")
        self._send(worker, "deliver", agent=c.name, run=record.run, epoch=record.epoch, kind=c.kind, payload=c.payload)

    @handles(cmd.Execute)
    def _execute(self, c: cmd.Execute, now: float) -> None:
        records = [self._record(c.name)] if c.name is not None else list(self.agents.values())
        for record in records:
            worker = self._live_worker(record)
            if worker is not None:
                self._send(worker, "deliver", agent=record.name, run=record.run, epoch=record.epoch,
                           kind="execute", payload=None)
            elif c.name is not None:
                raise ValueError(f"agent {c.name!r} is not running (state {record.state.value})")

    @handles(cmd.StopAgent)
    def _stop_agent(self, c: cmd.StopAgent, now: float) -> None:
        record = self._record(c.name)
        record.stop_requested = True
        self._stop_record(record, c.timeout, "stopped", now)

    @handles(cmd.RestartAgent)
    def _restart_agent(self, c: cmd.RestartAgent, now: float) -> None:
        record = self._record(c.name)
        if record.state in RUNNING:
            record.then = "restart"
            record.stop_requested = False
            self._send_stop(record, c.timeout)
        elif record.state is S.TERMINATED:
            self._start_agent(cmd.StartAgent(c.name), now)
        elif record.state is S.RESTARTING:
            self.states.move(record, S.PENDING)
            record.stop_requested = False
            self._dirty = True
        else:
            record.stop_requested = False
            self._dirty = True

    def _stop_record(self, record: AgentRecord, timeout: float, reason: str, now: float) -> None:
        if record.state in (S.PENDING, S.RESTARTING):
            self._run_over(record, ok=True, fields={"reason": f"{reason} before it started"}, now=now, final=True)
        elif record.state in RUNNING:
            self._send_stop(record, timeout)
        elif record.state is S.DISCONNECTED:
            # its worker cannot hear us; when it comes back, the copy is stopped as stale
            self._fail_run(record, f"{reason} while its worker {record.worker!r} was unreachable", now, final=True)

    def _send_stop(self, record: AgentRecord, timeout: float) -> None:
        worker = self._live_worker(record)
        if worker is not None:
            self._send(worker, "stop", agent=record.name, run=record.run, epoch=record.epoch, timeout=float(timeout))

    @handles(cmd.StopAll)
    def _stop_all(self, c: cmd.StopAll, now: float) -> None:
        self._stopping_deadline = now + c.timeout + self.limits.interval * 2
        for record in list(self.agents.values()):
            record.stop_requested = True
            self._stop_record(record, c.timeout, "stopped", now)

    @handles(cmd.DrainWorker)
    def _drain_worker(self, c: cmd.DrainWorker, now: float) -> None:
        worker = self.workers.get(c.name)
        if worker is None or not worker.alive:
            known = ", ".join(sorted(n for n, w in self.workers.items() if w.alive)) or "none"
            raise ValueError(f"no live worker named {c.name!r} (live: {known})")
        worker.draining = True
        log.info("draining worker %s: moving %d agent(s) off it", c.name, len(worker.agents))
        for agent_name in sorted(worker.agents):
            record = self.agents.get(agent_name)
            if record is not None and record.policy.mode != "never" and record.state in RUNNING:
                record.then = "move"
                self._send_stop(record, self.config.stop_timeout)
        self._dirty = True

    def release_drained(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.alive and worker.draining and not worker.agents:
                self._send(worker, "release", drain=True)
                worker.alive = False
                worker.gone_at = now
                self._publish(E.WORKER_LEFT, worker.name, {"worker": worker.name, "host": worker.host,
                                                           "reason": "drained", "agents": []})

    @handles(cmd.Join)
    def _join(self, c: cmd.Join, now: float) -> None:
        self.joined = True

    @handles(cmd.RequestStop)
    def _request_stop(self, c: cmd.RequestStop, now: float) -> None:
        self.stop_requested = True

    @handles(cmd.Snapshot)
    def snapshot(self, c: Any, now: float) -> dict[str, Any]:
        return {
            "agents": {r.name: {
                "name": r.name, "state": r.state.value, "worker": r.worker, "restarts": r.restarts,
                "last_error": r.error, "failed": r.failed, "started_at": r.started_at, "epoch": r.epoch,
                "run": r.run, "pending_reason": r.pending_reason, "restart": r.policy.mode,
                "on_disconnect": "keep" if r.keeps_running else "replace",
                "depends_on": list(r.depends_on)} for r in self.agents.values()},
            "workers": {w.name: {
                "name": w.name, "host": w.host, "pid": w.pid, "labels": dict(w.labels), "capacity": w.capacity,
                "alive": w.alive, "draining": w.draining, "agents": sorted(w.agents), "running": len(w.agents),
                "since_heartbeat": round(now - w.last_seen, 3)} for w in self.workers.values()},
            "incarnation": self.incarnation,
            "forgotten_agents": self.forgotten,
            "class_blobs_sent": self.class_blobs_sent,
        }

    @handles(cmd.Close)
    def close(self, c: Any, now: float) -> None:
        for worker in self.workers.values():
            if worker.alive:
                self._send(worker, "release")
        self._publish(E.SHUTDOWN, self.name, {"coordinator": self.name})
