"""A deterministic simulation of a cluster around the real cluster core.

The core (pyorchestrate.core.ClusterCore) is the production code; around it, this file models
what the sockets, the workers and the agents do, on a simulated clock, with every random choice
drawn from one seeded generator: the same seed replays the same run exactly.

The transport is modelled as ZeroMQ over TCP behaves: messages on one connection arrive in order
after a random delay; a partition holds them until it heals (TCP retransmits); a connection reset
loses what was in flight on it (both ways) and the coordinator's monitor sees the connection
close; a worker that re-registers opens a new connection, and whatever was addressed to the old
one is lost.  Faults: worker crashes (SIGKILL) and restarts, freezes (SIGSTOP), partitions,
connection resets, coordinator stalls and coordinator restarts (same name, new incarnation),
messages the user sends to agents (each copy has a small inbox, takes messages at random and says at
its end what it took, dropped and left waiting; an end the core makes says them unaccounted),
workers stopped with SIGTERM (saying they leave, beating on while their copies stop, some stuck past
their stop timeout) and started again,
workers cut off and started again elsewhere under the same name, and the user's commands.  Agents may be pinned to a worker, depend on another, and workers have a
capacity; some seeds cap the cluster (max_workers) or replace a previous coordinator's copies.

Invariants checked after every step (``Sim.check``) are the product's promises; see
tests/test_core_simulation.py.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from pyorchestrate import commands, protocol
from pyorchestrate.coordinator_pulse import AHEAD, stalled
from pyorchestrate.core import ClusterCore, Forget, Publish, Send
from pyorchestrate.limits import ORPHAN_TIMEOUT, Limits, adopt_window
from pyorchestrate.orchestrator import RunMode
from pyorchestrate.records import AgentRecord
from pyorchestrate.restart import RestartPolicy
from pyorchestrate.states import AgentState
from pyorchestrate_worker.coordinator_vouch import should_ask, takes
from pyorchestrate_worker.fold import fold

REGISTER_RETRY = 1.0  # the worker's registration back-off, simplified
STEP = 0.05  # simulated seconds per step
_ALIVE = ("heartbeat", "agent_events", "register")  # frames that show a worker is alive
CORE_SLICE = 3  # control frames the coordinator reads per loop turn (kept tiny: backlogs build up)
WINDOW_LIMITS = (150, 300)  # bytes of credit (flow.py): one or two frames a heartbeat
STUCK = 0.15  # of the stops a coordinator asks for: the copy is a thread stuck far past its timeout
INBOX = 3  # a copy's inbox bound (kept tiny: some messages are dropped)



def line_problems(core: ClusterCore) -> list[str]:
    """What is wrong with the pending line's own bookkeeping (pending.PendingLine): only pending
    agents in it; each one with dependencies either to be looked at (waiting), or parked or settled
    (not both); the settled ones that may go anywhere in their own group; and watched exactly on
    the dependencies that may change what placement says of each."""
    line = core.states.pending
    pending = {r.name: r for r in core.states.of(AgentState.PENDING)}
    problems = []
    for group in (line.anywhere, line.waiting, line.settled, *line.bound.values(), *line.watched.values()):
        if set(group) - set(pending):
            problems.append(f"not pending: {sorted(set(group) - set(pending))}")
    watched: dict[str, set] = {}
    for name, r in pending.items():
        held = r.settled or r.parked_on is not None
        if r.settled and r.parked_on is not None:
            problems.append(f"{name} parked and settled")
        if r.depends_on and (name in line.waiting) == held:
            problems.append(f"{name}: waiting {name in line.waiting}, parked on {r.parked_on}, settled {r.settled}")
        if (name in line.settled) != (r.settled and r.pin is None and not r.labels):
            problems.append(f"{name}: settled {r.settled} but in the settled group: {name in line.settled}")
        if held:
            for dependency in line._watched_by(r):
                watched.setdefault(dependency, set()).add(name)
    if {d: set(group) for d, group in line.watched.items()} != watched:
        problems.append(f"watched {line.watched} instead of {watched}")
    return problems

@dataclass
class SimConfig:
    """The Orchestrator.Config fields the core reads."""

    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 5
    worker_wait_timeout: float = 1e9
    max_workers: int | None = None
    hold_after_ready: bool = False
    stop_timeout: float = 2.0
    run_mode: RunMode = RunMode.DAEMON
    on_restart: str = "adopt"
    adopt_window: float | None = None
    disconnect_timeout: float | None = None
    finished_agents_max: int = 40
    worker_retention: float = 60.0
    max_message_size: int = 64 * 1024 * 1024


@dataclass
class Copy:
    """One copy of an agent running on a simulated worker."""

    agent: str
    run: str
    epoch: int
    keep: bool
    coordinator: str
    definition: str
    stop_timeout: float
    ready_at: float
    ends_at: float | None  #: a one-shot agent finishes then
    ok: bool
    ready: bool = False
    stop_done: float | None = None  #: a stop takes effect then
    stop_by: float | None = None  #: a worker shutting down gives up on it then (its stop timeout)
    leaving: bool = False  #: its worker's shutdown asked it to stop: its end says so (worker_leaving)
    #: its worker was frozen (SIGSTOP) past its lease: it ran on after thawing until stopped.  No
    #: lease can prevent that (the worker cannot act while stopped); README says so.
    zombie: bool = False
    inbox: int = 0  #: messages delivered and waiting (at most INBOX: then dropped, as Config.inbox_max)
    taken: int = 0
    dropped: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.agent, self.run, self.epoch)


@dataclass
class SimWorker:
    name: str
    incarnation: str
    identity: bytes = b""
    registered: bool = False
    next_register: float = 0.0
    next_beat: float = 0.0
    lease_from: float = 0.0
    lease_expired: bool = False
    next_ask: float = 0.0  # the coordinator's pulse is asked no sooner
    limits: Limits = field(default_factory=Limits)
    copies: dict[tuple[str, str, int], Copy] = field(default_factory=dict)
    outbox: list[tuple[str, str, int, str, dict[str, Any]]] = field(default_factory=list)  # reports not yet sent
    pending: list[dict[str, Any]] = field(default_factory=list)  # kept while unregistered
    recent_ends: list[dict[str, Any]] = field(default_factory=list)
    coordinator: str = ""
    session: str = ""
    in_register: int = 0  # how many pending reports the last register carried
    conn: int = 0  # connections opened by this process
    sent_n: int = 0  # frames sent on the current connection
    recv_n: int = 0  # the last coordinator frame handled on it
    frozen_until: float = 0.0
    frozen_since: float = -1e9
    partitioned_until: float = 0.0
    drained_by: list[str] = field(default_factory=list)  # coordinator sessions that drained it
    left_by: tuple[str, str] = ("", "")  # the coordinator (name, session) it served last, until it finished
    capacity: int = 0
    exiting_at: float | None = None  # SIGTERM: its copies were told to stop; it leaves once they have
    exit_at: float | None = None  # then its process ends


class Sim:
    """One simulated cluster; ``step()`` advances it by one event."""

    def __init__(self, seed: int, workers: int = 4, agents: int = 12, *, faults: bool = True,
                 config: SimConfig | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.config = config or SimConfig(disconnect_timeout=self.rng.choice([None, None, 2.0, 6.0]),
                                          max_workers=self.rng.choice([None, None, None, 6]),
                                          on_restart=self.rng.choice(["adopt", "adopt", "adopt", "replace"]))
        self.limits = Limits(self.config.heartbeat_interval, self.config.heartbeat_liveness)
        self.faults = faults
        self.ids = itertools.count(1)
        self.coordinator_name = "sim"
        self.core_stalled_until = 0.0
        # the coordinator's pulse (coordinator_pulse.py): it answers only while the core's loop is
        # stalled and its process is alive (a call holding the GIL, not SIGSTOP); what it vouched
        # reaches the core's next tick, as its pipe does
        self.core_stall_alive = False
        self.core_last_tick = 0.0
        self.pulse_vouched = 0.0
        self.net: list[tuple[float, int, str, bytes, bytes]] = []  # (at, n, "core"/"worker", identity, frame)
        self.last_delivery: dict[tuple[str, bytes], float] = {}
        self.heard: dict[bytes, float] = {}  # connection -> when the core last read a frame from it
        self.workers: dict[str, SimWorker] = {}
        self.starts: dict[str, int] = {}  # agent -> copies ever started
        self.ended: set[tuple[str, str, int]] = set()  # copies that ended and reported it
        self.ended_in: dict[tuple[str, str, int], str] = {}  # those copies: the worker process (incarnation)
        self.ends_read: set[tuple[str, str, int]] = set()  # copies whose end report the core has read
        self.reached: dict[tuple[str, str, int], bool] = {}  # those copies: did they get to READY?
        #: (agent, coordinator incarnation) -> copies that coordinator started or adopted
        self.runs_of: dict[tuple[str, str], int] = {}
        self.max_live: dict[str, int] = {}
        self.published: list[Publish] = []
        self.forgotten: set[str] = set()
        self.violations: list[str] = []
        self._said: dict[tuple, list[str]] = {}  # (agent, run, epoch) -> STARTED/READY published for it
        self.specs: dict[str, dict[str, Any]] = {}
        self.dropped: list[str] = []
        self._dead: set[bytes] = set()  # connections closed because their process died
        self.log: list[str] = []  # what happened, for reading a failing seed
        self._restarted_at = -1e9
        # messages: drawn from a generator of their own, so the faults each seed draws stay apart
        self.mrng = random.Random(seed * 7919 + 1)
        #: (coordinator incarnation, agent, epoch) -> messages that coordinator took for the run
        self.sent_to: dict[tuple[str, str, int], int] = {}
        self.adopted: set[tuple[str, str, int]] = set()  # (coordinator incarnation, agent, epoch) it adopted
        #: copies that ended and reported it -> (taken, dropped, waiting): their inboxes' counts
        self.end_counts: dict[tuple[str, str, int], tuple[int, int, int]] = {}
        #: (coordinator incarnation, agent, epoch) whose AGENT_TERMINATED was published
        self.ends_said: set[tuple[str, str, int]] = set()
        for i in range(workers):
            self._new_worker(f"w{i}")
        self.core = self._new_core(adopt=0.0)
        for i in range(agents):
            self.add_agent(f"a{i}")

    # ------------------------------------------------------------------ set-up

    def _new_worker(self, name: str, capacity: int | None = None) -> None:
        capacity = self.rng.choice([0, 0, 3, 6]) if capacity is None else capacity  # --capacity (0: no limit)
        self.workers[name] = SimWorker(name, f"inc{next(self.ids)}", next_register=self.now + self.rng.uniform(0, 1),
                                       lease_from=self.now, capacity=capacity)

    def _new_core(self, adopt: float, strict: bool = True) -> ClusterCore:
        core = ClusterCore(self.coordinator_name, f"coord{next(self.ids)}", self.config, now=self.now,
                           rng=random.Random(self.rng.random()), wall=lambda: self.now,
                           drop=lambda kind, detail, **_: self.dropped.append(kind), min_workers=1, adopt_window=adopt,
                           strict_hold=strict, crash_window=adopt_window(self.limits),
                           versions={})
        # a credit of a frame or two (flow.py): frames wait for room often (15 % of sends), and go
        # only as heartbeats say they were read, so waiting frames meet every fault here
        core.window_limits = WINDOW_LIMITS
        self.core_at = self.now
        return core

    def add_agent(self, name: str) -> None:
        rng = self.rng
        mode = rng.choice(["never", "on-failure", "always"])
        spec = {"mode": mode, "one_shot": rng.random() < 0.5, "stop_timeout": rng.choice([0.5, 2.0, 5.0]),
                "fail": rng.random() < 0.3, "duration": rng.uniform(0.5, 20.0)}
        # some one-shot runs end at once: their STARTED, READY and end go in one report, folded
        # (protocol 9); decided from what was drawn, so every seed's other draws stay the same
        spec["instant"] = spec["one_shot"] and spec["duration"] < 2.5
        # where its default (keep only what never restarts) is overridden: a kept agent that
        # restarts is replaced once given up (disconnect_timeout), while its cut-off copy runs on
        spec["on_disconnect"] = rng.choice([None, None, "keep", "replace"])
        # worker="w1" (that worker may be lost, or full, for a while), and depends_on an earlier agent
        spec["pin"] = rng.choice(sorted(self.workers)) if rng.random() < 0.15 else None
        earlier = sorted(self.specs)
        spec["depends_on"] = [rng.choice(earlier)] if earlier and rng.random() < 0.2 else []
        self.specs[name] = spec
        self.core.command(commands.AddAgent(self._record(name)), self.now)
        self._apply()

    def _record(self, name: str) -> AgentRecord:
        spec = self.specs[name]
        return AgentRecord(name=name, agent_class=object, config=None, class_id="c", class_blob=b"",
                           config_blob=name.encode(), mode="thread",
                           policy=RestartPolicy(spec["mode"], max_restarts=-1, initial=0.5, maximum=4.0),
                           one_shot=spec["one_shot"], definition=f"def-{name}-{spec.get('version', 1)}",
                           stop_timeout=spec["stop_timeout"], on_disconnect=spec["on_disconnect"],
                           pin=spec["pin"], depends_on=list(spec["depends_on"]))

    # ------------------------------------------------------------------ the network

    def _deliver_at(self, direction: str, identity: bytes, worker: SimWorker | None) -> float:
        at = self.now + self.rng.uniform(0.001, 0.05) + (self.rng.expovariate(4.0) if self.rng.random() < 0.05 else 0)
        if worker is not None and worker.partitioned_until > self.now:
            at = max(at, worker.partitioned_until + 0.01)  # held by TCP until the link heals
        key = (direction, identity)
        at = max(at, self.last_delivery.get(key, 0.0))  # one connection delivers in order
        self.last_delivery[key] = at
        return at

    def _worker_by_identity(self, identity: bytes) -> SimWorker | None:
        for worker in self.workers.values():
            if worker.identity == identity:
                return worker
        return None

    def to_core(self, worker: SimWorker, frame: bytes) -> None:
        heapq.heappush(self.net, (self._deliver_at("core", worker.identity, worker), next(self.ids), "core",
                                  worker.identity, frame))

    def _apply(self) -> None:
        """Carry out the core's actions."""
        for action in self.core.take():
            if isinstance(action, Send):
                worker = self._worker_by_identity(action.identity)
                heapq.heappush(self.net, (self._deliver_at("worker", action.identity, worker), next(self.ids),
                                          "worker", action.identity, action.frame))
            elif isinstance(action, Publish):
                self.published.append(action)
                if action.event.value in ("AGENT_STARTED", "AGENT_READY", "AGENT_ADOPTED"):
                    self._check_said(action)
                elif (action.event.value == "AGENT_TERMINATED" and action.fields.get("ok") is True
                      and "reason" not in action.fields):  # the core's own ends give a reason
                    self._check_end_said(action)
                if action.event.value == "AGENT_TERMINATED":
                    self._check_messages(action)
                if action.event.value == "AGENT_ADOPTED" and action.fields.get("reason", "").startswith("still"):
                    self._count_run(action.subject, self.core.incarnation)
                    self.adopted.add((self.core.incarnation, action.subject, action.fields.get("epoch")))
                self.log.append(f"t={self.now:.2f} core {action.event.value} {action.subject} "
                                f"{ {k: v for k, v in action.fields.items() if k in ('worker', 'epoch', 'reason')} }")
                if action.event.value == "WORKER_LOST":
                    self._check_loss(action.subject)
                reason = str(action.fields.get("error_message", ""))
                if "was not reported" in reason or "came back without" in reason:
                    self._check_lost_track(action.subject, reason)
            elif isinstance(action, Forget):
                self.forgotten.add(action.name)

    def _user_sends(self) -> None:
        """orchestrator.send to an agent the core holds (refused if it is not running)."""
        name = self.mrng.choice(sorted(self.core.agents))
        record = self.core.agents[name]
        try:
            self.core.command(commands.Deliver(name, "message", self.now), self.now)
        except ValueError:
            return
        key = (self.core.incarnation, name, record.epoch)
        self.sent_to[key] = self.sent_to.get(key, 0) + 1
        self._apply()

    def _check_messages(self, action: Publish) -> None:
        """No message is lost uncounted: of those the core took for a run it started, its end (as
        its worker reported it) says how many were taken, and the rest are counted dropped or
        unhandled, wherever they were lost (the inbox, a connection reset, a copy that had ended).
        An end the core makes (its worker lost, say) says them all unaccounted."""
        # (a run is named by its epoch here: the record may have moved on to its next run since,
        # and this coordinator's runs and the one it adopted never share an epoch)
        incarnation, epoch = self.core.incarnation, action.fields.get("epoch")
        key = (incarnation, action.subject, epoch)
        if key in self.ends_said:
            return  # said before: a give-up after it, a stop of the agent waiting for its next run
        self.ends_said.add(key)
        sent = self.sent_to.get(key, 0)
        if not action.fields.get("sim_end"):
            said = action.fields.get("messages_unaccounted", 0)
            if said != sent:
                self.violations.append(f"t={self.now:.2f}: {action.subject} epoch {epoch} ended by the core: {sent} "
                                       f"messages sent, {said} said unaccounted")
            return
        counts = self.end_counts.get((action.subject, incarnation, epoch))
        if key in self.adopted or counts is None:
            return  # adopted: its predecessor sent it messages too (the count is a lower bound)
        counted = counts[0] + action.fields.get("messages_dropped", 0) + action.fields.get("messages_unhandled", 0)
        if counted != sent:
            self.violations.append(f"t={self.now:.2f}: {action.subject} epoch {epoch}: {sent} messages sent, "
                                   f"{counts[0]} taken, {counted - counts[0]} counted lost")

    def _count_run(self, agent: str, incarnation: str) -> None:
        """restart="never": one coordinator starts (or adopts) it at most once; a restarted script
        registers its agents anew (and adopts those still running instead of starting them)."""
        runs = self.runs_of[(agent, incarnation)] = self.runs_of.get((agent, incarnation), 0) + 1
        if self.specs[agent]["mode"] == "never" and runs > 1:
            self.violations.append(f"t={self.now:.2f}: {agent} (restart=never) started {runs} times")

    def _check_lost_track(self, agent: str, reason: str) -> None:
        """The core gave up on a copy it cannot account for: right only if the copy died with its
        worker's process, never if it still runs or ended and reported it (reports are complete)."""
        record = self.core.agents[agent]
        copy = (agent, record.run, record.epoch)
        # an end its worker reported but the core never read, lost with that worker's process
        # (SIGKILL), leaves nothing to account for it: the core cannot know, and says it failed
        lost_with_process = copy not in self.ends_read and self.ended_in.get(copy) not in {
            w.incarnation for w in self.workers.values()}
        if (copy in self.ended and not lost_with_process) or any(copy in w.copies for w in self.workers.values()):
            self.violations.append(f"t={self.now:.2f}: false failure of {agent}: {reason}")

    def _check_loss(self, name: str) -> None:
        """No worker is declared lost while frames from it reached the coordinator (read or not)
        within the silence limit, unless its connection closed (its process died)."""
        record = self.core.workers.get(name)
        if record is None or record.identity in self._dead:
            return
        heard = self.heard.get(record.identity, -1e9)
        arrived = [at for at, _, direction, identity, frame in self.net
                   if direction == "core" and identity == record.identity and at <= self.now
                   and protocol.decode(frame)["type"] in _ALIVE]
        heard = max([heard] + arrived)
        if self.now - heard < self.limits.silence - 1e-6:
            self.violations.append(f"t={self.now:.2f}: {name} declared lost, last heard {self.now - heard:.2f} s ago")

    # ------------------------------------------------------------------ one step

    def step(self) -> None:
        """Advance to the next thing that happens (a message, a timer, a fault) and do it."""
        self.now += STEP
        if self.faults:
            self._fault()
        if self.mrng.random() < 0.1:
            self._user_sends()
        to_core = 0
        while self.net and self.net[0][0] <= self.now:
            if self.net[0][2] != "worker" and self.core_stalled_until <= self.now and to_core >= CORE_SLICE:
                break  # the real loop reads a bounded slice per turn, then judges liveness
            _, n, direction, identity, frame = heapq.heappop(self.net)
            if direction == "pulse":  # the pulse is a process of its own: the core's stall does not hold it
                self._pulse_receive(identity, frame)
                continue
            if direction in ("core", "close"):
                if self.core_stalled_until > self.now:  # it reads them after the stall, in order
                    heapq.heappush(self.net, (self.core_stalled_until, n, direction, identity, frame))
                    continue
                to_core += 1
                if direction == "close":
                    self.core.disconnected(identity, self.now)
                    self._apply()
                else:
                    self._core_receive(identity, frame)
            else:
                worker = self._worker_by_identity(identity)
                if worker is not None and worker.frozen_until <= self.now:
                    self._worker_receive(worker, frame)
                elif worker is not None:  # frozen: it reads later, in order
                    heapq.heappush(self.net, (worker.frozen_until, n, direction, identity, frame))
        if self.core_stalled_until <= self.now:
            behind = bool(self.net) and self.net[0][0] <= self.now and self.net[0][2] != "worker"
            self.core.tick(self.now, behind, self.pulse_vouched)
            self.pulse_vouched, self.core_last_tick = 0.0, self.now
            self.core.place(self.now)
            self.core.release_drained(self.now)
            self._apply()
        for worker in list(self.workers.values()):
            if worker.frozen_until <= self.now:
                self._worker_step(worker)
        self.check()

    def _pulse_receive(self, identity: bytes, frame: bytes) -> None:
        """The coordinator's pulse answers a worker's ask if the core's loop is stalled and its
        process alive; the answer goes back on the ask's own connection."""
        message = protocol.decode(frame)
        if not (self.core_stalled_until > self.now and self.core_stall_alive
                and stalled(self.now, self.core_last_tick, self.limits.stall)):
            return
        self.pulse_vouched = max(self.pulse_vouched, self.now + AHEAD)
        worker = self._worker_by_identity(identity)
        heapq.heappush(self.net, (self._deliver_at("vouch", identity, worker), next(self.ids), "vouch", identity,
                                  protocol.encode("coordinator_pulse_reply", echo=message["t"],
                                                  session=self.core.incarnation)))

    def _core_receive(self, identity: bytes, frame: bytes) -> None:
        message = protocol.decode(frame)
        self.ends_read.update((e["agent"], e["run"], e["epoch"]) for e in message.get("events", ())
                              if e["event"] == "AGENT_TERMINATED")
        self.core.control(identity, message, self.now)
        if message["type"] in _ALIVE:
            self.heard[identity] = self.now
        self._apply()

    # ------------------------------------------------------------------ the worker model

    def _send(self, worker: SimWorker, type_: str, **fields: Any) -> None:
        worker.sent_n += 1
        self.to_core(worker, protocol.encode(type_, n=worker.sent_n, **fields))

    def _close(self, worker: SimWorker, on_purpose: bool) -> None:
        """Its connection closes; the coordinator's monitor sees that (not before a partition
        heals), maybe before it reads frames sent on it.  On purpose, the worker says "closing" first."""
        if not worker.identity:
            return
        if on_purpose:
            self._send(worker, "closing")
        if not on_purpose:
            self._dead.add(worker.identity)
        # the monitor's report of the close travels apart from the frames (another socket): it
        # may be read before frames sent on that connection are (a busy loop reads a slice a turn)
        at = max(self._deliver_at("monitor", worker.identity, worker), self.now + self.rng.uniform(0.0, 0.05))
        heapq.heappush(self.net, (at, next(self.ids), "close", worker.identity, b""))

    def _reconnect(self, worker: SimWorker) -> None:
        """Close the connection and register on a new one (what was in flight on the old is lost)."""
        self._close(worker, on_purpose=True)
        worker.identity = f"{worker.name}/{next(self.ids)}".encode()
        worker.sent_n = worker.recv_n = 0
        worker.conn += 1
        self._register(worker)

    def _report(self, worker: SimWorker, copy: Copy, event: str, fields: dict[str, Any] | None = None) -> None:
        worker.outbox.append((copy.agent, copy.run, copy.epoch, event, dict(fields or {})))

    @staticmethod
    def _take_outbox(worker: SimWorker) -> list[dict[str, Any]]:
        """What its agents reported since the last take, as the worker's _keep_reports makes it
        (a short run's reports folded into its end, protocol 9)."""
        items = [protocol.agent_event(*report) for report in fold(worker.outbox)]
        worker.outbox = []
        return items

    def _worker_step(self, worker: SimWorker) -> None:
        now = self.now
        self._end_copies(worker)
        self._check_lease(worker)  # (an exiting worker stops its copies anyway; frozen past its lease, they were zombies)
        if worker.exiting_at is not None:
            self._exit_when_stopped(worker)
            return
        # the echoes are late: ask the pulse (at most every quarter interval, registered or not, as
        # CoordinatorVouch does from the worker's lease check)
        if worker.session and now >= worker.next_ask and should_ask(now, worker.lease_from, worker.limits):
            worker.next_ask = now + worker.limits.interval / 4
            heapq.heappush(self.net, (self._deliver_at("pulse", worker.identity, worker), next(self.ids),
                                      "pulse", worker.identity, protocol.encode("coordinator_pulse", t=now)))
        if worker.registered:
            if worker.pending or worker.outbox:
                self._flush(worker)
            if now >= worker.next_beat:
                worker.next_beat = now + worker.limits.interval
                # as the real worker's: not numbered, saying how far its numbered frames go (flow.py)
                self.to_core(worker, protocol.encode("heartbeat", t=now, running=len(worker.copies),
                                                     read=worker.recv_n, sent=worker.sent_n))
        else:
            worker.pending.extend(self._take_outbox(worker))
            if now - worker.lease_from > ORPHAN_TIMEOUT:  # --orphan-timeout: even kept copies stop
                for copy in worker.copies.values():
                    self._stop(copy, copy.stop_timeout)
            if now >= worker.next_register:
                worker.next_register = now + REGISTER_RETRY * self.rng.uniform(0.5, 1.5)
                self._reconnect(worker)

    def _end_copies(self, worker: SimWorker) -> None:
        now = self.now
        for copy in list(worker.copies.values()):
            if copy.inbox and self.mrng.random() < 0.3:
                copy.inbox -= 1
                copy.taken += 1
            if not copy.ready and now >= copy.ready_at:
                copy.ready = True
                self._report(worker, copy, "AGENT_READY")
            ended = copy.stop_done is not None and now >= copy.stop_done
            finished = copy.ends_at is not None and now >= copy.ends_at
            if ended or finished:
                ok = True if ended else copy.ok
                if not ok:
                    self._report(worker, copy, "AGENT_ERROR", {"error_message": "boom"})
                fields = {"ok": ok, "reached": "READY" if copy.ready else "STARTED"}
                if copy.leaving:
                    fields["worker_leaving"] = True
                if ended and not copy.ready and self.specs[copy.agent]["one_shot"]:
                    fields["not_run"] = True  # stopped before its work began (see BaseAgent._not_run)
                # its inbox's counts, as BaseAgent.run's end says them; sim_end: reported by its worker
                fields.update(messages_taken=copy.taken, sim_end=True)
                if copy.dropped:
                    fields["messages_dropped"] = copy.dropped
                if copy.inbox:
                    fields["messages_unhandled"] = copy.inbox
                self.end_counts[copy.key] = (copy.taken, copy.dropped, copy.inbox)
                self._report(worker, copy, "AGENT_TERMINATED", fields)
                self.ended.add(copy.key)
                self.ended_in[copy.key] = worker.incarnation
                self.reached[copy.key] = copy.ready
                del worker.copies[copy.key]

    def _gone_for_good(self, worker: SimWorker) -> bool:
        """A process that ended: one that its name had passed from (rescheduled elsewhere) is not
        started again (True); the current one is, by the caller."""
        if self.workers[worker.name] is worker:
            return False
        del self.workers[next(key for key, w in self.workers.items() if w is worker)]
        return True

    def _shut_down(self, worker: SimWorker) -> None:
        """SIGTERM: it stops every copy (each with its stop_timeout), and reads nothing more; it
        says it leaves (what ended before goes first), and beats on while they stop."""
        worker.exiting_at = self.now
        self._beat_leaving(worker)
        for copy in worker.copies.values():
            self._stop(copy, copy.stop_timeout, told=True)  # some are stuck threads
            copy.stop_by = self.now + copy.stop_timeout
            copy.leaving = True

    def _beat_leaving(self, worker: SimWorker) -> None:
        if worker.registered and worker.identity:
            if worker.pending or worker.outbox:
                self._flush(worker)
            worker.next_beat = self.now + worker.limits.interval
            self.to_core(worker, protocol.encode("heartbeat", t=self.now, running=len(worker.copies), read=worker.recv_n,
                                                 sent=worker.sent_n, leaving=True))

    def _exit_when_stopped(self, worker: SimWorker) -> None:
        """Once each copy has ended or is past its stop timeout (a stuck thread, given up on), it
        reports what ended and leaves: "goodbye" if nothing runs, else "closing" (worker/node.py);
        its process ends, taking stuck copies with it, and is started again a little later."""
        if worker.registered and (worker.pending or worker.outbox):
            self._flush(worker)  # ends as they come, as its wait loop flushes them
        if worker.exit_at is None and self.now >= worker.next_beat:
            self._beat_leaving(worker)
        if any(copy.stop_by is not None and self.now < copy.stop_by for copy in worker.copies.values()):
            return
        if worker.exit_at is None:
            if worker.identity:
                if worker.copies:
                    self._send(worker, "closing", exiting=True)
                elif worker.registered:
                    self._send(worker, "goodbye")
            # the rest of its teardown (the bus's last events, sockets' linger) before the process ends
            worker.exit_at = self.now + self.rng.uniform(0.05, 1.0)
        if self.now < worker.exit_at:
            return
        self.log.append(f"t={self.now:.2f} {worker.name} exits, {len(worker.copies)} stuck")
        self._close(worker, on_purpose=False)  # its process is gone
        if self._gone_for_good(worker):
            return
        self._new_worker(worker.name, worker.capacity)
        replacement = self.workers[worker.name]
        replacement.partitioned_until = worker.partitioned_until
        replacement.next_register = self.now + self.rng.uniform(0.5, 3.0)

    def _check_lease(self, worker: SimWorker) -> None:
        """As the worker's loop does first thing each turn: past the lease, stop what is replaced."""
        if not worker.lease_expired and self.now - worker.lease_from > worker.limits.lease:
            worker.registered = False
            worker.lease_expired = True
            paused_past_lease = worker.frozen_since > worker.lease_from  # it could not act in time
            for copy in worker.copies.values():
                if not copy.keep:
                    self._stop(copy, copy.stop_timeout)
                    copy.zombie = paused_past_lease
            worker.next_register = self.now

    def _flush(self, worker: SimWorker) -> None:
        items = worker.pending + self._take_outbox(worker)
        worker.pending = []
        for item in items:
            if item["event"] == "AGENT_TERMINATED":
                worker.recent_ends = (worker.recent_ends + [item])[-50:]
        self._send(worker, "agent_events", events=items)

    def _register(self, worker: SimWorker) -> None:
        running = [{"agent": c.agent, "run": c.run, "epoch": c.epoch, "state": "READY" if c.ready else "STARTED",
                    "coordinator": c.coordinator, "definition": c.definition, "stopping": c.stop_done is not None}
                   for c in worker.copies.values()]
        worker.pending.extend(self._take_outbox(worker))
        worker.in_register = len(worker.pending)
        self._send(worker, "register", name=worker.name, incarnation=worker.incarnation, host="h", pid=1, labels={},
                   capacity=worker.capacity, versions={}, agents=running, events=worker.recent_ends + worker.pending, t=self.now,
                   seen=worker.recv_n, seen_session=worker.session or "", conn=worker.conn,
                   token=f"secret-{worker.incarnation}", drained_by=worker.drained_by,
                   left_by=worker.left_by[0], left_session=worker.left_by[1])

    def _stop(self, copy: Copy, timeout: float, told: bool = False) -> None:
        """``told``: the coordinator asked (a stop frame, a welcome's stop list), so it was in touch."""
        done = self.now + timeout * self.rng.uniform(0.3, 0.95)  # most of its timeout: slow stoppers
        if told and self.rng.random() < STUCK:
            # a thread stuck in its cycle: it ends long after its timeout, and its worker, in
            # touch, says it still runs; nothing may start another copy meanwhile
            done = self.now + timeout * self.rng.uniform(2.0, 5.0)
        copy.stop_done = done if copy.stop_done is None else min(copy.stop_done, done)

    def _worker_receive(self, worker: SimWorker, frame: bytes) -> None:
        if worker.exiting_at is not None:
            return  # shutting down: its loop has ended
        self._check_lease(worker)
        message = protocol.decode(frame)
        kind = message["type"]
        if kind == "coordinator_pulse_reply":  # on a connection of its own: not numbered
            if message["session"] == worker.session and takes(message["echo"], self.now, worker.limits):
                if message["echo"] > worker.lease_from:
                    worker.lease_from = message["echo"]
                    worker.lease_expired = False
            return
        if kind == "welcome" and message["session"] != worker.session:
            worker.recv_n = message["n"] - 1  # a new coordinator on this connection numbers from 1
        if message["n"]:
            if message["n"] != worker.recv_n + 1:  # frames were lost: register on a new connection
                worker.registered = False
                self._reconnect(worker)
                return
            worker.recv_n = message["n"]
        if kind == "welcome":
            worker.registered = True
            worker.session = message["session"]
            worker.coordinator = message["coordinator"]
            worker.left_by = (worker.coordinator, worker.session)
            worker.limits = Limits(message["heartbeat_interval"], message["heartbeat_liveness"])
            worker.lease_from = max(worker.lease_from, message["echo"])
            worker.lease_expired = False
            del worker.pending[:worker.in_register]  # what came after it goes out next
            worker.in_register = 0
            worker.next_beat = self.now
            for item in message["stop"]:
                copy = worker.copies.get((item["agent"], item["run"], item["epoch"]))
                if copy is not None:
                    self._stop(copy, item["timeout"], told=True)
        elif kind == "heartbeat_reply":
            if message["echo"] > worker.lease_from:
                worker.lease_from = message["echo"]
                worker.lease_expired = False
            if message["sent"] > worker.recv_n:  # frames sent before it were lost (flow.py)
                worker.registered = False
                self._reconnect(worker)
        elif kind == "starts":
            for item in message["agents"]:
                self._start(worker, item)
        elif kind == "stop":
            copy = worker.copies.get((message["agent"], message["run"], message["epoch"]))
            if copy is not None:
                self._stop(copy, message["timeout"], told=True)
        elif kind == "deliver":  # a copy that ended (or never started here) is sent nothing: dropped
            copy = worker.copies.get((message["agent"], message["run"], message["epoch"]))
            if copy is not None and copy.inbox < INBOX:
                copy.inbox += 1
            elif copy is not None:
                copy.dropped += 1
        elif kind == "refused":  # it stops what it is told, and tries again after its back-off
            for item in message["stop"]:
                copy = worker.copies.get((item["agent"], item["run"], item["epoch"]))
                if copy is not None:
                    self._stop(copy, item["timeout"], told=True)
            worker.registered = False
            worker.next_register = self.now + REGISTER_RETRY * self.rng.uniform(0.5, 1.5)
        elif kind == "reregister":
            self._register(worker)
            del worker.pending[:worker.in_register]  # same connection: it arrives first
            worker.in_register = 0
        elif kind == "release":
            if message["drain"]:  # that coordinator refuses it from now on (it waits for the next)
                worker.drained_by.append(worker.session)
            else:
                worker.left_by = ("", "")
            for copy in worker.copies.values():
                self._stop(copy, copy.stop_timeout)
            worker.registered = False
            worker.next_register = self.now + 0.5

    def _start(self, worker: SimWorker, item: dict) -> None:
        """One agent of a starts frame."""
        if worker.lease_expired or not worker.registered or worker.exiting_at is not None:
            return
        spec = self.specs[item["agent"]]
        ready_at = self.now + self.rng.uniform(0.0, 0.5)
        ends_at = self.now + spec["duration"] * self.rng.uniform(0.5, 1.5) if spec["one_shot"] else None
        if spec["instant"]:
            ready_at = ends_at = self.now
        copy = Copy(item["agent"], item["run"], item["epoch"], item["keep"], worker.coordinator,
                    item["definition"], item["stop_timeout"], ready_at, ends_at,
                    not (spec["fail"] and self.rng.random() < 0.5))
        worker.copies[copy.key] = copy
        self.starts[copy.agent] = self.starts.get(copy.agent, 0) + 1
        self._count_run(copy.agent, copy.run)
        self.log.append(f"t={self.now:.2f} {worker.name} starts {copy.agent} epoch {copy.epoch} ({copy.run[-4:]})")
        self._report(worker, copy, "AGENT_STARTED")

    # ------------------------------------------------------------------ faults

    def _fault(self) -> None:
        rng = self.rng
        if rng.random() > 0.01:
            return
        kind = rng.choice(["crash", "freeze", "partition", "reset", "stall", "restart_coordinator", "add", "stop",
                           "restart", "start", "drain", "shutdown", "reschedule"])
        worker = self.workers[rng.choice(sorted(self.workers))]
        self.log.append(f"t={self.now:.2f} FAULT {kind} {worker.name}")
        if kind == "crash":  # SIGKILL: its copies die with it; the connection closes
            self._close(worker, on_purpose=False)
            if self._gone_for_good(worker):
                return
            self._new_worker(worker.name)  # restarted under the same name, a new process
            self.workers[worker.name].partitioned_until = worker.partitioned_until  # same host, same link
        elif kind == "reschedule":
            # its host is cut off, and its container is started again elsewhere under the same
            # name (a new process): the old one runs on, cut off, and tries to come back later
            if (worker.exiting_at is None and self.workers[worker.name] is worker
                    and sum("@" in key for key in self.workers) < 3):
                worker.partitioned_until = max(worker.partitioned_until, self.now + rng.uniform(5.0, 30.0))
                self.workers[f"{worker.name}@{next(self.ids)}"] = worker
                self._new_worker(worker.name, worker.capacity)
        elif kind == "shutdown":  # SIGTERM (then started again)
            if worker.exiting_at is None:
                self._shut_down(worker)
        elif kind == "freeze":
            # only ever extended: frames held for the old end must not overtake newer ones
            if worker.frozen_until <= self.now:
                worker.frozen_since = self.now
            worker.frozen_until = max(worker.frozen_until, self.now + rng.uniform(1.0, 3 * self.limits.silence))
        elif kind == "partition":
            worker.partitioned_until = self.now + rng.uniform(1.0, 3 * self.limits.silence)
        elif kind == "reset" and worker.identity:
            # what was in flight on its connection is lost (ZeroMQ reconnects under the same
            # identity): a start, a report; the heartbeat count repairs it
            self.net = [m for m in self.net if m[3] != worker.identity]
            heapq.heapify(self.net)
        elif kind == "stall":
            self.core_stalled_until = max(self.core_stalled_until, self.now + rng.uniform(1.0, 3 * self.limits.silence))
            self.core_stall_alive = rng.random() < 0.5  # a call holding the GIL (its pulse answers), or SIGSTOP
        elif kind == "restart_coordinator":  # SIGKILL and start the same script again
            # what was queued for the old one (and its pulse) is gone; what its pulse said is on its way
            self.net = [m for m in self.net if m[2] in ("worker", "vouch")]
            heapq.heapify(self.net)
            self.heard.clear()
            # half the time its run marker is lost (a fresh container): it waits the window, not
            # knowing, and only the workers' word makes the wait a crash's.  That holds where every
            # worker process knows the crashed coordinator: one started since (a restart, a
            # reschedule) has nothing to say, and a copy cut off elsewhere could then run twice (the
            # README's stated limit), so the marker is lost only where none is new
            knowing = all(w.left_by[0] == self.coordinator_name for w in self.workers.values()
                          if w.exiting_at is None)
            marker = not knowing or rng.random() < 0.5
            self.log.append(f"t={self.now:.2f} run marker {'found' if marker else 'lost'}")
            self.core = self._new_core(adopt=adopt_window(self.limits), strict=marker)
            self.pulse_vouched, self.core_last_tick = 0.0, self.now  # the new script's own pulse
            for name in self.specs:
                if rng.random() < 0.2:  # the user changed it: its running copy is stopped, not adopted
                    self.specs[name]["version"] = self.specs[name].get("version", 1) + 1
                if name not in self.forgotten:
                    self.core.command(commands.AddAgent(self._record(name), graph_checked=True), self.now)
            self._restarted_at = self.now
            self._apply()
        elif kind == "add":
            self.add_agent(f"a{len(self.specs)}")
        elif kind == "stop":
            running = sorted(n for n, r in self.core.agents.items() if r.state.value != "TERMINATED")
            if running:
                self.core.command(commands.StopAgent(rng.choice(running), 1.0), self.now)
                self._apply()
        elif kind == "drain":  # drain_worker: its agents that restart move off it, then it is released
            alive = sorted(n for n, w in self.core.workers.items() if w.alive and not w.draining)
            if len(alive) > 1:
                self.core.command(commands.DrainWorker(rng.choice(alive)), self.now)
                self._apply()
        elif kind in ("restart", "start"):  # restart_agent / start_agent: a user's new copy, any time
            # (not of restart="never" agents: one start per coordinator is what _count_run checks)
            wanted = "TERMINATED" if kind == "start" else None
            names = sorted(n for n, r in self.core.agents.items() if self.specs[n]["mode"] != "never"
                           and (wanted is None or r.state.value == wanted))
            if names:
                name = rng.choice(names)
                self.core.command(commands.RestartAgent(name, 1.0) if kind == "restart" else commands.StartAgent(name),
                                  self.now)
                self._apply()

    # ------------------------------------------------------------------ invariants

    def _check_said(self, action: Publish) -> None:
        """Callbacks see each run's STARTED once, then its READY once (a previous coordinator's
        run, adopted, said them under that coordinator)."""
        run = action.record.run if action.record is not None else ""
        said = self._said.setdefault((action.subject, run, action.fields.get("epoch")), [])
        event = action.event.value.removeprefix("AGENT_")
        if event == "ADOPTED":
            if str(action.fields.get("reason", "")).startswith("still running"):
                said.append("STARTED")
                said.append("ADOPTED")  # its READY, if any, was said by the coordinator that started it
            return
        if event in said:
            self.violations.append(f"t={self.now:.2f}: {action.subject} run {run[-4:]}.{action.fields.get('epoch')} "
                                   f"said {event} twice")
        elif event == "READY" and "STARTED" not in said:
            self.violations.append(f"t={self.now:.2f}: {action.subject} run {run[-4:]}.{action.fields.get('epoch')} "
                                   f"said READY before STARTED")
        said.append(event)

    def _check_end_said(self, action: Publish) -> None:
        """A run that ended well on its worker (an end only its report can tell) was said STARTED
        before its end, and READY if it got there: whichever connection those reports took."""
        run = action.record.run if action.record is not None else ""
        key = (action.subject, run, action.fields.get("epoch"))
        if key not in self.ended:
            return
        said = self._said.get(key, [])
        if "ADOPTED" in said:
            return
        wanted = ["STARTED", "READY"] if self.reached[key] else ["STARTED"]
        if not set(wanted) <= set(said):  # the order and "once" are _check_said's
            self.violations.append(f"t={self.now:.2f}: {action.subject} run {run[-4:]}.{key[2]} ended, said only {said}")

    def live_copies(self, agent: str) -> list[tuple[str, Copy]]:
        """Copies that run now: not paused (a frozen process runs nothing), not zombies."""
        return [(w.name, c) for w in self.workers.values() if w.frozen_until <= self.now
                for c in w.copies.values() if c.agent == agent and not c.zombie]

    def check(self) -> None:
        self.violations += [f"t={self.now:.2f}: pending line: {problem}" for problem in line_problems(self.core)]
        live: dict[str, int] = {}
        for worker in self.workers.values():  # one pass over every copy (see live_copies)
            if worker.frozen_until <= self.now:
                for copy in worker.copies.values():
                    if not copy.zombie:
                        live[copy.agent] = live.get(copy.agent, 0) + 1
        for agent, count in live.items():
            if count > 1:
                self.violations.append(f"t={self.now:.2f}: {agent} has {count} live copies: "
                                       f"{[(w, c.run[-4:], c.epoch) for w, c in self.live_copies(agent)]}")
        if len(self.core.agents) > self.config.finished_agents_max + self.core.states.count(
                *(s for s in AgentState if s is not AgentState.TERMINATED)) + len(self.core._depended):
            self.violations.append(f"t={self.now:.2f}: {len(self.core.agents)} agents remembered")
        if len(self.core.workers) > 4 * len(self.workers) + 50:
            self.violations.append(f"t={self.now:.2f}: {len(self.core.workers)} worker records")

    def settle(self, seconds: float) -> None:
        """Run with no new faults until everything heals."""
        self.faults = False
        for worker in self.workers.values():
            worker.frozen_until = min(worker.frozen_until, self.now)
            worker.partitioned_until = min(worker.partitioned_until, self.now)
        self.core_stalled_until = min(self.core_stalled_until, self.now)
        # what a stall, a freeze or a partition held is released now, in the order it was sent
        self.net = [(min(at, self.now), n, d, i, f) for at, n, d, i, f in self.net]
        heapq.heapify(self.net)
        self.last_delivery = {key: min(at, self.now) for key, at in self.last_delivery.items()}
        end = self.now + seconds
        while self.now < end:
            self.step()

    def _consistent(self, name: str) -> str:
        """'' if the core's view of agent ``name`` matches what runs, else what differs."""
        record = self.core.agents[name]
        state = record.state.value
        live = self.live_copies(name)
        if state == "PENDING":
            return self._pending_for_a_reason(name)
        if state in ("TERMINATED", "RESTARTING"):
            return f"{name} is {state} but runs on {[w for w, _ in live]}" if live and state == "TERMINATED" else ""
        worker = self.core.workers.get(record.worker or "")
        if worker is None or not worker.alive:
            return f"{name} is {state} on {record.worker}, which is not alive"
        if [(w, c.run, c.epoch) for w, c in live] != [(record.worker, record.run, record.epoch)]:
            return f"{name} is {state} on {record.worker} run {record.epoch}, but copies are {[(w, c.epoch) for w, c in live]}"
        return ""

    def _pending_for_a_reason(self, name: str) -> str:
        """After healing, an agent still waits only for what can still be: the hold after a
        coordinator restart, or an older copy that still runs somewhere (or whose worker is lost
        and whose time to certainly stop is not over).  Not for a copy whose end it will never hear."""
        core = self.core
        if core.predecessor.hold_until(core.agents[name]) > self.now:
            return ""
        old = core.predecessor.old_copies.get(name)
        if not old:
            return self._unplaceable(name)
        for (worker, run, epoch), until in old.items():
            if until is not None and until > self.now:
                return ""
            sim_worker = self.workers.get(worker)
            if until is None and sim_worker is not None and (name, run, epoch) in sim_worker.copies:
                return ""
        return f"{name} is PENDING for ever: it waits for old copies {old} that no longer run"

    def _unplaceable(self, name: str) -> str:
        """'' if agent ``name`` (PENDING, waiting for no old copy) cannot be placed now, as the
        README says it then waits: for a dependency, for its pinned worker (lost, or full), for a
        worker with room, for a slot under max_workers.  Else why it should have been placed."""
        core = self.core
        record = core.agents[name]
        for dep in record.depends_on:
            other = core.agents.get(dep)
            if other is None or not ((other.state.value == "READY" and not other.one_shot)
                                     or (other.state.value == "TERMINATED" and not other.failed)):
                return ""
        alive = [w for w in core.workers.values() if w.alive and not w.draining]
        if record.pin is not None:
            alive = [w for w in alive if w.name == record.pin]
        if not any(not w.capacity or len(w.agents) < w.capacity for w in alive):
            return ""
        cap = self.config.max_workers
        if cap and sum(r.state.value in ("ASSIGNED", "STARTED", "READY", "DISCONNECTED")
                       for r in core.agents.values()) >= cap:
            return ""
        return f"{name} is PENDING for no reason: {record.pending_reason!r}"

    def check_settled(self, seconds: float = 5.0) -> None:
        """After healing: every agent is terminated, or runs (exactly once) on a live worker, as
        the core believes.  Messages in flight make any one instant misleading (an agent that
        restarts forever is never still), so each agent must be seen consistent once within
        ``seconds``."""
        waiting = {name: "" for name in self.core.agents}
        end = self.now + seconds
        while waiting and self.now < end:
            for name in list(waiting):
                if name not in self.core.agents:
                    del waiting[name]
                    continue
                waiting[name] = self._consistent(name)
                if not waiting[name]:
                    del waiting[name]
            self.step()
        self.violations.extend(waiting.values())
