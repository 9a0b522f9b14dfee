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
- a replacement for an agent on a silent worker starts only after that worker's lease ran out,
  and no new copy starts while a stale one it told to stop has not ended: never two live copies;
- a worker is judged only over time this coordinator was listening (its own stalls and backlogs
  don't count); a closed connection means a dead worker unless the worker announced the close;
- memory is bounded (finished agents, departed workers, closed connections).

Reading order: this file (workers, reports, time, placement, the end of a run), then
registration.py (a worker registers), predecessor.py (a previous coordinator's copies) and
core_commands.py (what the user asks).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import random
from typing import Any, Callable

from . import commands as cmd
from . import flow, protocol
from .actions import Action, AwaitBus, Finished, Forget, Publish, Send
from .core_commands import CommandHandlers
from .events import OrchestratorEvent
from .limits import Limits
from .pending import target
from .placement import PLACE_PER_PASS, Free, choose
from .predecessor import Predecessor
from .records import AgentRecord, WorkerRecord
from .registration import Registration, holds_token
from .states import LIVE, RUNNING, AgentState, StateIndex, plain_members

__all__ = ["Action", "AwaitBus", "ClusterCore", "Finished", "Forget", "Publish", "Send"]

log = logging.getLogger("pyorchestrate.coordinator")

S = plain_members(AgentState)  # S.READY is AgentState.READY, read faster (see plain_members)
E = plain_members(OrchestratorEvent)
_EVENT_BY_NAME: dict[str, OrchestratorEvent] = {e.value: e for e in OrchestratorEvent}
_STARTS_PER_FRAME = 250  # agents in one starts frame (a frame stays small; the worker acts on it at once)
_RECOVERED = {"recovered": True}  # read only (_publish_agent copies what it is given)
_CLOSED_REMEMBERED = 10_000  # identities of closed connections, and ended copies, remembered (oldest forgotten)
#: ``isinstance(key, str)`` as a C callable for ``map`` (what msgpack decodes as a map key is an
#: exact str or bytes)
_is_str = str.__instancecheck__
#: the fields by which the coordinator names an event it publishes (what it is, its number on the
#: bus, who published it): a worker's report carrying one would replace the coordinator's own in
#: the event (``{"event": ..., **fields}``), so callbacks of AGENT_TERMINATED could be told
#: ``event="AGENT_READY"``.  Dropped from reports, and counted
_PUBLISHER_FIELDS = frozenset({"event", "seq", "publisher", "incarnation"})
#: a run's end's counts of messages sent to it that it never handled (agents/inbox.py), and the
#: reason each is counted under in ``dropped``
_MESSAGES_LOST = (("messages_dropped", "agent_inbox_full"), ("messages_unhandled", "agent_ended_with_messages"))
#: a worker's drop counts kept: reasons (a worker has about ten; more is a stranger's frame)
WORKER_DROP_REASONS_MAX = 32


def _drop_counts(counts: dict[str, int]) -> dict[str, int]:
    """A worker's drop counts as its heartbeat says them (a map of str to int, checked by the
    protocol), within bounds: reasons of sane length, counts that are not negative."""
    return dict(sorted((k, v) for k, v in counts.items() if len(k) <= 64 and v >= 0)[:WORKER_DROP_REASONS_MAX])


class ClusterCore(Registration, CommandHandlers):
    """Workers, agents, assignments and leases; see the module docstring."""

    def __init__(self, name: str, incarnation: str, config: Any, *, now: float, rng: random.Random,
                 wall: Callable[[], float], drop: Callable[[str, Any], None], min_workers: int = 1,
                 adopt_window: float = 0.0, strict_hold: bool = False, crash_window: float = 0.0,
                 versions: dict[str, str] | None = None, bus_port: int = 0, events_port: int | None = None,
                 pulse_port: int = 0) -> None:
        self.name = name
        self.incarnation = incarnation
        self.config = config
        self.limits = Limits(config.heartbeat_interval, config.heartbeat_liveness)
        #: the least and most credit of a worker's connection (flow.py; the simulation lowers them)
        self.window_limits = (flow.FLOOR, flow.CEILING)
        self.rng = rng
        self.wall = wall
        self.drop = drop
        self.min_workers = min_workers
        self.versions = versions or {}
        self.agents: dict[str, AgentRecord] = {}
        self.states = StateIndex()
        self.workers: dict[str, WorkerRecord] = {}
        self.by_identity: dict[bytes, str] = {}
        self.draining_workers: set[str] = set()  #: names of workers asked to drain, until released
        self.actions: list[Action] = []
        self._starting: list[WorkerRecord] = []  # workers with starts not yet sent (see _assign)
        self.class_blobs_sent = 0
        self.forgotten = 0
        self.stop_requested = False  #: the script called stop()
        self.joined = False  #: the script is in join()
        self.finished = False
        self._order = 0
        self._dirty = True  # something changed that placement should look at
        self._pass = 0  # placement passes so far (AgentRecord.reason_pass: the last that looked at it)
        #: why the agents that may go anywhere wait, when the latest placement pass found no worker
        #: with room (None: it did not)
        self.no_room: str | None = None
        #: why no agent at all could be placed, bound for particular workers or not, from some point
        #: of the latest pass on (no slot under max_workers; too few workers joined), or None
        self._no_slot: str | None = None
        self._full: dict[tuple, str] = {}  # the latest pass's targets without room -> why (see place)
        #: the earliest ``restart_at`` of the agents RESTARTING (inf: none; sooner than any of them
        #: once one of them left that state another way): the loop wakes for it, not at its next
        #: tick, which came up to a quarter of a heartbeat interval after the backoff said
        self.next_restart = math.inf
        #: (restart_at, a tie-breaker, record) of each restart scheduled, soonest first; one whose
        #: agent left RESTARTING another way (or was scheduled again) is dropped when it comes up.
        #: Placement and the tick looked at every agent RESTARTING instead, each pass.
        self._restarts: list[tuple[float, int, AgentRecord]] = []
        self._restart_count = itertools.count()
        self._workers_ready = False
        self._wait_deadline = now + config.worker_wait_timeout
        self._stopping_deadline: float | None = None
        self._last_tick = now
        self.predecessor = Predecessor(self.limits, now, adopt_window, strict_hold, crash_window)
        self._holding = adopt_window > 0  # some pending agent waits out the adoption window
        self.bus_port = bus_port  #: told to workers in their welcome
        self.events_port = events_port
        self.pulse_port = pulse_port  #: the coordinator's pulse process (coordinator_pulse.py), 0: none
        self.start_error: str | None = None  #: too few workers joined in time
        #: agents finished for good, in the order of their latest end (oldest first)
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.closed_connections: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.closing_connections: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        #: runs whose end their worker reported, (agent, run, epoch), the latest: such a copy has
        #: stopped, so a report of it that comes again later asks for no stop (see _stale_event)
        self.ended_copies: collections.OrderedDict[tuple[str, str, int], None] = collections.OrderedDict()
        self._depended: collections.Counter[str] = collections.Counter()  # never forget these

    # ================================================================== helpers

    def has_actions(self) -> bool:
        """Is anything decided and not yet taken?"""
        return bool(self.actions or self._starting)

    def take(self) -> list[Action]:
        """The actions decided since the last call, in order."""
        if self._starting:
            for worker in self._starting:
                self._send_starts(worker)
            self._starting.clear()
        actions, self.actions = self.actions, []
        return actions

    def _send(self, worker: WorkerRecord, type_: str, **fields: Any) -> int:
        if worker.starting:
            self._send_starts(worker)  # decided before this frame: they go before it
        frame = protocol.encode(type_, n=worker.sent_n + 1, **fields)
        if len(frame) > flow.PART_BYTES and type_ in flow.CUT_TYPES:
            # in parts, each numbered: the message takes the last part's number (flow.py)
            pieces = flow.parts(protocol.encode(type_, **fields))
            for i, data in enumerate(pieces):
                self._send_numbered(worker, protocol.encode("part", n=worker.sent_n + 1, data=data,
                                                            last=i == len(pieces) - 1))
        else:
            self._send_numbered(worker, frame)
        return worker.sent_n

    def _send_numbered(self, worker: WorkerRecord, frame: bytes) -> None:
        worker.sent_n += 1
        if worker.window.admit(worker.sent_n, frame):  # else it waits for the worker to read (flow.py)
            self.actions.append(Send(worker.identity, frame))

    def _echo(self, worker: WorkerRecord) -> None:
        """Echo its latest heartbeat's stamp (its lease), and say how far we read its frames."""
        worker.unsaid = 0
        # not numbered: it never waits for room behind starts and payloads (flow.py), so a burst
        # over a narrow link cannot hold the lease back
        # (never past a frame lost on the way: the worker keeps the reports of frames not said read,
        # and its register carries them again; said read, they were lost for good)
        read = worker.lost[0][0] - 1 if worker.lost else worker.recv_n
        self.actions.append(Send(worker.identity, protocol.encode("heartbeat_reply", echo=worker.last_t,
                                                                  sent=worker.window.last, read=read)))

    def _worker_read(self, worker: WorkerRecord, n: int, now: float) -> None:
        """The worker has read our frames up to number ``n``: send what waited for room."""
        for frame in worker.window.read(n, now):
            self.actions.append(Send(worker.identity, frame))

    def _send_starts(self, worker: WorkerRecord) -> None:
        starting, worker.starting = worker.starting, []
        worker.starting_bytes = 0
        if not starting:
            return
        n = self._send(worker, "starts", agents=[item for _, item in starting])
        for record, item in starting:
            if record.worker == worker.name and record.epoch == item["epoch"]:  # still this start's copy
                record.start_n = n

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
        worker.note_lost(expected, n - 1)
        self._send(worker, "reregister")
        return False

    def _publish(self, event: OrchestratorEvent, subject: str, fields: dict[str, Any],
                 record: AgentRecord | None = None) -> None:
        self.actions.append(Publish(event, subject, fields, record))

    def _publish_agent(self, record: AgentRecord, event: OrchestratorEvent, fields: dict[str, Any]) -> None:
        if event is E.AGENT_READY:
            record.ready_said = True
        worker = self.workers.get(record.worker or "")
        # self._publish(...), inline: three a launch
        self.actions.append(Publish(event, record.name, {**fields, "agent_name": record.name, "worker": record.worker,
                                                         "host": worker.host if worker else None, "epoch": record.epoch},
                                    record))

    def _record(self, name: str) -> AgentRecord:
        try:
            return self.agents[name]
        except KeyError:
            names = sorted(self.agents)
            known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "none"
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
        # a run that has ended sends nothing more, except what it announced with its end (the
        # loop keeps accepting that); a copy cut off from us ended when its worker was lost
        return record is not None and record.state in LIVE and record.worker == worker and record.tag == tag

    # ================================================================== workers

    def control(self, identity: bytes, message: dict[str, Any], now: float, size: int = 0) -> None:
        """One decoded control frame from the connection ``identity`` (``size``: its bytes, for
        saying how far we read: flow.py)."""
        kind = message["type"]
        if kind == "register":
            self.register(identity, message, now)
            return
        if kind == "pulse":  # from the worker's pulse process, on a connection of its own
            self.pulse(identity, message, now)
            return
        if kind == "closing":  # its close that follows is no death: judge the worker by silence
            self._remember(self.closing_connections, identity)
            worker = self.worker_of(identity)
            if worker is not None:  # nor one the monitor reported before this frame was read
                worker.disconnected_at = None
                worker.exiting = worker.exiting or message["exiting"]
            return
        worker = self.worker_of(identity)
        if worker is None:
            if kind in ("heartbeat", "agent_events"):
                self.stranger(identity, message, now)
            elif kind != "goodbye":
                self.drop("unexpected", kind)
            return
        complete = self.received(worker, message)  # a gap: it registers again; this frame still counts
        worker.unsaid += size
        if worker.unsaid >= flow.SAY_READ_EVERY:
            self._echo(worker)  # what we read makes room for the reports it holds back (flow.py)
        if kind == "heartbeat":
            self.heartbeat(worker, message, now)
        elif kind == "read":
            self.heard(worker, now)
            self._worker_read(worker, message["read"], now)
        elif kind == "agent_events":
            self.heard(worker, now)
            for item in message["events"]:
                try:
                    self.agent_event(worker, item, now)
                except protocol.ProtocolError as exc:  # one bad item spoils no other
                    self.drop("bad_frame", exc)
        elif kind == "goodbye":
            self.goodbye(worker, now, complete)
        else:
            self.drop("unexpected", kind)

    def heartbeat(self, worker: WorkerRecord, message: dict[str, Any], now: float) -> None:
        if message["lease_age"] >= 0:
            # our echoes to it wait behind what we send it: its lease late, we send less at a time
            # (flow.py; a worker starved of the CPU reads in bursts, and looks faster than its link)
            worker.window.echoed(float(message["lease_age"]), self.limits.interval)
        self._worker_read(worker, message["read"], now)
        if message["sent"] > worker.recv_n:
            # it is not numbered, and follows on its connection the frames it says it sent: some
            # never came (a reset connection), and no later one showed the gap while the worker
            # held its reports back for room (flow.py)
            log.info("worker %s: frames %d..%d were lost on the way; asking it to register again", worker.name,
                     worker.recv_n + 1, message["sent"])
            worker.note_lost(worker.recv_n + 1, message["sent"])
            worker.recv_n = message["sent"]
            self._send(worker, "reregister")
        worker.last_seen = now
        worker.busy_said = False
        worker.last_t = max(worker.last_t, float(message["t"]))
        # echoed at once, not at our next tick: its lease counts from the stamp we echo, and its
        # process agents stop theirs at that lease's end if it is stopped then (lease_guard.py).
        # Held for the tick, the echo was up to an interval older: a worker stopped 0.8 s of every
        # second with a 2 s window had its process agent stopped by that guard, though nobody
        # had missed it (tests/test_starved_worker.py)
        worker.last_beat_sent = now
        self._echo(worker)
        worker.disconnected_at = None
        if message["dropped"]:
            worker.dropped = _drop_counts(message["dropped"])
        if message["leaving"] and not worker.leaving:
            # it shuts down and is stopping its copies (their ends say so): nothing new goes there
            worker.draining = worker.leaving = True
            log.info("worker %s is shutting down: placing nothing more on it", worker.name)
        running = message["running"]
        if running < 0 or running == len(worker.agents) + len(worker.stopping):
            worker.mismatches = 0
            return
        if 0 <= message["read"] < worker.sent_n or message["waiting"]:
            # starts or stops still on their way to it explain the difference (a burst of 10,000
            # starts keeps some in flight for many heartbeats: each re-registration then cost a
            # 10,000-entry register, and raced the starts' own reports), as do reports it holds
            # back for room (flow.py)
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
        # frames read from a closed connection later (a register its process wrote just before
        # it died) must not bring it back
        self._remember(self.closed_connections, identity)
        if identity in self.closing_connections:
            return  # the worker closed it on purpose and speaks on another one
        worker = self.worker_of(identity)
        if worker is not None and worker.disconnected_at is None:
            worker.disconnected_at = now

    @staticmethod
    def _remember(connections: collections.OrderedDict[Any, None], identity: Any) -> None:
        connections[identity] = None
        if len(connections) > _CLOSED_REMEMBERED:
            connections.popitem(last=False)

    def goodbye(self, worker: WorkerRecord, now: float, complete: bool = True) -> None:
        """It shut down, every copy it ran stopped and reported.  ``complete``: every frame it sent
        before this one arrived, so a copy still ASSIGNED never started there (its start came while
        it was shutting down, unread): placed again, whatever its policy, as it cannot run twice.
        It was failed as if it had run there: a restart="never" agent never ran at all."""
        if complete:
            worker.starting, worker.starting_bytes = [], 0  # decided, not yet sent: they never will be
            for name in sorted(worker.agents):
                record = self.agents.get(name)
                if record is not None and record.state is S.ASSIGNED and record.worker == worker.name:
                    worker.agents.discard(name)
                    self.states.move(record, S.PENDING)
                    log.info("agent %s: worker %s shut down before starting it; placed again", name, worker.name)
        self._worker_gone(worker, E.WORKER_LEFT, f"worker {worker.name!r} shut down", now, certain=True)

    def pulse(self, identity: bytes, message: dict[str, Any], now: float) -> None:
        """The worker's process is alive and not stopped (its pulse says so, showing the worker's
        secret).  Answered with an echo: the worker's lease runs on while only its pulse gets through."""
        worker = self.workers.get(message["name"])
        if worker is None or not worker.alive or not holds_token(worker, message):
            self.drop("pulse_not_from_worker", message["name"])
            return
        worker.pulse_at = now
        self.actions.append(Send(identity, protocol.encode("pulse_reply", echo=message["t"])))

    def revoke(self, worker: WorkerRecord, reason: str, now: float) -> None:
        """Its key was revoked: it is no longer one of ours.  Its process may still run its agents
        (and is not trusted to stop them), so they are replaced only once its lease has run out."""
        self._worker_gone(worker, E.WORKER_LOST, reason, now, certain=False)

    def stranger(self, identity: bytes, message: dict[str, Any], now: float) -> None:
        """A message from a connection that is not a live worker's: we restarted, gave up on it
        (it was frozen), or it is an old connection of a worker that has moved on or died.  It must
        register again; but the end of a copy is taken from anywhere: a report names its run, and
        one that finished on a worker that then died, the report stuck in a cut-off link, did not
        fail."""
        self.actions.append(Send(identity, protocol.encode("reregister")))
        if message["type"] == "agent_events":
            # from an older connection of the worker that ran it: an identity only it and we know
            self.ends_from_anywhere(message["events"], now,
                                    lambda w: identity == w.identity or identity in w.past_identities)

    def ends_from_anywhere(self, items: list[dict[str, Any]], now: float,
                           speaks_for: Callable[[WorkerRecord], bool]) -> None:
        """Take the ends of current runs among ``items`` (from a frame we otherwise refuse: one
        written on a connection that has since closed, say), if the frame ``speaks_for`` the very
        worker that ran them.  Anyone else's is not an end (runs and incarnations are on the bus
        for all to read).  Each with what its run reported before it there, in order: an end
        taken alone made the run's error, which came again with the register that was welcomed,
        a report of a run that had ended, and it was lost (10 of 10 errors, a link that reset)."""
        ending: dict[tuple[str, str, int], WorkerRecord] = {}
        for item in items:
            record = self.agents.get(item["agent"])
            if (item["event"] == "AGENT_TERMINATED" and record is not None and record.state in LIVE
                    and (record.run, record.epoch) == (item["run"], item["epoch"])):
                worker = self.workers.get(record.worker or "")
                if worker is not None and speaks_for(worker):
                    ending[(item["agent"], item["run"], item["epoch"])] = worker
        for item in items:
            worker = ending.get((item["agent"], item["run"], item["epoch"]))
            if worker is not None:
                try:
                    self.agent_event(worker, item, now)
                except protocol.ProtocolError as exc:  # one bad item spoils no other
                    self.drop("bad_frame", exc)

    def _worker_gone(self, worker: WorkerRecord, event: OrchestratorEvent, reason: str, now: float, *,
                     certain: bool) -> None:
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
                foreign = self.predecessor.foreign.pop(agent_name, None)
                if foreign is not None and not certain:  # a previous coordinator's copy, held: it may run on
                    self.predecessor.block(agent_name, worker.name, foreign[1]["run"], foreign[1]["epoch"],
                                           self._copy_gone(worker, True, float(self.config.stop_timeout)),
                                           worker.incarnation)
                continue
            if record.state not in RUNNING:
                continue
            if not certain and record.keeps_running and not record.stop_requested and not worker.exiting:
                record.said_before = record.state
                self.states.move(record, S.DISCONNECTED)
                record.disconnected_at = now
                self._publish_agent(record, E.AGENT_DISCONNECTED, {"reason": reason})
                continue
            if not certain:
                # no new copy, by any way (its restart, restart_agent, start_agent), until this one
                # has certainly stopped: at its worker's lease (its pulse renewed the lease too:
                # counted from the last sign of life) and stop timeout, or sooner if the worker
                # comes back and lists it no more (a short stall). A restart's own delay stays
                # the policy's: it waited out the lease even when the worker was back at once
                self._fence_lost_copy(record, worker, record.keeps_running)
            self._fail_run(record, f"{reason}; agent {agent_name!r} was running there", now)
        worker.agents = {n for n in worker.agents if n in self.agents and self.agents[n].state is S.DISCONNECTED}
        if self.predecessor.old_copies:
            self.predecessor.worker_gone(worker.name, lambda name: now if certain else self._old_copy_gone(worker, name))
        self._dirty = True

    def _old_copy_gone(self, worker: WorkerRecord, name: str) -> float:
        """When an old copy of ``name`` that was told to stop on the silent ``worker`` has certainly
        stopped.  Whether that stop arrived before the silence is unknown: a copy the worker keeps
        while it has no coordinator may run on, so the agent's own ``keeps_running`` decides (an
        old copy's definition is not known here; a changed one may keep where the new does not)."""
        record = self.agents.get(name)
        return self._copy_gone(worker, record.keeps_running if record is not None else True,
                               self._stop_timeout_of(name))

    def _stop_timeout_of(self, name: str) -> float:
        """Agent ``name``'s stop timeout (the configured default for one not registered)."""
        record = self.agents.get(name)
        return record.stop_timeout if record is not None else float(self.config.stop_timeout)

    def _fence_lost_copy(self, record: AgentRecord, worker: WorkerRecord, keeps: bool) -> None:
        """``record``'s current copy, on the lost ``worker``, is about to be no longer its run (failed,
        given up, stopped), but may still run there, cut off: no new copy of the agent starts, by
        any way (restart policy, restart_agent, start_agent), before it has certainly stopped or
        the worker, back, lists it no more.  ``keeps``: it may be kept running there."""
        self.predecessor.block(record.name, worker.name, record.run, record.epoch,
                               self._copy_gone(worker, keeps, record.stop_timeout), worker.incarnation)

    def _copy_gone(self, worker: WorkerRecord, keeps: bool, stop_timeout: float) -> float:
        """When a copy on the lost ``worker`` has certainly stopped.  Not kept: its worker stopped it
        when its lease ran out (counted from its last sign of life), plus the stop timeout.  Kept:
        at the worker's orphan timeout, counted from the last frame it may have had from us (we send
        nothing once it is lost), plus the stop timeout; never, if it has none (then only its
        return says).  A worker that left exiting takes kept copies with its process: not kept."""
        if not keeps or worker.exiting:
            return self.limits.replace_after(worker.last_sign, stop_timeout)
        if not worker.orphan_timeout:
            return float("inf")
        return worker.gone_at + worker.orphan_timeout + stop_timeout + self.limits.margin

    # ================================================================== agent reports

    def agent_event(self, worker: WorkerRecord, item: dict[str, Any], now: float) -> None:
        """One lifecycle event a worker reports for the copy named (agent, run, epoch)."""
        record = self.agents.get(item["agent"])
        if (record is None or record.worker != worker.name or record.run != item["run"]
                or record.epoch != item["epoch"] or record.state not in LIVE):
            self._stale_event(worker, item, now)
            return
        event = _EVENT_BY_NAME.get(item["event"])  # not E(...): the Enum's call is slow, three per agent
        if event is None:
            raise protocol.ProtocolError(f"unknown agent event {item['event']!r}")
        fields = item["fields"]
        # msgpack may give bytes keys too (dropped); most reports carry no fields at all (STARTED,
        # READY), an end a few: copied at C speed when every key is a str (one look in C; a
        # Python loop over the keys was 8 lines a launch, a comprehension a call of its own)
        if not fields:
            fields = {}
        elif all(map(_is_str, fields)):
            fields = dict(fields)
        else:
            fields = {k: v for k, v in fields.items() if isinstance(k, str)}
        if fields and not _PUBLISHER_FIELDS.isdisjoint(fields):
            self.drop("publisher_field_in_report", f"{record.name} {event.name}: {sorted(_PUBLISHER_FIELDS & fields.keys())}")
            fields = {k: v for k, v in fields.items() if k not in _PUBLISHER_FIELDS}
        reconnected = record.state is S.DISCONNECTED and event is not E.AGENT_TERMINATED
        if reconnected:
            # its worker is back and reports on it: the copy was kept running all along
            self._reconnect(record, worker, {"state": "READY" if event is E.AGENT_READY else "STARTED"},
                            "its worker is back", reported=event)
        if event is E.AGENT_TERMINATED:
            # folded: the worker put this short run's STARTED (and READY) into its end, as they
            # went in one report (protocol 9): said now, in order, as reported and not recovered
            folded = fields.pop("folded", False) is True
            self._say_what_went_unsaid(record, fields.pop("reached", "STARTED"), {} if folded else _RECOVERED)
            marker = (fields.pop("bus_publisher", None), fields.pop("bus_incarnation", None), fields.pop("bus_seq", None))
            if isinstance(marker[0], str) and isinstance(marker[1], str) and type(marker[2]) is int:
                self.actions.append(AwaitBus(marker[0], marker[1], marker[2]))
            ok = fields.pop("ok", True) is True and not record.run_errored
            record.run_errored = False
            self._count_lost_messages(record, fields)
            for key, reason in _MESSAGES_LOST:
                count = fields.get(key)
                if count is not None:  # (stays in the published end, for whoever follows the agent)
                    if type(count) is int and count > 0:
                        self.drop(reason, f"sent to {record.name}", count=count, what="message")
                    else:
                        del fields[key]
            if fields.pop("worker_leaving", False) is True and not record.stop_requested and record.then is None:
                # its worker shut down (SIGTERM) and stopped it: not an end of the agent's own, so
                # not one for its restart policy (restart="on-failure" took it for done, "always"
                # counted a restart). Started again elsewhere at once, as after a drain; a
                # restart="never" agent ends here, as after any end
                fields.setdefault("reason", f"stopped by the shutdown of worker {worker.name!r}")
                if record.policy.mode != "never":
                    record.then = "move"
            if fields.pop("not_run", False) is not True and record.then == "move" and record.one_shot:
                # a one-shot agent whose work had begun when the stop came (its execute() need not
                # look at it): its end is its own, done or failed. Moved, it ran a second time
                record.then = None
            self._remember(self.ended_copies, (record.name, record.run, record.epoch))
            self._run_over(record, ok, fields, now)
            return
        if event is E.AGENT_STARTED:
            if record.state is not S.ASSIGNED and not reconnected:
                # a registration listed the copy running before this report came: STARTED went
                # out then ("recovered"); once per run, never twice
                self.drop("duplicate_report", f"{record.name} {event.name}")
                return
            if record.state is S.ASSIGNED:
                self.states.move(record, S.STARTED)
            record.run_errored = False
        elif event is E.AGENT_READY:
            if record.state is not S.STARTED and not reconnected:
                self.drop("duplicate_report", f"{record.name} {event.name}")
                return
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

    def _say_what_went_unsaid(self, record: AgentRecord, reached: Any, how: dict[str, Any]) -> None:
        """A run's end came, but not (yet) its STARTED or READY: those went on a connection we do
        not read any more (the worker registered again on a new one, or was cut off) and arrive late
        or never.  Every run that ends has started, and its end says whether it got to READY
        (``reached``): what was not said is said now, once, marked ``recovered``, before the end.
        Seen beside 4 CPU burners: a worker that re-registered mid-run reported the ends of copies
        whose STARTED and READY were still in its old connection (S9: in 8 of 18 runs, up to
        hundreds of agents a run ended without ever being said started).  ``how``: the fields they
        carry (``recovered``, or none for a run whose end folds them in, see agent_event)."""
        state = record.said_before if record.state is S.DISCONNECTED else record.state
        if state is S.ASSIGNED:
            if record.state is S.ASSIGNED:
                self.states.move(record, S.STARTED)
            self._publish_agent(record, E.AGENT_STARTED, how)
        if reached == "READY" and not record.ready_said:
            if record.state is S.STARTED:
                self.states.move(record, S.READY)
            self._publish_agent(record, E.AGENT_READY, how)

    def _stale_event(self, worker: WorkerRecord, item: dict[str, Any], now: float) -> None:
        """A report about a copy that is not the current run (replaced, or a previous coordinator's)."""
        name = item["agent"]
        if item["event"] != "AGENT_TERMINATED" and (name, item["run"], item["epoch"]) in self.ended_copies:
            # of a run whose end its worker reported: said again (a register carries what we may
            # not have read; ends_from_anywhere took it first), and that copy has stopped
            self.drop("duplicate_report", f"{name} {item['event']}")
            return
        if item["event"] == "AGENT_TERMINATED":
            worker.stopping.discard((name, item["run"], item["epoch"]))
            if name in self.predecessor.foreign:
                worker.agents.discard(name)
            self.predecessor.copy_ended(name, worker.name, item["run"], item["epoch"])
            self._dirty = True  # ours may start, or waits for another copy: placement says which
            return
        if worker.alive and name not in self.predecessor.foreign:
            # an agent copy we no longer consider running there: make sure it stops
            self.stop_stale(worker, name, item["run"], item["epoch"], now)

    def stop_stale(self, worker: WorkerRecord, name: str, run: str, epoch: int, now: float, *,
                   send: bool = True) -> float:
        """Stop a copy that is not its agent's current run (its normal stop timeout), and keep its
        agent from starting anew until that copy has ended (``send=False``: the stop travels in a
        welcome).  Returns the timeout."""
        timeout = self._stop_timeout_of(name)
        if send:
            self._send(worker, "stop", agent=name, run=run, epoch=epoch, timeout=timeout)
        worker.stopping.add((name, run, epoch))
        # blocked even with no agent of that name yet: the script may register it in a moment
        self.predecessor.block(name, worker.name, run, epoch, process=worker.incarnation)
        return timeout

    # ================================================================== time

    def tick(self, now: float, behind: bool = False, vouched: float = 0.0) -> None:
        """Judge liveness, send heartbeats, start what is due.  Call at :meth:`next_wake`.
        ``behind``: frames are still waiting to be read (the last read stopped at its batch limit):
        we are not done listening, so nobody is judged silent (or gone) until we have caught up.
        ``vouched``: the latest moment our pulse process may have told a worker that this loop was
        stalled (coordinator_pulse.py; 0.0: none since the last tick)."""
        limits = self.limits
        # a vouch counts if it came more than a stall after our last tick: its worker's lease runs
        # from then, so the fresh window below must too (it may be a moment after ``now``: the
        # pulse wrote it between our reading the clock and our reading the pipe)
        fresh = max(now if now - self._last_tick > limits.stall else 0.0,
                    vouched if vouched - self._last_tick > limits.stall else 0.0)
        if fresh:
            # we were not listening (GC, SIGSTOP, a burst, a call of the script that held the GIL):
            # the queue has been read by now, and nobody's silence during our stall counts against them
            log.warning("coordinator loop stalled for %.1f s: every worker gets a fresh window",
                        fresh - self._last_tick)
            for worker in self.workers.values():
                worker.last_seen = max(worker.last_seen, fresh)
            self.predecessor.stalled(self._last_tick, fresh)
        self._last_tick = now
        for worker in list(self.workers.values()):
            if not worker.alive:
                continue
            # behind, nobody is judged; but replies still go out: a coordinator that is merely busy
            # must not let its workers' leases run out (it would stop their agents: a false death)
            if (not behind and worker.disconnected_at is not None and worker.pulse_at > worker.disconnected_at
                    and now - worker.disconnected_at > limits.reconnect_grace):
                # its pulse spoke after the close: its process is alive (a connection reset, its
                # loop too busy to reconnect and speak in time), so no certain death; its silence
                # judges it, and its lease guards a replacement
                worker.disconnected_at = None
            elif not behind and worker.disconnected_at is not None and now - worker.disconnected_at > limits.reconnect_grace:
                self._worker_gone(worker, E.WORKER_LOST, f"worker {worker.name!r} was lost (its connection closed "
                                                         "and it did not come back)", now, certain=True)
            elif not behind and now - worker.last_sign > limits.silence:
                self._worker_gone(worker, E.WORKER_LOST, f"worker {worker.name!r} was lost (no heartbeat for "
                                                         f"{now - worker.last_seen:.1f} s)", now, certain=False)
            elif not behind and now - worker.last_seen > limits.busy_cap:
                self._worker_gone(worker, E.WORKER_LOST, f"worker {worker.name!r} was lost (its process is alive "
                                  f"but its loop has been silent for {now - worker.last_seen:.1f} s)", now,
                                  certain=False)
            elif now - worker.last_seen > limits.silence and not worker.busy_said:
                # the GIL herd of thousands of agent threads, or C code holding the GIL: its loop
                # cannot speak, its pulse process can.  Busy is not dead.
                worker.busy_said = True
                log.warning("worker %s: no heartbeat for %.1f s, but its process is alive and not stopped "
                            "(its pulse): busy, not lost (for up to %.0f s)", worker.name,
                            now - worker.last_seen, limits.busy_cap)
            elif now - worker.last_beat_sent >= limits.interval:
                worker.last_beat_sent = now
                self._echo(worker)
        if self._restarts and now >= self._restarts[0][0]:
            self._dirty = True
        if self._holding:
            self._dirty = True  # a held agent may be free to go now
        self._expire(now)
        # like a worker's silence, an end not read yet is not an end missed: while frames wait to be
        # read (the ends of thousands of agents stopped at once may be among them) nobody is given up
        # (the caller's own wait, Limits.stop_wait, still bounds the stop)
        if self._stopping_deadline is not None and now > self._stopping_deadline and not behind:
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
                    worker = self.workers.get(record.worker or "")
                    if worker is not None:  # given up, not gone: it runs on there until the orphan timeout
                        self._fence_lost_copy(record, worker, True)
                    self._fail_run(record, f"its worker {record.worker!r} has been unreachable for {limit} s "
                                           "(disconnect_timeout)", now)
        unclaimed, waited_out = self.predecessor.expire(now)
        for worker_name, name, report in unclaimed:
            # a previous coordinator's agent this script did not register: stop it
            worker = self.workers.get(worker_name)
            if worker is not None and worker.alive:
                worker.agents.discard(name)
                self.stop_stale(worker, name, report["run"], report["epoch"], now)
        self._dirty |= waited_out  # an old copy's lease has run out: it has stopped
        retention = self.config.worker_retention
        for name in [n for n, w in self.workers.items() if not w.alive and now - w.gone_at > retention]:
            if not any(r.worker == name for r in self.states.of(S.DISCONNECTED)):
                del self.workers[name]
        keep = self.config.finished_agents_max
        while len(self._ended) > keep:
            self._forget(self._ended.popitem(last=False)[0])

    def _forget(self, name: str) -> None:
        record = self.agents.get(name)
        if record is None or record.state is not S.TERMINATED or self._depended.get(name):
            return  # started again, or something depends on it
        self.states.remove(record)
        del self.agents[name]
        self.forgotten += 1
        self.actions.append(Forget(name))

    def restarts_due(self, now: float) -> None:
        """Placement looks at the agents RESTARTING once the earliest is due (:attr:`next_restart`).
        Taken once: placement works out the next (it may not run now, while the cluster stops)."""
        if now >= self.next_restart:
            self.next_restart = math.inf
            self._dirty = True

    def next_wake(self, now: float) -> float:
        """When :meth:`tick` should run next: the regular beat, sooner while a closed connection
        waits out its grace, and no later than the moment the quietest worker's silence limit runs
        out (so a hung worker is declared lost on time, not up to a tick late)."""
        limits = self.limits
        alive = [w for w in self.workers.values() if w.alive]
        soonest = now + (0.05 if any(w.disconnected_at is not None for w in alive) else limits.tick)
        return min([soonest] + [min(w.last_sign + limits.silence, w.last_seen + limits.busy_cap) + 0.001
                                for w in alive])

    # ================================================================== placement

    def place(self, now: float) -> None:
        """Place what can be placed (after each batch of stimuli; cheap when nothing changed)."""
        line = self.states.pending
        if line.woke:  # agents waiting for one that changed state are looked at again
            line.woke = False
            self._dirty = True
        if not self._dirty or self._stopping_deadline is not None:
            return
        self._dirty = False
        self.no_room = self._no_slot = None
        self._full = full = {}  # (filled by the pass below; empty after an early return)
        if not (self.states.size(S.PENDING) or self.states.size(S.RESTARTING)):
            # nothing waits: most passes after a report (READY and ends mark us dirty), and the
            # whole pass cost 16 us a turn (S2: two turns a launch)
            self._holding = False
            return
        if not self._workers_ready:
            if sum(w.alive for w in self.workers.values()) < max(1, self.min_workers):
                # the reason of every pending agent, said when a snapshot asks (explain_waits):
                # not written into each in every pass while thousands are registered
                self._pass += 1
                self.no_room = self._no_slot = f"waiting for min_workers={self.min_workers} worker(s) to join"
                return
            self._workers_ready = True
        restarts = self._restarts
        while restarts and (restarts[0][0] <= now or restarts[0][2].state is not S.RESTARTING
                            or restarts[0][2].restart_at != restarts[0][0]):
            at, _, record = heapq.heappop(restarts)
            if at <= now and record.state is S.RESTARTING and record.restart_at == at:
                self.states.move(record, S.PENDING)
        self.next_restart = restarts[0][0] if restarts else math.inf
        self._holding = False
        cap = self.config.max_workers
        running = self.states.count(*LIVE) if cap else 0  # only a cap needs the count
        # workers with room, least loaded first: an agent without pin or labels takes the top in
        # O(log workers), and once none is left the rest wait without scanning every worker
        free = Free(self.workers.values())
        assigned = 0
        # full: targets (pending.target) found without room in this pass -> why: room is only taken
        # within a pass, so the agents bound for them wait for the same (and are not looked at)
        self._pass += 1
        # (no room anywhere leaves out those that may go anywhere; one bound for particular workers
        # still finds its own reason, its workers may be missing: each target's first is looked at)
        for record in line.for_placement(lambda: self.no_room is not None,
                                         lambda bound_for: self._no_slot is not None or bound_for in full):
            if record.state is not S.PENDING:  # failed meanwhile, as a dependent of one that failed
                continue
            if assigned >= PLACE_PER_PASS:
                self._dirty = True  # the rest in the next pass: one pass never holds the loop long
                break
            record.reason_pass = self._pass
            anywhere = record.pin is None and not record.labels
            if anywhere and not free and not record.depends_on:
                record.pending_reason = free.why_none()
                if self.no_room is None:
                    # nothing more is placed in this pass: the line leaves out the agents this
                    # concerns (pending.py), whose reason explain_waits gives
                    self.no_room = record.pending_reason
                continue
            # (measured from the last moment we surely listened: placed right after a stall, before
            # the tick that notices it, the adoption window would count the stall)
            held = self.predecessor.hold_until(record) - min(now, self._last_tick + self.limits.stall)
            if held > 0:
                self._holding = True
                record.pending_reason = (f"waiting {held:.1f} s for workers to report (or stop) copies a previous "
                                         "coordinator left running (adoption window)")
                continue
            if self.predecessor.waits_for(record.name):
                record.pending_reason = f"waiting for the previous copy on {self.predecessor.waits_for(record.name)} to stop"
                continue
            verdict, dependency = self._dependency_state(record) if record.depends_on else ("ok", "")
            if verdict == "failed":
                self._fail_run(record, f"dependency {dependency} failed", now, final=True)
                continue
            if verdict == "wait":
                record.pending_reason = f"waiting for dependency {dependency} ({self.agents[dependency].state.value})"
                line.park(record, dependency)  # not looked at again until it, or one before it, moves
                continue
            if anywhere and not free:
                # one with dependencies, no room: they were looked at first, so that it fails with
                # a dependency that failed, or is parked, whether or not there is room (else the
                # agents waiting for a dependency were each looked at in every pass while workers
                # were full)
                record.pending_reason = free.why_none()
                if self.no_room is None:
                    self.no_room = record.pending_reason
                line.settle(record)  # waits for room with those that may go anywhere
                continue
            if cap and running >= cap:
                record.pending_reason = f"waiting for a slot: max_workers={cap} agents are running"
                line.settle(record)  # (one with dependencies: waits with its kind; else nothing)
                if self._no_slot is None:
                    self._no_slot = record.pending_reason  # no slot for anyone: as above
                    if self.no_room is None:
                        # (one that may go anywhere is told of room first, as when looked at)
                        self.no_room = record.pending_reason if free else free.why_none()
                continue
            if anywhere:
                worker, why = free.pop(), ""  # `not free` above has just looked at its top, and nothing since moved a load
            else:
                bound_for = target(record)
                worker, why = None, full.get(bound_for)  # (a bound agent with dependencies comes twice)
                if why is None:
                    if record.pin is None:
                        candidates: Any = self.workers.values()
                    else:
                        # its one candidate by name, not a scan of every worker: the first of each
                        # pin's group is looked at in each pass, and 20,000 agents pinned over 1,000
                        # full workers cost a pass 29 ms, most of it in these scans (8.4 ms now)
                        pinned = self.workers.get(record.pin)
                        candidates = () if pinned is None else (pinned,)
                    worker, why = choose(candidates, record.pin, record.labels)
                    if worker is None:
                        full[bound_for] = why
            if worker is None:
                record.pending_reason = why
                line.settle(record)  # (one with dependencies: waits with those bound for the same workers)
                continue
            self._assign(record, worker, now)
            free.update(worker)
            assigned += 1
            running += 1
        # woken in this pass (one placed or failed here that others wait for): they were not in
        # this pass's line, and are looked at in the next (the loop's next turn)
        self._dirty |= line.woke

    def explain_waits(self) -> None:
        """Before a snapshot: the pending agents the latest placement pass left out once it found no
        room (pending.py) are given the reason it found."""
        full, latest = self._full, self._pass
        if self.no_room is None and not full:
            return
        for record in self.states.oldest_first(S.PENDING):
            # (a parked one's reason names its dependency, current: given when it was parked,
            # and it is looked at again whenever that one, or one before it, changes state)
            if record.reason_pass != latest and record.parked_on is None:
                bound_for = target(record)
                reason = self.no_room if bound_for is None else full.get(bound_for, self._no_slot)
                if reason is not None:
                    record.pending_reason = reason

    def _count_lost_messages(self, record: AgentRecord, fields: dict[str, Any]) -> None:
        """What this coordinator sent to a run that ended and that its end says it neither took nor
        dropped was lost: counted as unhandled, beyond what the end says waited in its inbox.  The
        run cannot see those: still in a process agent's pipe or the worker's backlog to it, on
        the wire, or reaching its worker after its end (the worker drops them).  Exact for a run
        this coordinator started; for an adopted one, whose predecessor sent it messages too, at
        least those of ours that were lost.  Only for an end that says what it took (an agent
        host that died takes that with it).  The count taken stays in the published end if not 0."""
        taken = fields.pop("messages_taken", None)
        if type(taken) is not int or taken < 0:
            return
        if taken:
            fields["messages_taken"] = taken
        if not record.sent:
            return
        dropped, waited = fields.get("messages_dropped"), fields.get("messages_unhandled")
        lost = record.sent - taken - (dropped if type(dropped) is int and dropped > 0 else 0)
        if lost > (waited if type(waited) is int and waited > 0 else 0):
            fields["messages_unhandled"] = lost

    def _dependency_state(self, record: AgentRecord) -> tuple[str, str]:
        """("ok", ""), or ("wait" or "failed", the dependency that says so).  A long-running
        dependency (Looping/Periodic) must be READY; a one-shot one (a migration, say) must have
        finished without error."""
        for name in record.depends_on:
            dep = self.agents[name]
            if (dep.state is S.READY and not dep.one_shot) or (dep.state is S.TERMINATED and not dep.failed):
                continue
            if dep.state is S.TERMINATED:
                return "failed", name
            return "wait", name
        return "ok", ""

    def _assign(self, record: AgentRecord, worker: WorkerRecord, now: float) -> None:
        record.epoch += 1
        record.run = self.incarnation
        record.ready_said = False
        record.executed = False
        record.sent = 0
        record.worker = worker.name
        if record.state is not S.ASSIGNED:
            self.states.move(record, S.ASSIGNED)
        record.pending_reason = ""
        record.started_at = self.wall()
        record.run_since = now
        worker.agents.add(record.name)
        first = record.class_id not in worker.sent_classes
        size = len(record.config_blob) + (len(record.class_blob) if first else 0)
        # a frame over the worker's limit would cost its connection; one over the credit would
        # hold its echoes back longer than the credit allows (flow.py)
        if worker.starting and worker.starting_bytes + size > min(protocol.STARTS_FRAME_BYTES, worker.window.credit):
            self._send_starts(worker)
        worker.starting_bytes += size
        worker.sent_classes.add(record.class_id)
        self.class_blobs_sent += first
        # sent with the other starts for this worker when this step's actions are taken (or
        # before any other frame to it): the frame's number is the record's start_n then
        worker.starting.append((record, {
            "agent": record.name, "run": record.run, "epoch": record.epoch, "class_id": record.class_id,
            "class_blob": record.class_blob if first else None, "config": record.config_blob, "mode": record.mode,
            "stop_timeout": record.stop_timeout, "hold": bool(self.config.hold_after_ready),
            "keep": record.keeps_running, "definition": record.definition}))
        if len(worker.starting) == 1:
            self._starting.append(worker)
        elif len(worker.starting) >= _STARTS_PER_FRAME:
            self._send_starts(worker)

    # ================================================================== the end of a run

    def _fail_run(self, record: AgentRecord, reason: str, now: float, *, final: bool = False) -> None:
        """End the current run (or the wait for one) as failed, with an AGENT_ERROR first.  A run
        ended here (its worker lost, say) never said what it took of the messages sent to it: at
        most all of them were lost, said in its end and counted as ``agent_lost_with_messages``."""
        record.error = reason
        self._publish_agent(record, E.AGENT_ERROR, {"error_message": reason, "traceback": ""})
        fields: dict[str, Any] = {"reason": reason}
        if record.sent:
            fields["messages_unaccounted"] = record.sent
            self.drop("agent_lost_with_messages", f"sent to {record.name}", count=record.sent, what="message")
        self._run_over(record, ok=False, fields=fields, now=now, final=final)

    def _run_over(self, record: AgentRecord, ok: bool, fields: dict[str, Any], now: float, *,
                  final: bool = False) -> None:
        """Publish AGENT_TERMINATED for the run that ended and decide what happens next."""
        worker = self.workers.get(record.worker or "")
        if worker is not None:
            worker.agents.discard(record.name)
        record.failed = not ok
        record.sent = 0  # (counted in its end: see _count_lost_messages and _fail_run)
        then, record.then = record.then, None
        policy = record.policy
        run_since, record.run_since = record.run_since, 0.0  # (0: no run; each run forgiven once)
        if final or record.stop_requested:
            nxt = "final"
        elif then in ("move", "restart"):
            nxt = "again"
        elif policy.wants_restart(failed=not ok):
            if run_since and policy.forgives(now - run_since):
                record.streak = 0
            nxt = "give_up" if policy.exhausted(record.streak) else "restart"
        else:
            nxt = "final"
        self.states.move(record, S.TERMINATED)
        self._publish_agent(record, E.AGENT_TERMINATED, {**fields, "ok": ok, "final": nxt == "final"})
        self._dirty = True
        if nxt == "again":
            self.states.move(record, S.PENDING)
        elif nxt == "restart":
            record.restarts += 1
            record.streak += 1
            delay = policy.delay(record.streak, self.rng)
            reason = record.error if not ok else "finished (restart=always)"
            self._schedule_restart(record, now, delay, reason or "failed")
        elif nxt == "give_up":
            record.failed = True
            message = f"gave up after {record.streak} restart(s) in a row; last run: {record.error or 'finished'}"
            record.error = message
            self._publish_agent(record, E.AGENT_ERROR, {"error_message": message, "traceback": ""})
            self._publish_agent(record, E.AGENT_TERMINATED, {"ok": False, "final": True})
        if record.state is S.TERMINATED:
            record.ended_at = now
            self._ended[record.name] = None
            self._ended.move_to_end(record.name)  # ended again (started anew meanwhile): it is the newest

    def _schedule_restart(self, record: AgentRecord, now: float, delay: float, reason: str) -> None:
        self.states.move(record, S.RESTARTING)
        record.restart_at = now + delay
        heapq.heappush(self._restarts, (record.restart_at, next(self._restart_count), record))
        if record.restart_at < self.next_restart:
            self.next_restart = record.restart_at
        record.pending_reason = f"restarting in {delay:.2f} s"
        self._publish_agent(record, E.AGENT_RESTARTING, {
            "attempt": record.streak, "delay": round(delay, 3), "reason": reason})  # its number in the row

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
        if self.finished:
            return False
        # asked every loop turn: the flags first, the count only when the run may end
        batch_done = self.joined and self.config.run_mode.name == "STOP_ON_EMPTY"  # .name: a Python-level property
        if not (batch_done or self._stopping_deadline is not None or self.stop_requested):
            return False
        return self.states.size(S.TERMINATED) == len(self.agents)

    def finish(self) -> None:
        if self.agents or self.forgotten:
            self._publish(E.ALL_AGENTS_TERMINATED, self.name, {"agents": len(self.agents) + self.forgotten})
        self.finished = True
        self._stopping_deadline = None
        self.actions.append(Finished())

    # ================================================================== commands (handlers: core_commands.py)

    def command(self, command: cmd.Command, now: float) -> Any:
        """Carry out a user command (from :mod:`pyorchestrate.commands`); may raise ValueError."""
        return cmd.HANDLERS[type(command)](self, command, now)
