"""The coordinator's loop: one thread that owns every socket and feeds the cluster core.

Sockets: a ROUTER for workers' control connections, an XSUB that workers publish into, and an
XPUB that subscribers read.  Every decision is the core's (:mod:`pyorchestrate.core`); this loop
turns frames into stimuli, carries out the actions the core returns (send, publish, forget,
finish), and relays the bus: what agents publish is checked against the current run (a stale
copy's events are dropped and counted), gap-detected and forwarded.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any, Callable

import msgpack
import zmq

from . import (collector, commands, control, curve, fd_limit, fork_guard, history, prejoin, protocol, runmarker,
               snapshots, sockets, tailhold, trace)
from .coordinator_pulse import PulseLink
from .core import AwaitBus, ClusterCore, Finished, Forget, Publish, Send
from .drops import DropCounter
from .key_watch import KeyWatch
from .keys import KeyDir
from .events import EventDispatcher, OrchestratorEvent, stamp
from .limits import Limits, adopt_window
from .log_thread import LOG_THREAD, deferrable, defer_in_this_thread
from .mailbox import Mailbox
from .records import AgentRecord, WorkerRecord
from .states import AgentState, plain_members
from .versions import local_versions

# deferrable: this loop never waits on a log stream (log_thread.py); core.py, core_commands.py and
# registration.py log on this same logger object
log = deferrable(logging.getLogger("pyorchestrate.coordinator"))
_AGENT_LOG = deferrable(logging.getLogger("pyorchestrate.agent"))

KEY_DIR_STUCK = 5.0  #: seconds the key directory may take to answer before the log says so

_DRAIN_BATCH = 1000
#: the most one loop turn spends on one socket's frames: a bus batch can hold thousands of events,
#: so frames alone do not bound a turn (commands, like status(), wait for the turn to end)
_DRAIN_SECONDS = 0.02
_COMMANDS_PER_TURN = 20
E = plain_members(OrchestratorEvent)  # E.AGENT_READY is OrchestratorEvent.AGENT_READY, read faster
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_EVENTS = {e.value: e for e in OrchestratorEvent}
#: the only topics a worker's bus frames may carry: what its agents publish and log
_AGENT_BUS_TOPICS = ("AGENT_EVENT.", "AGENT_LOG.")
#: seconds after a run's end before what it said it sent and never came is counted lost (its end
#: is published after tailhold.WAIT; a tail on its way is still forwarded until this, and for as
#: long as its worker's events keep coming: 200,000 log lines arrived 26 s after the agent's end
#: on this busy VM, its worker's outbox draining all the while)
TAIL_GIVE_UP = 30.0
TAIL_QUIET = 5.0  #: seconds without events from its worker before a late tail is given up
_HELLO = b"\x01" + protocol.HELLO_TOPIC.encode()  # a subscription to a hello request
_SWEEP_EVERY = 10.0  # seconds between frees of bus sequence state of runs that ended
#: history requests waiting for their answers at most (one is built at a time): more are refused,
#: as each may cost the loop half a second, and one reader could queue such work without end
_MAX_SCANS = 8
_SCAN_EVENTS = 1000  #: events one step of a history answer looks at (5 ms at 2,000 prefixes)
#: bytes a client's connection may hold unacknowledged (sockets.unacked_bytes) for its next request
#: to be answered.  A client that sent requests without reading the answers (history: up to 16 MiB
#: each) had the coordinator queue all of them in libzmq, 45 MB a second here, without end; one that
#: reads each answer before asking again (ours) holds none when it asks
CLIENT_UNREAD_MAX = 1024 * 1024

__all__ = ["AgentRecord", "Coordinator", "WorkerRecord", "WorkerWaitTimeout"]


class WorkerWaitTimeout(TimeoutError):
    """Too few workers joined within ``worker_wait_timeout``."""


class Coordinator:
    """The coordinator's sockets and loop thread (used by :class:`Orchestrator`)."""

    def __init__(self, name: str, config: Any, dispatcher: EventDispatcher, on_finished: Callable[[], None],
                 on_agent_states: Callable[[list[tuple[str, str, str | None, int]]], None],
                 on_forget: Callable[[str], None], min_workers: int,
                 may_finish: Callable[[], bool] = lambda: True) -> None:
        self.name = name
        self.config = config
        self.dispatcher = dispatcher
        self.session = uuid.uuid4().hex
        self.dropped = DropCounter(log)
        dispatcher.on_drop = self.dropped.drop  # callbacks too far behind (events.DROPPABLE)
        self.lost_events = 0
        self.min_workers = min_workers
        self._on_finished = on_finished
        self._on_agent_states = on_agent_states
        # agents whose state changed since the handles last heard (see _flush_states)
        self._state_changes: dict[str, AgentRecord] = {}
        self._in_batch = False  # a batch of the core's decisions is being carried out
        self._batch_stamp: dict[str, str] | None = None  # the time of that batch (once it has an event)
        self._batch_info = False  # log.isEnabledFor(INFO) for that batch (asked once, not per event)
        self._on_forget = on_forget
        self._may_finish = may_finish  # no registration waits, and none is taken from now on
        self._closing = False
        self._seq = 0
        # one packer for the events the loop publishes (the loop's thread only): msgpack.packb makes
        # a new one each call, half the cost of packing an event
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._bus_seqs: dict[tuple[str, str], int] = {}
        self._awaited_bus: dict[tuple[str, str], int] = {}  # publisher -> last seq it announced
        #: (when to give up, publisher) in the order awaited: a tail that never comes is counted lost
        self._awaited_order: collections.deque[tuple[float, tuple[str, str]]] = collections.deque()
        self._last_batch: dict[str, float] = {}  # worker -> when its last batch of events came
        self._bus_deadline: float | None = None
        self._tail_hold = tailhold.TailHold()  # an agent's end waits for its last log lines
        self._early_hold = tailhold.EarlyHold()  # and its first lines wait for its start
        # bus frames of a worker not registered yet: a restarted coordinator hears its predecessor's
        # workers' buses before their registers (prejoin.py); they re-register within a window
        self._prejoin = prejoin.PreJoinHold(2 * config.heartbeat_interval * config.heartbeat_liveness + 2.0)
        self._started_keys: list[tuple[str, str]] = []
        self._history = history.History(config.history_max_events, config.history_max_bytes)
        #: history requests being answered, a slice a turn (reply topic, scan), oldest first
        self._scans: collections.deque[tuple[bytes, history.RecentScan]] = collections.deque()
        self._started_wall = time.time()
        self._started = time.monotonic()  # uptime: a step of the wall clock does not change it
        self._stamp = protocol.stamp_encoder(self.session, self._started_wall)
        self.worker_bus: dict[str, tuple[str, int]] = {}  # worker -> (incarnation, last bus frame number)
        self.final_snapshot: dict[str, Any] | None = None
        self._last_bus_beat = 0.0
        self._last_sweep = time.monotonic()
        self._fd_identity: dict[int, bytes] = {}
        self.client_requests: Counter[str] = Counter()  # answered per op, and refused
        # thousands of agents: full collections frozen out of the loop's way (collector.py)
        self.collector: collector.Collector | None = None
        self.loop_lags: collections.deque[float] = collections.deque(maxlen=20)  # the latest ticks'
        self.monitor: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self.core: ClusterCore | None = None
        self.ctx = zmq.Context()
        self.mailbox = Mailbox()
        self._ports: list[int] = []  #: the ports bound (fork_guard)
        # keys (CurveZMQ + who may connect in which role); None: plain ZeroMQ, loopback only
        self.keydir = KeyDir.from_option(config.keys)
        self.gatekeeper: curve.Gatekeeper | None = None
        self.key_watch: KeyWatch | None = None
        self._key_dir_stuck_said = False
        self._key_of: dict[bytes, str] = {}  # worker connection -> the name of the key it showed
        self.handshake_failures: Counter[str] = Counter()
        self.address = self.events_address = self.bus_address = ""
        self.pulse: PulseLink | None = None  # the process that vouches while this loop is stalled
        self._pulse_gone_said = False

    @property
    def start_error(self) -> str | None:
        if self.core is None or self.core.start_error is None:
            return None
        return (f"{self.core.start_error}. Start workers with:\n"
                f"    pyorchestrate-worker --coordinator {sockets.connectable(self.address)}\n"
                "or lower min_workers / raise worker_wait_timeout.")

    # ================================================================== setup (caller's thread)

    def bind(self, address: str, events_address: str | None) -> None:
        """Bind the three sockets.  ``*``/``0`` ports are chosen by the OS."""
        cfg = self.config
        # each connection costs a descriptor, a stranger's too: at the soft limit no worker,
        # subscriber or command gets in, and libzmq's listener spins (fd_limit.py)
        fd_limit.raise_open_files_limit(f"coordinator {self.name}")
        try:
            keyed = self.keydir is not None
            sockets.check_bind_allowed(address, insecure=cfg.insecure, keyed=keyed)
            port = sockets.parse_tcp(address)[1]
            if events_address is None:
                events_address = sockets.with_port(address, int(port) + 1) if port.isdigit() else address
            sockets.check_bind_allowed(events_address, insecure=cfg.insecure, keyed=keyed)
            ev_port = sockets.parse_tcp(events_address)[1]
            bus_in = sockets.with_port(address, int(ev_port) + 1) if ev_port.isdigit() else address
            size = cfg.max_message_size
            self.router = sockets.make_socket(self.ctx, zmq.ROUTER, max_message_size=size)
            self.xsub = sockets.make_socket(self.ctx, zmq.XSUB, max_message_size=size)
            self.xpub = sockets.make_socket(self.ctx, zmq.XPUB, max_message_size=protocol.SUBSCRIPTION_MAX)
            # events queued per subscriber before a slow one starts missing some (and recovering
            # them from history)
            self.xpub.setsockopt(zmq.SNDHWM, cfg.subscriber_hwm)
            self._xpub_send = sockets.plain_send(self.xpub)  # three sends an event (see _emit)
            # two plain sends a control frame: send_multipart's per-frame checks and enum flag
            # arithmetic were 28 of the ~310 lines the loop ran to start one agent
            self._router_send = sockets.plain_send(self.router)
            # what the XPUB's subscribers want (it tells every subscription, and an unsubscription
            # when a topic's last subscriber leaves): with none, events go to history only, where
            # a subscriber that comes later recovers them as it recovers any it missed
            self._subscribed: set[bytes] = set()
            if self.keydir is not None:
                pair = self.keydir.coordinator_pair()
                # the directory is read by a thread of its own: the loop and the gatekeeper never
                # wait on its file system (key_watch.py)
                self.key_watch = KeyWatch(self.keydir)
                self.key_watch.start()
                self.gatekeeper = curve.Gatekeeper(self.ctx, self.keydir)
                self.gatekeeper.start()
                curve.serve(self.router, pair, "control")
                curve.serve(self.xsub, pair, "bus")
                curve.serve(self.xpub, pair, "events")
            self.address = sockets.bind(self.router, address)
            self.events_address = sockets.bind(self.xpub, events_address)
            self.bus_address = sockets.bind(self.xsub, bus_in)
            # a worker whose process dies closes its connection: the monitor tells us at once
            # (and with keys, a handshake that failed is counted)
            self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED | curve.HANDSHAKE_FAILED)
            # a fork of this process (the script's own) must not keep them open: see fork_guard.py
            self._ports = [sockets.port_of(a) for a in (self.address, self.events_address, self.bus_address)]
            fork_guard.hold(self._ports)
            self._start_pulse(address, fixed=port.isdigit())
        except Exception:
            self._close()  # nothing half-open is left behind
            raise
        self.xsub.send(b"\x01")  # hear everything workers publish
        # a fixed port may be one workers of a previous coordinator still know
        self._fixed_port = port.isdigit()
        self._marker = runmarker.marker(self.name, self.address)

    def _start_pulse(self, address: str, fixed: bool) -> None:
        """Start the coordinator's pulse (coordinator_pulse.py): the port after the bus port, or
        one the OS picks if the address's port is.  Without it workers' leases run out while a
        call of the script holds the GIL, as before: said, not fatal."""
        cfg = self.config
        if not cfg.coordinator_pulse or not hasattr(os, "memfd_create"):
            return
        at = sockets.with_port(address, sockets.port_of(self.bus_address) + 1 if fixed else 0)
        try:
            self.pulse = PulseLink(at, Limits(cfg.heartbeat_interval, cfg.heartbeat_liveness).stall,
                                   str(self.keydir.path) if self.keydir is not None else None, self.session)
        except OSError as exc:
            log.warning("could not start the coordinator's pulse on %s (%s): a call of this script that holds the "
                        "GIL past its workers' lease will stop their agents; set coordinator_pulse=False to "
                        "silence this", at, exc)

    def start(self, records: list[AgentRecord], embedded: bool) -> None:
        cfg = self.config
        now = time.monotonic()
        window, strict, crash_window = cfg.adopt_window, False, 0.0
        if window is None:
            window = 0.0
            # only where workers may still run agents of a coordinator of our name that crashed
            if self._fixed_port and not embedded:
                # the window opened later if a worker's register shows a crash (predecessor.py)
                crash_window = adopt_window(Limits(cfg.heartbeat_interval, cfg.heartbeat_liveness))
                before = runmarker.previous(self._marker)
                if before == "running":
                    window, strict = crash_window, True
                    log.warning("the previous coordinator %r on %s did not end cleanly: waiting for its workers to "
                                "report what it left running (adoption window)", self.name, self.address)
                elif before is None:
                    # no word either way: connected workers say within the window whether the
                    # coordinator they served crashed (then agents wait as after a crash)
                    window = crash_window
                    log.info("no run marker of coordinator %r on %s here (%s): waiting %.1f s for workers to say "
                             "whether a predecessor left agents running", self.name, self.address, self._marker.parent,
                             window)
        if self._fixed_port:
            runmarker.mark(self._marker, "running")
        core = ClusterCore(self.name, self.session, cfg, now=now, rng=random.Random(), wall=time.time,
                           drop=self.dropped.drop, min_workers=self.min_workers, adopt_window=window,
                           strict_hold=strict, crash_window=crash_window, versions=local_versions(),
                           bus_port=sockets.port_of(self.bus_address), events_port=sockets.port_of(self.events_address),
                           pulse_port=self.pulse.port if self.pulse is not None else 0)
        if self.pulse is not None:
            self.pulse.tick(now)  # the core's first tick-time, and nothing vouched before it (the loop is not running)
        for record in records:  # those registered before start
            core.command(commands.AddAgent(record, graph_checked=True), now)
        self.core = core
        LOG_THREAD.start()  # here, not in the loop: Thread.start() waits until the thread runs
        self._thread = threading.Thread(target=self._run, name="pyorchestrate-coordinator", daemon=True)
        self._thread.start()

    def join_thread(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ================================================================== loop

    def _run(self) -> None:
        assert self.core is not None
        core = self.core
        # a stream that takes no data (a paused terminal, a full pipe) must not stop this loop: its
        # workers' leases would run out (log_thread.py)
        defer_in_this_thread()
        self.collector = collector.Collector()
        poller = zmq.Poller()
        for sock in (self.router, self.xsub, self.xpub, self.mailbox.wake_socket, self.monitor):
            poller.register(sock, zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while not self._closing:
                now = time.monotonic()
                # Tried: polling with 0 while a capped placement pass left agents waiting and fewer
                # than 4 passes of copies ran (S3 1-17 % faster): status() at S9's peak (--nice 19)
                # got slower, max 76-100 against 43-91 ms and medians 42-63 against 33-51 in 3 pairs
                # (no wait while a history answer is being built: it goes on at once)
                ready = dict(poller.poll(0 if self._scans else
                                         sockets.wait_ms(min(next_tick, core.next_restart) - now)))
                # read what is queued first, then judge: after a stall of our own (GC, SIGSTOP, a
                # burst) the heartbeats that arrived meanwhile count before anyone is declared lost
                if self.mailbox.wake_socket in ready:
                    # a bounded slice: 10,000 register_agent calls at once must not hold up
                    # heartbeats (or a status() call) for a second
                    deadline = time.monotonic() + _DRAIN_SECONDS
                    while time.monotonic() < deadline:
                        taken = self.mailbox.drain(_COMMANDS_PER_TURN)
                        for command, future in taken:
                            self._run_command(command, future, carry_out=False)
                            self._serve_queries_waiting()
                        self._carry_out()  # once a slice: the decisions of its commands, in order
                        if len(taken) < _COMMANDS_PER_TURN:
                            # the box was empty: what comes now rings again (another drain here
                            # found nothing most turns, a third of the mailbox's cost in S2)
                            break
                # placed at the end of the turn only.  Tried: placing (and sending) also before the
                # reports are read, so workers run the next batch meanwhile: S3 ~5 % faster (the
                # loop waited in poll 18 % of the run instead of 29 %), but with two placement passes
                # a turn, where no status() is served, status() at S9's peak reached 101-134 ms in 2
                # of 7 runs (--nice 19; 42-59 ms in 4 without)
                behind = self.router in ready and self._drain_control()
                self._serve_queries_waiting()
                self._carry_out()  # a run's end announces its last bus events before the bus is read
                if self._prejoin:
                    # after what the registers decided (an agent adopted goes before its events),
                    # before the bus is read (these frames came first)
                    self._replay_prejoin()
                if self.monitor in ready:
                    self._on_monitor()
                if self.xsub in ready:
                    # a slice of bus events is one hand-over of their callbacks (logs, events)
                    self.dispatcher.hold()
                    try:
                        self._drain(self.xsub, self._on_bus)
                    finally:
                        self.dispatcher.release()
                    self._serve_queries_waiting()
                if self.xpub in ready:
                    self._drain(self.xpub, self._on_subscription)
                if self._scans:
                    self._scan_history(time.monotonic() + _DRAIN_SECONDS)
                now = time.monotonic()
                if now >= next_tick:
                    # how late the tick is: the loop's lag, for status and /metrics
                    self.loop_lags.append(now - next_tick)
                    if self.keydir is not None:
                        self._check_revocations(now)
                    # the tick first goes to the pulse, then what it vouched comes back (coordinator_pulse.py)
                    core.tick(now, behind, self.pulse.tick(now) if self.pulse is not None else 0.0)
                    if self.pulse is not None and not self._pulse_gone_said and not self.pulse.running():
                        self._pulse_gone_said = True
                        log.error("the coordinator's pulse process ended (exit %s): from now on a call of this "
                                  "script that holds the GIL past its workers' lease stops their agents",
                                  self.pulse.process.returncode)
                    if self._tail_hold:  # a tail that never came: the agent's end is said anyway
                        self._release(self._tail_hold.expired(now))
                    if self._awaited_order and self._awaited_order[0][0] <= now:
                        self._give_up_tails(now)
                    if self._early_hold:
                        self._release_early(self._early_hold.expired(now))
                    if self._prejoin:
                        for worker, frames in self._prejoin.expired(now):
                            self.dropped.drop("bus_frame_not_from_worker", worker, count=frames)
                    self._publish_bus_heartbeat(now)
                    self._sweep(now)
                    if self.collector is not None:
                        self.collector.tick(len(core.agents), now)
                    next_tick = core.next_wake(now)
                self._serve_queries_waiting()
                core.restarts_due(now)
                core.place(now)
                core.release_drained(now)
                self._check_finished(now)
                self._carry_out()
                self._serve_queries_waiting()
        except Exception:
            log.exception("coordinator loop crashed; shutting down")
            core.start_error = "the coordinator loop crashed (see the log)"
            self._on_finished()
        finally:
            self._close()

    def _serve_queries_waiting(self) -> None:
        # within a phase too: a slice is bounded in wall time, which a busy process stretches
        # (status() waited up to 131 ms for a phase to end with 100 workers and 10,000 agents).
        # Mailbox.has_query, inline: asked seven times a launch, nearly always for nothing
        items = self.mailbox.items
        if items and items[0][0] is None:
            self._serve_queries()

    def _serve_queries(self) -> None:
        for command, future in self.mailbox.queries():
            self._run_command(command, future)

    def _run_command(self, command: commands.Command, future: Any, carry_out: bool = True) -> None:
        assert self.core is not None
        if future is not None and not future.set_running_or_notify_cancel():
            return  # its caller gave up waiting and withdrew it (Orchestrator._call): not done
        if trace.enabled and isinstance(command, commands.AddAgent):
            trace.mark("loop", command.record.name)
        try:
            if isinstance(command, commands.Close):
                self._release_early(self._early_hold.everything())
                self._release(self._tail_hold.everything())
                self.final_snapshot = self._snapshot()
                self._closing = True
            result = self.core.command(command, time.monotonic())
            if isinstance(command, commands.Snapshot):
                # expanded here, not in the caller's thread: while the loop is busy the caller
                # gets the GIL back only now and then, and each of the slices an expansion of
                # 10,000 rows needs had to win it again (status() at the peak of S9, 100
                # workers: expansion alone took up to 115-260 ms in the caller, 8 ms of work)
                result = snapshots.expand(self._snapshot(result))
        except Exception as exc:
            if future is None:
                log.exception("command %s failed", type(command).__name__)
            else:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)
        if carry_out:
            self._carry_out()

    def _carry_out(self) -> None:
        """Do what the core decided."""
        assert self.core is not None
        if not (self.core.has_actions() or self._state_changes or self._started_keys):
            # most calls (six a launch in S2): nothing decided since the last one
            return
        self.dispatcher.hold()
        # the events of one batch of decisions carry one time: they were decided at one moment
        # (stamped one by one, formatting the time was a tenth of publishing an event).  Stamped
        # at its first event: a batch that only sends (a launch's start) needs no time at all
        self._in_batch = True
        self._batch_info = log.isEnabledFor(logging.INFO)
        try:
            self._carry_out_actions()
        finally:
            self._in_batch = False
            self._batch_stamp = None
            self._flush_states()  # before the callbacks: one reading a handle sees the new state
            self.dispatcher.release()

    def _stamp_batch(self) -> dict[str, str]:
        """The time of an event: that of the batch being carried out (made at its first event),
        or now, outside a batch."""
        when = stamp()
        if self._in_batch:
            self._batch_stamp = when
        return when

    def _flush_states(self) -> None:
        """Tell the handles (agent(name).state, wait_ready) the latest state of each agent that
        changed: once per batch of decisions and under one lock, not once per event (a short
        run changes state three times in one report)."""
        if self._state_changes:
            changed = self._state_changes
            self._on_agent_states([(r.name, r.state._value_, r.worker, r.epoch) for r in changed.values()])
            changed.clear()

    def _carry_out_actions(self) -> None:
        assert self.core is not None
        for action in self.core.take():
            kind = type(action)
            if kind is Send:
                self._send(action.identity, action.frame)
                if trace.enabled:
                    trace.sent(action.frame)
            elif kind is Publish:
                if action.record is not None and action.subject in self._tail_hold.subjects:
                    # after the run's last bus events, but stamped now: its time is when it happened
                    # (a restart's delay is measured from it), not when the tail let it out
                    when = self._batch_stamp or self._stamp_batch()
                    self._tail_hold.add(action.subject, action._replace(fields={**when, **action.fields}))
                else:
                    self._publish(action.event, action.subject, action.fields, action.record)
            elif kind is AwaitBus:
                key = (action.publisher, action.incarnation)
                if action.seq > self._bus_seqs.get(key, 0):
                    self._awaited_bus[key] = action.seq
                    self._awaited_order.append((time.monotonic() + TAIL_GIVE_UP, key))
                    self._tail_hold.start(action.publisher.partition("/")[2], key, time.monotonic())
                else:
                    self._bus_seqs.pop(key, None)  # the run is over and all of it arrived
            elif kind is Forget:
                self._state_changes.pop(action.name, None)  # forgotten: nothing to tell
                self._on_forget(action.name)
            elif kind is Finished:
                self.dispatcher.flush()  # join() returns next and waits for these callbacks
                self._on_finished()
        while self._started_keys:
            key = self._started_keys.pop(0)
            self._release_early([(key, item) for item in self._early_hold.started(key)])

    def _drain_control(self) -> bool:
        """Read a bounded slice of control frames; True if more are waiting (we are behind)."""
        deadline = time.monotonic() + _DRAIN_SECONDS
        router = self.router
        for i in range(_DRAIN_BATCH):
            if time.monotonic() >= deadline:
                return True
            if i == 1 and not sockets.readable(router):  # see sockets.readable
                return False
            try:
                frames = sockets.recv_frames(router, zmq.NOBLOCK)
            except zmq.Again:
                return False
            try:
                fd = frames[-1].get(zmq.SRCFD)
            except zmq.ZMQError:  # libzmq has no source fd for some frames (empty ones)
                fd = -1
            self._handle(self._on_control, [f.bytes for f in frames], fd, frames[-1] if self.keydir else None)
            self._serve_queries_waiting()
        return True

    def _handle(self, handler: Callable[..., None], *args: Any) -> None:
        """Run one message's handler: whatever the network sent, the loop goes on."""
        try:
            handler(*args)
        except protocol.ProtocolError as exc:
            self.dropped.drop("bad_frame", exc)
        except Exception as exc:  # a bug of ours on a strange message: count it, log it, carry on
            self.dropped.drop("handler_error", f"{type(exc).__name__}: {exc}")
            log.debug("handler error", exc_info=True)

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        assert self.core is not None
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            if event["event"] & curve.HANDSHAKE_FAILED:
                if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # the gatekeeper counted those
                    self.handshake_failures[curve.server_side(event["event"], int(event["value"]))] += 1
                continue
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            identity = self._fd_identity.pop(int(event["value"]), None)
            if identity is not None:
                self.core.disconnected(identity, time.monotonic())

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        deadline = time.monotonic() + _DRAIN_SECONDS
        for i in range(_DRAIN_BATCH):
            if time.monotonic() >= deadline:
                return
            if i == 1 and not sockets.readable(sock):  # see sockets.readable
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(handler, frames)
            self._serve_queries_waiting()

    def _publish_bus_heartbeat(self, now: float) -> None:
        # lets subscribers confirm their subscription and notice a lost last event
        if now - self._last_bus_beat < self.config.heartbeat_interval:
            return
        self._last_bus_beat = now
        self._emit("_HEARTBEAT", self._bus_heartbeat(), numbered=False)

    def _bus_heartbeat(self) -> bytes:
        fields = {"event": "_HEARTBEAT", "seq": self._seq, "publisher": self.name,
                  "incarnation": self.session, **stamp()}
        return msgpack.packb(fields, use_bin_type=True)

    def _sweep(self, now: float) -> None:
        """Free the bus sequence state of runs and workers that are over (it would grow forever
        in a long DAEMON run of short-lived agents)."""
        if now - self._last_sweep < _SWEEP_EVERY:
            return
        self._last_sweep = now
        assert self.core is not None
        for key in list(self._bus_seqs):
            if key not in self._awaited_bus and not self._current_publisher(*key):
                del self._bus_seqs[key]

    def _current_publisher(self, publisher: str, incarnation: str) -> bool:
        assert self.core is not None
        worker, _, agent = publisher.partition("/")
        if agent:
            return self.core.bus_accepts(agent, worker, incarnation)
        record = self.core.workers.get(publisher)
        return record is not None and record.incarnation == incarnation

    # ================================================================== control messages

    def _send(self, identity: bytes, frame: bytes) -> None:
        try:
            self._router_send(identity, _MORE)
            self._router_send(frame, _LAST)
        except zmq.ZMQError as exc:
            # no route (ROUTER_MANDATORY) or full: the worker's connection is gone; if it is a
            # worker we count on, it must come back and speak within the reconnect grace
            log.debug("could not send to %r: %s", identity, exc)
            # named for what it is: a peer gone, not garbage from the network
            self.dropped.counts["send_to_unreachable_peer"] += 1
            assert self.core is not None
            self.core.disconnected(identity, time.monotonic())

    def _on_control(self, frames: list[bytes], fd: int = -1, keyed_frame: Any = None) -> None:
        assert self.core is not None
        core = self.core
        if len(frames) != 2:
            raise protocol.ProtocolError(f"control message with {len(frames)} frames")
        identity, frame = frames
        try:
            message = protocol.decode(frame, self.config.max_message_size)
        except protocol.ProtocolError:
            self._maybe_refuse_old_peer(identity, frame)
            raise
        if trace.enabled and message["type"] == "agent_events":
            trace.ends("reported", message["events"])
        if message["type"] == "request":  # a client: pyorchestrate status/ps/stop..., the dashboard
            role = keyed_frame.get("User-Id").partition(":")[0] if keyed_frame is not None else None
            self._on_request(identity, message, role, fd)
            return
        if keyed_frame is not None and message["type"] == "register" and not self._key_allows_worker(
                identity, keyed_frame.get("User-Id")):
            return
        core.control(identity, message, time.monotonic(), len(frame))
        if message["type"] == "register" or core.worker_of(identity) is not None:
            self._note_fd(identity, fd)

    def _on_request(self, identity: bytes, message: dict[str, Any], role: str | None, fd: int = -1) -> None:
        """Answer a client on the control port (queries: reader keys; actions: admin keys)."""
        assert self.core is not None
        op, rid = message["op"], message["id"]
        unread = sockets.unacked_bytes(fd)
        if unread > CLIENT_UNREAD_MAX:
            # not answered at all: an answer would wait in libzmq too, as would a refusal
            self.dropped.drop("client_not_reading", f"a client asked {op!r} with {unread} bytes of earlier "
                                                    f"answers still unread (at most {CLIENT_UNREAD_MAX})", what="request")
            return
        try:
            args = control.check(op, message["args"], role)
            result = self._answer(op, args)
        except (control.Refused, ValueError, KeyError) as exc:
            self.client_requests["refused"] += 1
            error = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            self._send_client(identity, protocol.encode("reply", id=rid, ok=False, error=str(error)))
        except Exception as exc:  # a bug of ours: the client hears it at once, the loop goes on
            log.exception("client request %r failed", op)
            self.client_requests["failed"] += 1
            self._send_client(identity, protocol.encode("reply", id=rid, ok=False,
                                                        error=f"the coordinator failed: {type(exc).__name__}: {exc}"))
        else:
            self.client_requests[op] += 1
            self._send_client(identity, protocol.encode("reply", id=rid, ok=True, result=result))

    def _answer(self, op: str, args: dict[str, Any]) -> Any:
        assert self.core is not None
        now = time.monotonic()
        if control.OPS[op].role == "admin":
            for command in control.command(op, args):
                self.core.command(command, now)
            self._carry_out()
            return {"done": op, **args}
        if op == "history":
            return control.history(self._history.items(), args, protocol.decode_body)
        snapshot = self._snapshot(self.core.command(commands.Snapshot(), now))  # captured, not expanded
        if op == "agents":
            return control.agents(snapshots.expand_agents(control.pick(snapshot["agent_rows"], args)), time.time())
        if op == "workers":
            return control.workers(snapshot)
        return control.status(snapshot["agent_rows"], snapshot, self._status_extra())

    def _status_extra(self) -> dict[str, Any]:
        return {"coordinator": self.name, "session": self.session, "protocol": protocol.PROTOCOL_VERSION,
                "uptime": round(time.monotonic() - self._started, 1), "events_published": self._seq,
                "history_held": len(self._history), "history_answering": len(self._scans),
                "client_requests": dict(self.client_requests),
                "loop_lag": round(max(self.loop_lags, default=0.0), 4), "open_files": fd_limit.open_files()}

    def _send_client(self, identity: bytes, frame: bytes) -> None:
        """A reply to a client: one gone meanwhile is no worker lost (nothing else to do)."""
        try:
            self.router.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.client_requests["reply_to_gone_client"] += 1

    def _note_fd(self, identity: bytes, fd: int) -> None:
        """Remember which connection an identity speaks on (for closed-connection detection)."""
        if fd >= 0 and self._fd_identity.get(fd) != identity:
            self._fd_identity[fd] = identity

    def _key_allows_worker(self, identity: bytes, user: str) -> bool:
        """With keys: a register counts only on a connection made with an admitted worker key."""
        assert self.keydir is not None
        role, _, name = user.partition(":")
        if role != "worker":
            reason = (f"this connection's key ({role} key {name!r}) is not a worker key: a worker needs one "
                      "(pyorchestrate keys add worker NAME)")
            self.dropped.drop("register_without_worker_key", f"{role}:{name}")
            self._send(identity, protocol.encode("refused", reason=reason))
            return False
        if ("worker", name) not in self.keydir.latest().values():
            self.dropped.drop("register_with_revoked_key", name)
            self._send(identity, protocol.encode("refused", reason=f"worker key {name!r} was revoked", retry=True))
            return False
        self._key_of[identity] = name
        return True

    def _say_whether_the_key_dir_answers(self, now: float) -> None:
        """Once when the key directory has kept its reader waiting for KEY_DIR_STUCK s, once when it answers."""
        assert self.keydir is not None and self.key_watch is not None
        stuck = self.key_watch.stuck_for(now)
        if (stuck >= KEY_DIR_STUCK) == self._key_dir_stuck_said:
            return
        self._key_dir_stuck_said = not self._key_dir_stuck_said
        if self._key_dir_stuck_said:
            log.error("key directory %s has not answered for %.0f s (a file system that hangs?): the keys of its "
                      "last answer stay in force, and revocations and new keys wait for the next",
                      self.keydir.path, stuck)
        else:
            log.warning("key directory %s answers again", self.keydir.path)

    def _check_revocations(self, now: float) -> None:
        """A worker whose key was revoked is told so and counted lost (its agents move once its
        lease has run out: it may not stop them, and it is not trusted to say it did)."""
        assert self.core is not None and self.keydir is not None
        self._say_whether_the_key_dir_answers(now)
        if not self._key_of:
            return
        admitted = {name for role, name in self.keydir.latest().values() if role == "worker"}
        for identity, name in list(self._key_of.items()):
            if name in admitted:
                if self.core.worker_of(identity) is None:
                    del self._key_of[identity]  # that connection's worker is gone: nothing to revoke
                continue
            del self._key_of[identity]
            worker = self.core.worker_of(identity)
            self._send(identity, protocol.encode("refused", reason=f"worker key {name!r} was revoked", retry=True))
            if worker is not None:
                self.core.revoke(worker, f"worker {worker.name!r}: its key {name!r} was revoked", now)

    def _maybe_refuse_old_peer(self, identity: bytes, frame: bytes) -> None:
        try:
            version, kind = protocol.peek_version(frame)
        except protocol.ProtocolError:
            return
        if kind == "register" and version != protocol.PROTOCOL_VERSION:
            reason = (f"protocol version mismatch: coordinator speaks {protocol.PROTOCOL_VERSION}, worker speaks "
                      f"{version!r}. Install the same pyorchestrate version on both sides.")
            self._send(identity, protocol.encode("refused", reason=reason))

    # ================================================================== bus traffic from workers

    def _on_bus(self, frames: list[bytes]) -> None:
        size = self.config.max_message_size
        if frames and frames[0] == protocol.BATCH_TOPIC:
            worker, token, wseq, items = protocol.decode_batch(frames, size)
            if not self._from_worker(worker, token, frames):
                return
            self._note_worker_frame(worker, token, wseq)
            now = self._last_batch[worker] = time.monotonic()
            last_key: tuple[str, str] | None = None
            accepted = early = False
            for publisher, run, topic, seq, body in items:
                key = (publisher, run)
                if key != last_key:  # a batch holds runs of events of one agent: judge once per run
                    last_key = key
                    accepted = publisher.partition("/")[0] == worker and (
                        key in self._awaited_bus or self._current_publisher(publisher, run))
                    early = accepted and self._before_started(publisher, run)
                if not accepted:
                    self.dropped.drop("stale_bus_event", publisher)
                    continue
                if early:
                    if self._early_hold.add(key, (seq, topic, body), now):
                        continue  # before its STARTED: published right after it
                    # the hold is full: what it has goes first, so nothing overtakes it (this
                    # event went on alone, and those held were then dropped as duplicates)
                    self._release_early([(key, item) for item in self._early_hold.started(key)])
                self._bus_event(key, seq, topic, body)
        elif frames and frames[0] == protocol.BEATS_TOPIC:
            worker, token, wseq, beats = protocol.decode_beats(frames, size)
            if not self._from_worker(worker, token, frames):
                return
            self._note_worker_frame(worker, token, wseq)
            self._on_beats(worker, beats)
        else:
            raise protocol.ProtocolError("bus frame is neither a batch nor beats")

    def _bus_event(self, key: tuple[str, str], seq: int, topic: str, body: bytes) -> None:
        try:
            self._on_bus_event(key, seq, topic, body)
        except protocol.ProtocolError as exc:  # one bad body spoils no other
            self.dropped.drop("bad_frame", exc)

    def _replay_prejoin(self) -> None:
        """The bus frames that came before their worker's register, now that it has registered:
        judged as if they came now (its token, its runs), in the order they came."""
        assert self.core is not None
        for worker in self._prejoin.names():
            if worker in self.core.workers:
                self.dispatcher.hold()
                try:
                    for frames in self._prejoin.take(worker):
                        self._handle(self._on_bus, frames)
                finally:
                    self.dispatcher.release()

    def _before_started(self, publisher: str, run: str) -> bool:
        """Is this the agent's current run, sent but not yet reported STARTED?  (The tail of its
        previous run, arriving meanwhile, is not held: that run's end waits for it.)"""
        assert self.core is not None
        record = self.core.agents.get(publisher.partition("/")[2])
        return record is not None and record.state is AgentState.ASSIGNED and record.tag == run

    def _release_early(self, held: list[tuple[tuple[str, str], tuple[int, str, bytes]]]) -> None:
        for key, (seq, topic, body) in held:
            self._bus_event(key, seq, topic, body)

    def _from_worker(self, worker: str, token: str, frames: list[bytes]) -> bool:
        """Is this bus frame from the worker it names?  The bus input cannot tell who connected;
        the secret its process showed in its register (on its own control connection) can.  A
        frame naming a worker not registered yet waits for its register, within bounds
        (prejoin.py); nothing else is kept for a frame that fails: a flood of made-up publishers
        costs no more than those bounds."""
        assert self.core is not None
        record = self.core.workers.get(worker)
        if record is None and self._prejoin.add(worker, frames, time.monotonic()):
            return False
        # as bytes: compare_digest refuses str that is not ASCII (anyone can send that)
        if record is None or not record.token or not hmac.compare_digest(token.encode(), record.token.encode()):
            self.dropped.drop("bus_frame_not_from_worker", worker)
            return False
        return True

    def _note_worker_frame(self, worker: str, incarnation: str, wseq: int) -> None:
        """A gap in a worker's bus frame numbers: frames lost between it and us (what they held
        is counted exactly by each run's seqs)."""
        known = self.worker_bus.get(worker)
        if known is not None and known[0] == incarnation and wseq > known[1] + 1:
            self.dropped.drop("bus_frames_lost", f"{wseq - known[1] - 1} frame(s) from {worker}")
        if known is None or known[0] != incarnation or wseq > known[1]:
            self.worker_bus[worker] = (incarnation, wseq)

    def _on_beats(self, worker: str, beats: list) -> None:
        """A worker's running agents, each with the last seq its run sent before this frame: a
        seq beyond what arrived is a lost tail, reported now (not when the agent ends)."""
        assert self.core is not None
        wanted = self.dispatcher.wants(E.AGENT_HEARTBEAT)
        base = {"event": "AGENT_HEARTBEAT", "publisher": worker, "incarnation": self.session, "worker": worker,
                **stamp()}
        stale = 0
        agents = self.core.agents
        for agent, tag, seq in beats:
            if not self.core.bus_accepts(agent, worker, tag):
                record = agents.get(agent)
                if record is not None and record.tag != tag:
                    stale += 1  # counted once per frame: thousands of drops would each cost a log check
                # else: a run that ended (or was forgotten) since the worker wrote this frame; its
                # end reached us first.  Not a drop: a burst of short agents made hundreds of these
                continue
            key = (f"{worker}/{agent}", tag)
            last = self._bus_seqs.get(key)
            if key in self._early_hold.runs:
                pass  # events of it wait for its STARTED, judged as they come out (marked arrived
                # here, they were all dropped as duplicates then)
            elif last is None:  # first word of this run here
                if seq:
                    # none arrived: lost, if this coordinator started the run (it numbers from 1;
                    # an adopted run sent its head to a predecessor)
                    if tag.partition(".")[0] == self.session:
                        self._report_gap(key[0], seq)
                    self._bus_seqs[key] = seq
            elif seq > last:
                self._report_gap(key[0], seq - last)
                self._bus_seqs[key] = seq
            # unnumbered: a heartbeat says "alive now"; one lost is not worth recovering
            fields = {**base, "agent_name": agent, "seq": self._seq, "run": tag}
            self._emit(protocol.event_topic("AGENT_HEARTBEAT", agent), self._pack(fields),
                       numbered=False)
            if wanted:
                self.dispatcher.dispatch(E.AGENT_HEARTBEAT, fields)
        if stale:
            self.dropped.drop("stale_bus_event", f"{stale} heartbeat(s) of {worker}", count=stale)

    def _on_bus_event(self, key: tuple[str, str], seq: int, topic: str, body: bytes) -> None:
        """Check one event's place in its publisher's sequence and forward it.  Its body is only
        parsed here if something here reads it (a log line, a callback): subscribers check it."""
        if not topic.startswith(_AGENT_BUS_TOPICS):
            # agents publish their own events and logs; lifecycle events come from the worker's
            # control connection and nowhere else, so the bus cannot fire AGENT_TERMINATED
            self.dropped.drop("bus_topic_not_allowed", topic[:64])
            return
        last = self._bus_seqs.get(key)
        if last is not None and seq > last + 1:
            self._report_gap(key[0], seq - last - 1)
        elif last is None and seq > 1 and key[1].partition(".")[0] == self.session:
            # the first of a run this coordinator started (it numbers from 1): those before it never
            # came (a run adopted from a predecessor sent its head there).  Uncounted, three 5 MB
            # events that cost a worker its bus connection were lost without a word
            self._report_gap(key[0], seq - 1)
        tail = False
        if last is None or seq > last:
            self._bus_seqs[key] = seq
            awaited = self._awaited_bus.get(key)
            if awaited is not None and seq >= awaited:
                del self._awaited_bus[key]
                del self._bus_seqs[key]  # its run is over and everything it sent has arrived
                tail = True
        elif seq <= last:
            self.dropped.drop("duplicate_bus_event", key[0])
            return
        try:
            self._forward_bus_event(topic, body)
        finally:
            if tail:
                self._release(self._tail_hold.arrived(key))  # the agent's end, now after its last lines

    def _give_up_tails(self, now: float | None) -> None:
        """Count as lost what ended runs said they sent and never arrived: those awaited since
        TAIL_GIVE_UP before ``now``, or all (``None``: finishing).  Their stragglers are then
        dropped as stale (a run over); the entries were kept for ever."""
        while self._awaited_order and (now is None or self._awaited_order[0][0] <= now):
            _, key = self._awaited_order.popleft()
            if key not in self._awaited_bus:
                continue  # its tail arrived
            if now is not None and now - self._last_batch.get(key[0].partition("/")[0], 0.0) < TAIL_QUIET:
                self._awaited_order.append((now + TAIL_QUIET, key))  # its worker's backlog still drains
                continue
            awaited = self._awaited_bus.pop(key)
            last = self._bus_seqs.pop(key, 0)
            if awaited > last:
                self._report_gap(key[0], awaited - last)

    def _release(self, held: list[Publish]) -> None:
        for action in held:
            self._publish(action.event, action.subject, action.fields, action.record)
        self._flush_states()

    def _forward_bus_event(self, topic: str, body: bytes) -> None:
        self._emit(topic, body)
        name = topic.partition(".")[0]
        event = _EVENTS.get(name)
        if event is None or not (event is E.AGENT_LOG or self.dispatcher.wants(event)):
            return
        fields = protocol.decode_body(topic, body, self.config.max_message_size)
        if event is E.AGENT_LOG:
            self._reemit_log(fields)
        if self.dispatcher.wants(event):
            self.dispatcher.dispatch(event, fields)

    def _emit(self, topic: str, body: bytes, numbered: bool = True) -> None:
        """Put one event on the XPUB under the next coordinator seq (kept in history), or, for
        a heartbeat, under the last one."""
        if numbered:
            self._seq += 1
            self._history.add(self._seq, topic, body)
        # not sent while nobody subscribes: three sends an event, each letting the GIL go, were
        # 4-8 us of the loop's CPU an agent in S3 (20,000 agents, 2 interleaved pairs: 35.5-40
        # against 39.5-48.5).  Tried once before and reverted for status() at S9's peak; measured
        # again on today's loop (4 pairs, --nice 19): max 63-98 ms against 87-121, medians 37-42
        # against 44-62; at nice 0 (3 pairs) max 154-203 against 154-205
        if not self._subscribed:
            return
        # three plain sends with int flags: send_multipart's per-frame flag arithmetic on enums
        # cost more than the sends themselves (measured: a third of the forwarding time)
        stamp = self._stamp(self._seq, numbered)
        send = self._xpub_send
        try:
            send(topic.encode(), _MORE)
            send(body, _MORE)
            send(stamp, _LAST)
        except zmq.Again:
            pass  # the subscriber sees the gap and asks history

    @staticmethod
    def _reemit_log(fields: dict[str, Any]) -> None:
        # under the agent's logger name, but through the parent logger: getLogger() per agent
        # would keep one logger per agent name ever seen (a DAEMON of short-lived agents grew
        # without bound)
        agent = str(fields.get("agent_name", "?"))
        level = fields.get("levelno")
        level = level if isinstance(level, int) else logging.INFO
        if not _AGENT_LOG.isEnabledFor(level):
            return
        record = _AGENT_LOG.makeRecord(f"pyorchestrate.agent.{agent}", level, "(agent)", 0, "%s [%s@%s]",
                                       (fields.get("message", ""), fields.get("worker", "?"), fields.get("host", "?")),
                                       None)
        _AGENT_LOG.handle(record)

    def _report_gap(self, publisher: str, lost: int) -> None:
        self.lost_events += lost
        log.warning("%d event(s) from %s were lost on the bus (a full queue, a connection lost, an event over "
                    "the size limit: its worker's log says which)", lost, publisher)
        self._publish(E.EVENTS_LOST, publisher, {"lost": lost, "source": publisher})

    def _on_subscription(self, frames: list[bytes]) -> None:
        frame = frames[0] if len(frames) == 1 else b""
        if frame[:1] not in (b"\x00", b"\x01"):
            raise protocol.ProtocolError("subscriber sent something other than a subscription")
        if frame[:1] != b"\x01":
            self._subscribed.discard(frame[1:])
            return
        self._subscribed.add(frame[1:])
        # a request is a subscription to a unique topic: the answer goes under it, so only the
        # asker hears it
        if frame.startswith(_HELLO):
            # answered like a heartbeat (our run and last seq), only sooner and to the asker only
            try:
                self.xpub.send_multipart([frame[1:], self._bus_heartbeat(), self._stamp(self._seq, False)],
                                         zmq.NOBLOCK)
            except zmq.Again:
                pass  # the asker falls back on our heartbeat
            return
        wanted = protocol.parse_range_request(frame[1:])
        if wanted is not None:
            self._serve_range(frame[1:], *wanted)
            return
        prefixes = protocol.parse_history_request(frame[1:])
        if prefixes is None:
            return
        if len(self._scans) >= _MAX_SCANS:
            reason = f"{_MAX_SCANS} history requests are waiting for their answers already: ask again later"
            self.dropped.drop("history_refused", reason)
            # (a subscriber of before this answer counts it a frame it could not read, and goes on)
            self.xpub.send_multipart([frame[1:], msgpack.packb([]), reason.encode()], zmq.NOBLOCK)
            return
        # answered a slice at a time, between the loop's other work (history.RecentScan)
        self._scans.append((frame[1:], history.RecentScan(self._history, prefixes)))

    def _scan_history(self, deadline: float) -> None:
        """Build the answers to history requests, oldest request first, until ``deadline``."""
        scans = self._scans
        while scans:
            topic, scan = scans[0]
            while not scan.step(_SCAN_EVENTS):
                if time.monotonic() >= deadline:
                    return
            scans.popleft()
            # (an XPUB drops what a subscriber's queue does not take: that asker goes on without
            # history after subscriber.HISTORY_WAIT)
            self.xpub.send_multipart([topic, msgpack.packb(scan.answer(), use_bin_type=True)], zmq.NOBLOCK)
            if time.monotonic() >= deadline:
                return

    def _serve_range(self, topic: bytes, session: str, first: int, last: int) -> None:
        """One slice of a range of our events (bounded work per request; the asker continues)."""
        refused = ""
        items: list = []
        covered = last
        if session != self.session:
            refused = "that coordinator run is over: its history went with it"
        elif last - first + 1 > history.MAX_RANGE or first < 1 or last < first:
            refused = f"a range of {last - first + 1} events is over the limit of {history.MAX_RANGE}"
        else:
            items, covered = self._history.slice(first, min(last, self._seq))
            if last > self._seq:
                covered = min(covered, self._seq)
        if refused:
            self.dropped.drop("history_refused", refused)
        reply = protocol.encode_range_reply(session, first, covered, items, refused)
        # (an XPUB without XPUB_NODROP drops what the asker's queue does not take, and never
        # raises zmq.Again: the asker asks again)
        self.xpub.send_multipart([topic, reply], zmq.NOBLOCK)

    # ================================================================== publishing

    def _publish(self, event: OrchestratorEvent, subject: str, fields: dict[str, Any],
                 record: AgentRecord | None = None) -> None:
        name = event._value_  # the plain str: Enum.value is a descriptor call, three times per agent
        when = self._batch_stamp or self._stamp_batch()
        fields = {"event": name, "seq": self._seq + 1, "publisher": self.name, "incarnation": self.session, **when, **fields}
        topic = f"{name}.{subject}"  # protocol.event_topic, inlined
        self._emit(topic, self._pack(fields))
        self.dispatcher.dispatch(event, fields)
        if trace.enabled and event is E.AGENT_TERMINATED:
            trace.mark("published", subject)
        if event is E.AGENT_STARTED and record is not None and self._early_hold.runs:
            # released once the actions of this turn are done: a report often holds STARTED, READY
            # and TERMINATED of a short run together, and its lines belong between READY and the end
            self._started_keys.append((f"{record.worker}/{record.name}", record.tag))
        if record is not None:
            self._state_changes[record.name] = record  # told with the batch (see _flush_states)
            info = self._batch_info if self._in_batch else log.isEnabledFor(logging.INFO)
            if event is not E.AGENT_ERROR and not info:
                return
            where = f"on {record.worker}" if record.worker else "(not placed)"
            if event is E.AGENT_ERROR and fields.get("recoverable"):
                # the agent's own log line (on the bus, printed once) says it; the traceback is on
                # the event (pyorchestrate history, the dashboard): no second copy here
                log.debug("agent %s %s: recoverable %s", record.name, where, fields.get("error_message"))
            elif event is E.AGENT_ERROR:
                log.error("agent %s %s: %s%s", record.name, where, fields.get("error_message"),
                          ("\n" + fields["traceback"].rstrip()) if fields.get("traceback") else "")
            else:
                log.info("agent %s %s %s", record.name, name.removeprefix("AGENT_").lower(), where)

    # ================================================================== finishing

    def _check_finished(self, now: float) -> None:
        assert self.core is not None
        if not self.core.all_done():
            return
        if self._awaited_bus:  # finished agents' last logs/events are still on their way
            if self._bus_deadline is None:
                self._bus_deadline = now + 2.0
            if now < self._bus_deadline:
                return
            log.warning("gave up waiting for the last bus events of %d agent(s)", len(self._awaited_bus))
            self._give_up_tails(None)
        if not self._may_finish():
            return  # an agent registered just now: the loop takes it next, and the run goes on
        self._release_early(self._early_hold.everything())
        self._release(self._tail_hold.everything())
        self.core.finish()

    def _snapshot(self, core_snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.core is not None
        snap = core_snapshot or self.core.snapshot(None, time.monotonic())
        pulse = sockets.with_port(self.address, self.pulse.port) if self.pulse is not None else None
        return {**snap, "addresses": {"control": self.address, "events": self.events_address, "bus": self.bus_address,
                                      "pulse": pulse},
                "pulse_running": self.pulse is not None and self.pulse.running(),
                "dropped": self._drop_counts(), "lost_events": self.lost_events,
                "security": self._security_status()}

    def _drop_counts(self) -> dict[str, int]:
        counts = dict(self.dropped.counts)
        if LOG_THREAD.dropped:  # lines this loop logged that its log stream took too long to take
            counts["log_record_unwritten"] = LOG_THREAD.dropped
        return counts

    def _security_status(self) -> dict[str, Any]:
        if self.gatekeeper is None:
            return {"keys": None}
        return {"keys": str(self.keydir.path) if self.keydir else None,
                "refused": {**dict(self.gatekeeper.refused), **dict(self.handshake_failures)}}

    def _close(self) -> None:
        if self.collector is not None:
            self.collector.close()
            self.collector = None
        if getattr(self, "xpub", None) is not None and self.core is not None:
            self._last_bus_beat = 0.0
            self._publish_bus_heartbeat(time.monotonic())  # our last seq: a lost tail shows
        if self._closing and getattr(self, "_fixed_port", False):
            runmarker.mark(self._marker, "clean")  # the workers were released
        if self.monitor is not None:
            self.router.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        for name in ("router", "xsub", "xpub"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=sockets.LINGER_MS)
        fork_guard.release(self._ports)
        self._ports = []
        if self.pulse is not None:
            self.pulse.close()
            self.pulse = None
        for _command, future in self.mailbox.close():
            # a call put in after the loop's last turn: its caller is told now (it waited the
            # whole call timeout, 30 s, then heard the loop "was stopped, or is overloaded")
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("this orchestrator has shut down"))
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None
        if self.key_watch is not None:
            self.key_watch.stop()
            self.key_watch = None
        self.ctx.term()
