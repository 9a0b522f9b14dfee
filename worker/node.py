"""A worker node: registers with a coordinator, runs what it is sent, heartbeats, and comes back.

The main thread owns every socket.  It registers (retrying with backoff until a coordinator
answers), then loops: control messages in, agent events out, heartbeats on a timer.  If the
coordinator falls silent or says goodbye, the worker registers again, with it or its successor.
Agent code runs on other threads or in child processes, so it cannot block heartbeats (except by
holding the GIL in C code; see the README).

Leases: the coordinator echoes the clock stamp of each heartbeat it receives.  The worker may run
its agents until the latest echoed stamp + the lease; past that it cannot prove the coordinator
still counts on it (a partition, a dead or frozen coordinator: it cannot tell which and never
needs to), so it stops every agent that would be replaced elsewhere and keeps only those started
with ``keep``.  What happens to agents while no coordinator listens is kept and delivered with the
next registration, never dropped.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import tenacity
import zmq

from pyorchestrate import curve, flow, own_threads, protocol, sockets, trace
from pyorchestrate.publisher import MAX_EVENT_BYTES, BusOutbox
from pyorchestrate.drops import DropCounter
from pyorchestrate.limits import ORPHAN_TIMEOUT, REGISTER_BACKOFF_MAX, REGISTER_JITTER, Limits
from pyorchestrate.keys import ENV
from pyorchestrate.mailbox import WakeQueue
from pyorchestrate.versions import local_versions
from pyorchestrate.log_thread import defer_in_this_thread, deferrable

from . import clock, crowd, group_guard, pulse
from .coordinator_vouch import CoordinatorVouch
from .errors import bounded
from .fold import fold
from .reexec import carried_drops, exec_again
from .resolver import Resolver
from .supervisor import Supervisor

log = deferrable(logging.getLogger("pyorchestrate.worker"))

REGISTER_TIMEOUT = 2.0
#: how long a registration waits for a connection's ZeroMQ handshake to end once the connection is
#: made (a slow link takes a few round trips; no connection at all still gives up after REGISTER_TIMEOUT)
HANDSHAKE_WAIT = 30.0
#: at most this long between heartbeats while a register waits for its welcome
PIPELINED_BEAT = 0.1
# how long a registration waits for a fresh lookup of the coordinator's host name when it has an
# earlier answer (resolver.py): DNS answers in milliseconds when it answers at all
RESOLVE_WAIT = 0.25
PULSE_MODES = ("auto", "always", "never")
PULSE_BOOT_WAIT = 10.0  #: seconds a --pulse always worker waits for its pulse to boot before it first registers
#: after the longest stop timeout of its agents, how long a shutting-down worker waits for a process
#: that would not die (killed 2 s past its timeout) before it leaves anyway
SHUTDOWN_MARGIN = 5.0
_EVENTS_PER_MESSAGE = 500  # keeps one message well under any max_message_size
# error text per message (characters, each at most 4 bytes): with errors.MAX_*_CHARS per report,
# a frame stays under the smallest max_message_size a coordinator accepts (4 MiB)
_ERROR_CHARS_PER_MESSAGE = 256 * 1024
_ERRORS_KEPT = 10  # recoverable errors of one copy kept while no coordinator listens (see _keep_reports)
_PENDING_MAX = 200_000  # reports kept while no coordinator listens (beyond: the oldest go, counted)
_RECENT_ENDS = 2_000  # last TERMINATED reports, repeated in every registration (one may have been lost)
POLL_CAP_MS = 100
#: how long a loop that finds its lease past the window waits for frames already on their way
#: (_read_arrived): one poll cap, so a lease that did run out is acted on at most that much later
ARRIVED_WAIT = POLL_CAP_MS / 1000
#: one loop turn reads at most this many control frames, and spends at most this long acting on
#: them and at most this long sending bus batches: no burst can keep the loop from heartbeating
READ_SLICE = 2000
WORK_SLICE = 0.05
BUS_SLICE = 0.02
_BEATS_PER_FRAME = 5000


def _from_another_coordinator(message: dict[str, Any], session: str) -> bool:
    """Is this the welcome of another coordinator than the one we served (it restarted)?"""
    return message["type"] == "welcome" and message["session"] != session


class NoAnswer(Exception):
    """The coordinator did not answer a registration in time."""


#: thread agents one process runs before the rest go to agent hosts (host.py): a fifth of where
#: CPython's GIL herd tips over on this kind of machine (~10,000 threads; benchmarks/threads.py)
THREADS_PER_PROCESS = 2000


class Refused(Exception):
    """The coordinator refused this worker; retrying will not help."""


def _error_chars(item: dict[str, Any]) -> int:
    fields = item["fields"]
    return len(str(fields.get("error_message", ""))) + len(str(fields.get("traceback", "")))


def _errors_cut_to_fit(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` for a register, their error text cut so that all of it stays within
    _ERROR_CHARS_PER_MESSAGE.  A register goes in one frame (the coordinator needs the list of
    copies and their reports together), and 30 agents failing with long tracebacks while no
    coordinator listened (10 errors each kept) made one of 24 MB: over a max_message_size, and the
    worker, refused at every try, could never register again.  The errors themselves all stay."""
    errors = [i for i, item in enumerate(items) if item["event"] == "AGENT_ERROR"]
    if sum(_error_chars(items[i]) for i in errors) <= _ERROR_CHARS_PER_MESSAGE:
        return items
    share = max(64, _ERROR_CHARS_PER_MESSAGE // len(errors))  # each error's part of the budget
    out = list(items)
    for i in errors:
        fields = out[i]["fields"]
        cut = {"error_message": protocol.cut_text(fields.get("error_message", ""), share // 4),
               "traceback": protocol.cut_text(fields.get("traceback", ""), share - share // 4)}
        out[i] = {**out[i], "fields": {**fields, **cut}}
    return out


def _bound_errors(items: list[dict[str, Any]], kept: dict[tuple[str, str, int], int]) -> tuple[list, list[str]]:
    """``items`` without a copy's recoverable errors past the first _ERRORS_KEPT (``kept``
    counts them by copy, across calls), and the agents of those left out, one per error."""
    bounded, dropped = [], []
    for item in items:
        if item["event"] == "AGENT_ERROR" and item["fields"].get("recoverable"):
            copy = (item["agent"], item["run"], item["epoch"])
            kept[copy] = kept.get(copy, 0) + 1
            if kept[copy] > _ERRORS_KEPT:
                dropped.append(item["agent"])
                continue
        bounded.append(item)
    return bounded, dropped


def _close_saying(dealer: zmq.Socket, closing: bytes) -> None:
    """Close a control connection on purpose, saying so first (``closing``): else the coordinator
    would take the closed connection for a dead worker (and restart its agents elsewhere)."""
    try:
        dealer.send(closing, zmq.NOBLOCK)
    except zmq.ZMQError:
        pass
    dealer.close(linger=200)


class Worker:
    """One ``pyorchestrate-worker`` process."""

    def __init__(self, coordinator: str, name: str | None = None, labels: dict[str, str] | None = None,
                 capacity: int = 0, parent_pid: int | None = None, orphan_timeout: float = ORPHAN_TIMEOUT,
                 keys: Any = None, key_name: str | None = None, pulse: str = "auto",
                 threads_per_process: int = THREADS_PER_PROCESS) -> None:
        sockets.parse_tcp(coordinator)
        if threads_per_process < 0:
            raise ValueError(f"threads_per_process={threads_per_process}: use 0 (no agent hosts) or a positive count")
        if pulse not in PULSE_MODES:
            raise ValueError(f"pulse={pulse!r}: use one of {', '.join(PULSE_MODES)}")
        # "auto": a pulse process once this worker runs MANY_AGENTS (the GIL herd); "always": from
        # the first registration (agents in C code that holds the GIL); see pulse.py
        self._pulse_mode = pulse
        self._pulse: subprocess.Popen | None = None
        #: "always": a pulse process started with this worker, booted (Python and its imports, 0.1-1
        #: s) while it waits for its configuration; at the first welcome it only needs that line
        self._pulse_spare: subprocess.Popen | None = None
        self._pulse_to = ""  # the address it pulses to
        # with keys: every connection is CurveZMQ with this worker's key, and only to the holder of
        # the coordinator key (no code is run from whoever binds the address first)
        self._keydir, self._key = curve.client_key(keys, ("worker",), key_name)
        if self._keydir is not None:
            # the one option names the key directory for our agents too (their ZmqPubSub/ZmqReqRep
            # links and subscribers find it there, threads and child processes alike)
            os.environ[ENV] = str(self._keydir.path)
        self._watch: curve.HandshakeWatch | None = None
        self._told = ""  # the last handshake failure logged (each is said once)
        self._streak = [0]  # handshakes in a row that failed without detail (across connections)
        self.coordinator = coordinator
        # every socket of ours connects to what this looked up, never to the name (resolver.py)
        self._resolver = Resolver(coordinator)
        self._connect_to = ""  # the address of the current control connection
        self._resolve_told = ""  # what was last said of lookups: "", "stale" or "none" (see _resolve)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.labels = labels or {}
        self.capacity = capacity
        self.parent_pid = parent_pid
        self.orphan_timeout = orphan_timeout
        self._orphans_stopped = False
        self._drained_by: list[str] = []  # sessions that released us after a drain
        # the coordinator (name, session) whose welcome we read last, until it says it finished:
        # told in every register, so a coordinator of that name started anew knows it crashed
        self._left_by = ("", "")
        self._last_refusal = ""
        self.incarnation = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.dropped = DropCounter(log)
        carried = carried_drops()
        if carried:
            self.dropped.counts.update(carried)
            log.warning("started again in its own place (exec); the process before dropped %s", carried)
        self._ctx = zmq.Context()
        # asks the coordinator's pulse process whether its loop is stalled, when its echoes are late
        self._vouch = CoordinatorVouch(self._ctx, self._key, self.dropped.drop)
        self._outbox = WakeQueue()  # agents' lifecycle reports (thousands of threads put, no lock)
        self._bus_signal = WakeQueue()  # wakes the loop when agents' bus events wait
        self._bus_outbox = BusOutbox(wake=lambda: self._bus_signal.put(None))
        self._supervisor = Supervisor(self._queue_event, self.name, self._bus_outbox, threads_per_process)
        self._dealer: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._bus_address = ""
        self._bus_seq = 0  # numbers this worker's bus frames (batches and beats)
        # the largest bus event sent on (the coordinator's max_message_size / 4, from its welcome):
        # a frame over its limit cost the bus connection, and with it every event on the way
        self._bus_event_max = MAX_EVENT_BYTES
        self._bus_sent: dict[tuple[str, str], int] = {}  # (publisher, run tag) -> last seq sent
        # control frames read but not yet acted on, in order (heartbeat replies are taken at once)
        self._deferred: collections.deque[dict[str, Any]] = collections.deque()
        self._deferred_starts = 0
        self._read_session = ""  # the session of the last welcome read (acted on or not)
        self._subscribed = False
        self._beating: dict[tuple[str, str, int], int] = {}  # copy whose STARTED went out -> round
        self._beat_round = 0
        self._gc = crowd.FreezePolicy()  # thousands of agents: see crowd.py
        self._shutdown = threading.Event()
        self._session = ""
        self._coordinator_name = ""
        # a secret of this process, shown in every register and bus frame and never published:
        # the incarnation is on the bus for anyone to read, this is not (see protocol.py)
        self._token = secrets.token_hex(16)
        self._limits = Limits()
        self._lease_from = clock.now()  # latest own heartbeat stamp the coordinator echoed
        self._supervisor.lease.until = self._lease_from + self._limits.lease
        self._lease_expired = False
        self._stuck_said = False  # said once that stuck threads outlive the lease beside kept agents
        #: once the lease ran out: when what thread agents started must be gone (None: ended, or no lease ran out)
        self._strays_due: float | None = None
        #: once the lease ran out: the threads that thread agents started (own_threads.others()) then,
        #: and when they must be gone (see _end_left_threads)
        self._left_threads: list[threading.Thread] = []
        self._left_due = 0.0
        self._last_heard = clock.now()  # the last frame from a coordinator (the orphan timeout)
        self._slow_link_said = False  # said that the round trip to the coordinator exceeds its window
        self._next_parent_check = 0.0
        self._pending: list[dict[str, Any]] = []  # reports not yet delivered to a coordinator
        self._errors_kept: dict[tuple[str, str, int], int] = {}  # recoverable errors of a copy among them
        self._bounded = 0  # how many reports waited for room when last bounded (_bound_held_back)
        self._in_register = 0  # how many of them the last register carried
        self._conn = 0  # connections opened so far (the current one's number)
        self._welcomed_conn = 0  # the number of the last connection a coordinator welcomed us on
        #: that connection, kept while we register on a new one: its heartbeats and their echoes go
        #: on while a long register crosses (see _keep_old_dealer), and the frames it had sent
        self._old_dealer: zmq.Socket | None = None
        self._old_sent_n = 0
        self._old_beat_due = 0.0
        self._sent_n = 0  # frames sent on the current connection
        self._recv_n = 0  # the number of the last coordinator frame handled on it
        self._unsaid = 0  # bytes read from the coordinator since we last said how far we read (flow.py)
        #: what we sent on this connection and the coordinator has not read yet: reports are framed
        #: only while there is room, so our heartbeats never wait behind a burst of them (flow.py)
        self._window = flow.SendWindow()
        self._parts = flow.Reassembly()  # a big start or payload arriving in parts (flow.py)
        # the latest ends sent: a connection that resets can lose one in flight, and the next
        # registration repeats them (the coordinator ignores an end it already knows)
        self._recent_ends: collections.deque[dict[str, Any]] = collections.deque(maxlen=_RECENT_ENDS)
        #: the frames of reports sent on this connection that the coordinator has not said it read:
        #: (number, reports).  Lost on the way, or still on it when we register again on a new
        #: connection (the coordinator then reads them from one that is no longer ours), their
        #: reports would be lost; the next register carries them again (see _register_message)
        self._unread: collections.deque[tuple[int, list[dict[str, Any]]]] = collections.deque()
        #: the same for the connection we were welcomed on last, once replaced: (its number, frames);
        #: carried by every register until one is welcomed
        self._unread_old: tuple[int, list[tuple[int, list[dict[str, Any]]]]] | None = None

    # ------------------------------------------------------------------ public

    def request_shutdown(self) -> None:
        """Ask the worker to stop its agents and exit (from any thread; not from a signal handler:
        stop_signals.py says why)."""
        self._shutdown.set()

    def exit_now(self) -> None:
        """End the process at once, its agents not stopped (a second Ctrl-C).  Safe: its thread
        agents end with it, its process agents and agent hosts at once when their pipe closes
        (child.worker_gone), and the coordinator, its connection closed, knows they are gone and
        starts elsewhere what it must.  Only the agents' on_stop/on_close do not run."""
        log.warning("SIGINT again: exiting now, not waiting for %d agent(s) to stop", self._supervisor.count())
        trace.write()
        logging.shutdown()
        os._exit(130)

    def run(self) -> int:
        """Serve coordinators until shutdown; return the process exit code."""
        # our records logged here are handled on the log thread: whatever handlers the root logger
        # has by then, an agent's among them (an HTTP log shipper whose collector hangs held this
        # loop in its first line after: the coordinator took the worker for lost)
        defer_in_this_thread()
        log.info("worker %s (pid %d) serving coordinator %s", self.name, os.getpid(), self.coordinator)
        if self._pulse_mode == "always":
            # booted before the first registration: started at the welcome, the pulse took 0.25-1 s
            # to boot (Python and its imports), and meanwhile only the window covered this worker:
            # an agent holding the GIL from its start could make a false death (a short window, a
            # loaded machine).  The join waits for that boot instead
            self._pulse_spare = self._spawn_pulse()
            if self._pulse_spare is not None:
                self._await_boot(self._pulse_spare, PULSE_BOOT_WAIT)
        try:
            while not self._shutdown.is_set():
                try:
                    self._register_with_retries()
                except Refused as exc:
                    log.error("%s", exc)
                    return 2
                if self._shutdown.is_set():
                    break
                self._serve()
            return 0
        finally:
            self._shut_down()

    # ------------------------------------------------------------------ registration

    def _close_dealer(self) -> None:
        """Close the control connection on purpose: say so first, or the coordinator would take
        the closed connection for a dead worker (and restart its agents elsewhere)."""
        if self._dealer is None:
            return
        self._say_handshake_failure()
        self._drop_watch()
        _close_saying(self._dealer, self._frame("closing"))
        self._dealer = None

    def _drop_watch(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _keep_old_dealer(self) -> None:
        """Keep the connection we were welcomed on while we register on a new one (make before
        break).  A register over a narrow link can take longer than the window to cross, and the
        heartbeats on its connection wait behind it: after frames were lost (a connection that
        reset), a worker registering again with 130 copies (300 kB, 6 s of a 50 kB/s link, a 5 s
        window) was declared lost, though it was alive and only resyncing.  The old connection
        still carries heartbeats, and their echoes renew the lease; what else comes on it is moot
        (the register sets all of it right), and it closes once the new one is welcomed."""
        self._close_old_dealer()
        self._drop_watch()
        self._old_dealer, self._old_sent_n, self._dealer = self._dealer, self._sent_n, None

    def _close_old_dealer(self) -> None:
        old, self._old_dealer = self._old_dealer, None
        if old is not None:  # (its close is no death: the worker lives on, on its new connection)
            _close_saying(old, protocol.encode("closing", n=self._old_sent_n + 1))

    def _tend_old(self) -> None:
        """While registering (every wait of it: the handshake, the welcome, the back-off between
        attempts): heartbeats on the kept connection, liveness only (no counts to compare, no
        numbers); their echoes renew the lease, and the rest is moot (see _keep_old_dealer).
        Not once the lease has run out: this worker has stopped the copies the coordinator will
        replace, and must not go on looking alive to it (a one-way cut, the coordinator unheard:
        its heartbeats on the old connection kept the worker "alive", its agents stopped and never
        moved); that connection closes, and the coordinator judges it by its silence, as before."""
        old = self._old_dealer
        if old is None:
            return
        if self._lease_expired:
            self._close_old_dealer()
            return
        now = clock.now()
        if now >= self._old_beat_due:
            self._old_beat_due = now + min(self._limits.interval, PIPELINED_BEAT)
            try:
                old.send(protocol.encode("heartbeat", t=now), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for _ in range(READ_SLICE):
            if not old.poll(0):
                return
            try:
                message = protocol.decode(old.recv())
            except protocol.ProtocolError as exc:
                self.dropped.drop("bad_frame", exc)
                continue
            if message["type"] == "heartbeat_reply":
                self._renew_lease(message["echo"])
                if self._unread_old is not None:  # (read there, so not to be carried again)
                    conn, frames = self._unread_old
                    self._unread_old = (conn, [frame for frame in frames if frame[0] > message["read"]])

    def _new_dealer(self, address: str) -> zmq.Socket:
        if self._unread:  # (reports go only on a welcomed connection: the coordinator knows it)
            self._unread_old = (self._conn, list(self._unread))
            self._unread.clear()
        if self._dealer is not None and self._welcomed_conn == self._conn:
            self._keep_old_dealer()
        else:
            self._close_dealer()
        dealer = sockets.make_socket(self._ctx, zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, f"{self.name}/{uuid.uuid4().hex[:8]}".encode())
        if self._key is not None:
            curve.connect_as(dealer, self._key)
        self._watch = curve.HandshakeWatch(dealer, self.coordinator, self._key, self._keydir, self._streak,
                                           expect="control port")
        sockets.connect(dealer, address)
        self._connect_to = address
        self._dealer = dealer
        self._sent_n = self._recv_n = self._unsaid = 0  # a new connection numbers its frames from 1
        self._window = flow.SendWindow(self._limits.lease)
        self._parts.clear()
        self._conn += 1
        return dealer

    def _say_handshake_failure(self) -> None:
        """Log why the coordinator and we could not agree on keys: once per reason (retries go on)."""
        failure = self._watch.failure() if self._watch is not None else None
        if failure and failure != self._told:
            self._told = failure
            log.error("%s; retrying", failure)
        elif self._watch is not None and self._watch.succeeded:
            self._told = ""

    def _frame(self, type_: str, **fields: Any) -> bytes:
        """One numbered frame for the current connection (a gap tells the coordinator frames were lost)."""
        self._sent_n += 1
        return protocol.encode(type_, n=self._sent_n, **fields)

    def _register_message(self) -> bytes:
        # the running list first, then the reports: a copy leaves the list only after its last
        # report is queued, so whatever is missing from one is in the other
        running = self._supervisor.running()
        self._keep_reports()
        self._in_register = len(self._pending)
        # the reports sent and not said read, then those not sent yet: the coordinator takes the
        # first it never read (registration.py), and both fit in one frame together
        unread_conn, frames = self._bound_unread()
        sent = [item for _, batch in frames for item in batch]
        fitted = _errors_cut_to_fit(sent + self._pending)
        unread, at = [], 0
        for n, batch in frames:
            unread.append({"n": n, "events": fitted[at:at + len(batch)]})
            at += len(batch)
        return self._frame(
            "register", name=self.name, incarnation=self.incarnation, host=self.host, pid=os.getpid(),
            labels=self.labels, capacity=self.capacity, versions=local_versions(),
            agents=running, events=[*self._recent_ends, *fitted[at:]], bus_seq=self._bus_seq,
            drained_by=self._drained_by, t=clock.now(), seen=self._acted_n(), seen_session=self._read_session,
            conn=self._conn, token=self._token, orphan_timeout=self.orphan_timeout,
            left_by=self._left_by[0], left_session=self._left_by[1], unread=unread, unread_conn=unread_conn)

    def _bound_unread(self) -> tuple[int, list[tuple[int, list[dict[str, Any]]]]]:
        """The unread frames a register carries (see _unread), and the connection they went on,
        bounded as what waits for a coordinator is: a copy's recoverable errors past the first
        _ERRORS_KEPT are dropped and counted (an agent failing every cycle while the coordinator
        did not read made a register of 220 kB, more the longer it went on)."""
        conn, frames = self._unread_old or (self._conn, list(self._unread))
        kept: dict[tuple[str, str, int], int] = {}
        bounded = []
        for n, batch in frames:
            items, dropped = _bound_errors(batch, kept)
            for agent in dropped:
                self.dropped.drop("recoverable_error_unread", agent)
            bounded.append((n, items))
        if self._unread_old is not None:  # (kept bounded: the next register counts no drop twice)
            self._unread_old = (conn, bounded)
        else:
            self._unread = collections.deque(bounded)
        return conn, bounded

    def _acted_n(self) -> int:
        """The number of the last coordinator frame acted on: every frame up to it has been (a
        frame read but still waiting in the queue has not: its start has not happened yet, and
        the coordinator must not take the agent for gone)."""
        return self._deferred[0]["n"] - 1 if self._deferred else self._recv_n

    def _keep_reports(self, online: bool = False) -> None:
        """Move what agents reported (the outbox) to the list of reports not yet delivered, in order:
        sent by the next flush, or with the next registration while there is no coordinator.

        Not ``online`` (they wait for a coordinator), a copy's recoverable errors beyond the first
        _ERRORS_KEPT are dropped and counted: an agent failing a cycle at a time, thousands a
        second, made registrations grow by 2.7 MB a second, until one no longer fit in the
        coordinator's max_message_size and the worker could never register again.  (Online, the
        same holds for what waits for room: see _bound_held_back.)"""
        # a short run's three reports as one item where they go together anyway (fold.py)
        for name, run, epoch, event, fields in fold(self._outbox.drain()):
            if not online and event == "AGENT_ERROR" and fields.get("recoverable"):
                kept = self._errors_kept.get((name, run, epoch), 0)
                if kept >= _ERRORS_KEPT:
                    self.dropped.drop("recoverable_error_while_offline", name)
                    continue
                self._errors_kept[(name, run, epoch)] = kept + 1
            self._pending.append(protocol.agent_event(name, run, epoch, event, fields))
        if len(self._pending) > _PENDING_MAX:
            excess = len(self._pending) - _PENDING_MAX
            del self._pending[:excess]
            self._in_register = max(0, self._in_register - excess)
            self.dropped.drop("report_while_offline", f"{excess} oldest agent report(s)")

    def _register_with_retries(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(NoAnswer),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=REGISTER_BACKOFF_MAX, jitter=REGISTER_JITTER),
            stop=lambda state: self._shutdown.is_set(),
            sleep=self._sleep_interruptibly,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            retrying(self._register_once)
        except NoAnswer:
            pass  # shutdown requested while waiting

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        if self._told:  # the handshake failed, and we said why: "no coordinator" would mislead
            log.debug("still refused at %s (attempt %d): %s", self.coordinator, state.attempt_number, self._told)
            return
        level = logging.INFO if state.attempt_number in (1, 5) or state.attempt_number % 20 == 0 else logging.DEBUG
        log.log(level, "no coordinator at %s yet (attempt %d); retrying", self.coordinator, state.attempt_number)

    def _sleep_interruptibly(self, seconds: float) -> None:
        deadline = clock.now() + seconds
        while not self._shutdown.is_set() and clock.now() < deadline:
            self._pump_outbox_offline()
            self._shutdown.wait(min(0.05, max(0.0, deadline - clock.now())))

    def _pump_outbox_offline(self) -> None:
        # while no coordinator listens: keep what agents report (the next coordinator gets it),
        # let the lease run out, enforce stop timeouts
        self._tend_old()  # (a coordinator may still hear us there, and renew the lease)
        self._keep_reports()
        self._check_lease()
        if (self.orphan_timeout and not self._orphans_stopped and self._supervisor.count()
                and clock.now() - self._last_heard > self.orphan_timeout):
            self._stop_orphans()
        self._supervisor.enforce_stop_timeouts()
        self._supervisor.forget_finished()
        if self._lease_expired or self._orphans_stopped:
            self._end_threads_past_lease()
            self._end_strays_past_lease()
        if self._left_threads:
            self._end_left_threads()
        self._check_parent()

    def _stop_orphans(self) -> None:
        """The orphan timeout: stop every copy, those kept running without a coordinator too.  The
        coordinator replaces a kept copy it gave up on (disconnect_timeout) once this timeout and
        the copy's stop timeout have passed since the worker was lost, so from here on they are
        held to that as the lease's copies are: a process agent killed at the end of its stop
        timeout, a thread agent stuck past it ended by an exec, what thread agents left running
        ended.  Before, they were still "kept": a thread agent lingering in on_stop, a thread one
        left running, ran on beside the replacement (for good), a process agent deaf to SIGTERM
        for 0.8 s (measured)."""
        self._orphans_stopped = True
        orphaned_at = self._last_heard + self.orphan_timeout
        log.warning("no coordinator for %.0f s (orphan timeout): stopping %d agent(s)",
                    self.orphan_timeout, self._supervisor.count())
        self._watch_what_thread_agents_leave(orphaned_at)
        self._supervisor.stop_all(lease_end=orphaned_at, orphaned=True)
        self._stuck_said = False  # a kept agent kept it from ending stuck threads: none is kept now

    def _watch_what_thread_agents_leave(self, stopped_at: float) -> None:
        """Copies here are stopped at ``stopped_at`` and will be replaced elsewhere: what thread
        agents started (processes, threads) must be gone when the first replacement of one is
        due (_end_strays_past_lease, _end_left_threads)."""
        due = self._supervisor.local_threads_due(stopped_at)
        self._strays_due = stopped_at if due is None else due
        if due is not None:  # a thread agent runs here: what threads it started, it may leave running
            self._left_threads, self._left_due = own_threads.others(), due

    def _end_threads_past_lease(self) -> None:
        """A thread agent the lease stopped that is still running at the end of its stop timeout
        would run beside its replacement, due elsewhere now (a partition, a coordinator gone):
        threads cannot be killed, so this process starts again in its own place (exec), which ends
        them, and its process agents and agent hosts with it (their pipes close: a stuck thread in
        a host ends too).  Not while an agent that keeps running without a coordinator
        (on_disconnect="keep") runs here: ending it would break that promise instead, so that case
        is only said."""
        if self._shutdown.is_set():
            return  # this process is ending anyway (and takes its threads with it)
        stuck = self._supervisor.threads_past(self._lease_from + self._limits.lease, clock.now())
        if not stuck or self._stuck_said:
            return
        if self._supervisor.keeps_any():
            self._stuck_said = True
            log.error("thread agent(s) %s ignored their stop past the lease and their stop timeout: they run on "
                      "beside their replacements, and this worker cannot end them without ending agents that "
                      "keep running (on_disconnect='keep') too; use process agents for code that may not return",
                      ", ".join(stuck))
            return
        log.error("thread agent(s) %s ignored their stop past the lease (or the orphan timeout) and their stop "
                  "timeout, and their replacements are due elsewhere: threads cannot be killed, so this worker "
                  "starts again (exec) to end them", ", ".join(stuck))
        exec_again(self._dropped_by_exec())

    def _dropped_by_exec(self) -> dict[str, int]:
        """What this process dropped, and what an exec loses: the reports not yet delivered (a
        coordinator was silent, or this happened before the welcome) and the bus items not yet
        sent.  The next process says them in its heartbeats, under the same name."""
        counts = collections.Counter(self.dropped.counts)
        counts["report_lost_in_exec"] += len(self._pending) + len(self._outbox)
        counts["bus_item_lost_in_exec"] += len(self._bus_outbox)
        return {kind: n for kind, n in counts.items() if n}

    def _end_left_threads(self) -> None:
        """A thread agent stopped at the lease's end returns, but the threads it started and left
        running go on doing its work: beside its replacement, due elsewhere once the lease and its
        stop timeout have passed.  Those threads (any thread of this process that pyorchestrate did
        not start, and that ran as the lease ran out: own_threads.py) get until then to end, as
        their agents may have told them to; if one still runs then, this process starts again in
        its own place (exec), as for a thread agent stuck past its stop timeout, since no thread can
        be killed.  Not while an agent that keeps running without a coordinator runs here: the
        threads may be its own.  Checked past that time even if this worker registered again
        meanwhile: the agents' ends went with its registration, and their replacements may start at
        once."""
        if clock.now() < self._left_due or self._shutdown.is_set():
            return
        left, self._left_threads = [t for t in self._left_threads if t.is_alive()], []
        if not left:
            return
        names = ", ".join(sorted({t.name for t in left})[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        if self._supervisor.keeps_any():
            log.error("%d thread(s) that thread agents started (%s) still run past the lease and their agents' stop "
                      "timeout: they may run beside their agents' replacements, and this worker cannot end them "
                      "without ending agents that keep running (on_disconnect='keep') too; an agent that starts "
                      "threads should end them as it stops", len(left), names)
            return
        log.error("%d thread(s) that thread agents started and left running (%s) still run past the lease (or the "
                  "orphan timeout) and their agents' stop timeout, when their replacements are due elsewhere: "
                  "threads cannot be killed, so this worker starts again (exec) to end them; an agent that starts "
                  "threads should end them as it stops", len(left), names)
        exec_again(self._dropped_by_exec())

    def _end_strays_past_lease(self) -> None:
        """The lease ran out and no thread agent runs in this process any more: what thread agents
        started and left running (in our process group) belongs to no agent that runs, and would
        run beside the replacements due elsewhere.  It ends, once per lease run out: SIGTERM, and
        SIGKILL when the first of those agents' replacements is due (one second at most), in a
        thread of its own, as this loop goes on registering (group_guard.py).  While a thread agent
        runs here (one that keeps running without a coordinator, or one stuck, which the exec of
        _end_threads_past_lease ends), nothing can tell its processes from the others'."""
        if self._strays_due is None or self._supervisor.local_threads_due(0.0) is not None:  # (one runs)
            return
        grace = min(1.0, max(0.0, self._strays_due - clock.now()))
        self._strays_due = None
        # only what runs now: an agent started meanwhile (this worker registered again) keeps its own
        args = (grace, "lost its lease", False)
        try:
            own_threads.thread(group_guard.end_members, "strays", args=args).start()
        except RuntimeError:  # no thread to be had (a pids limit): here, then; no coordinator waits on us
            group_guard.end_members(*args)

    def _resolve(self) -> str | None:
        """The address to connect to now: a fresh lookup of the coordinator's host if it comes in
        time (RESOLVE_WAIT, or REGISTER_TIMEOUT with no earlier answer), else the last answer."""
        earlier = self._resolver.address()
        ticket = self._resolver.refresh()
        deadline = clock.now() + (RESOLVE_WAIT if earlier else REGISTER_TIMEOUT)
        while not self._resolver.wait(ticket, 0.05) and clock.now() < deadline and not self._shutdown.is_set():
            self._pump_outbox_offline()
        address = self._resolver.address()
        why = self._resolver.error or "no answer yet"
        # said once per outage (its reason changes between a late lookup and a failed one)
        if self._resolver.answered(ticket) and not self._resolver.error:
            state = ""
            if earlier and address != earlier:
                log.warning("coordinator %s is now at %s (was %s)", self.coordinator, address, earlier)
        elif address is None:
            state = "none"
            if state != self._resolve_told:
                log.warning("cannot look up the coordinator's host %s: %s; retrying", self.coordinator, why)
        else:
            state = "stale"
            if state != self._resolve_told:
                log.warning("looking up the coordinator's host %s: %s; connecting to its last address, %s, until "
                            "a lookup answers", self.coordinator, why, address)
        self._resolve_told = state
        return address

    def _register_once(self) -> None:
        address = self._resolve()
        if address is None:
            raise NoAnswer()
        dealer = self._new_dealer(address)
        started = clock.now()
        shaken = self._await_handshake()
        register = self._register_message()
        try:
            # never a blocking send: a DEALER whose handshake failed has no peer, and would wait for ever
            dealer.send(register, zmq.NOBLOCK)
        except zmq.Again:
            pass
        drops = self._watch.drops if self._watch is not None else 0
        # the welcome takes a round trip, which the handshake took at least, and the register's
        # time to cross, which over a narrow link is its size's (flow.longest_crossing); with no
        # handshake done (nobody listening, a refusal), the attempt lasts REGISTER_TIMEOUT in all
        now = clock.now()
        if shaken:
            deadline = now + max(REGISTER_TIMEOUT, now - started) + flow.longest_crossing(len(register),
                                                                                         self._limits.lease)
        else:
            deadline = started + REGISTER_TIMEOUT
        # heartbeats follow the register while the welcome is on its way: their stamps, echoed
        # right after it, renew the lease it starts.  Else the first fresh echo came only a round
        # trip after the welcome, two after the register's stamp: a link whose round trip is over
        # half the window never got a lease that held (300 ms each way, a 1 s window)
        beat_every = min(self._limits.interval, PIPELINED_BEAT)
        next_beat = clock.now() + beat_every
        early: list[dict[str, Any]] = []
        while clock.now() < deadline and not self._shutdown.is_set():
            if clock.now() >= next_beat:
                self._beat()
                next_beat = clock.now() + beat_every
            if dealer.poll(50):
                frame = dealer.recv()
                try:
                    message = protocol.decode(frame)
                except protocol.ProtocolError as exc:
                    self.dropped.drop("bad_frame", exc)
                    continue
                if message["type"] == "welcome":
                    self._close_old_dealer()  # (the coordinator has moved us to this connection)
                    self._welcomed_conn = self._conn
                    self._recv_n = message["n"]
                    self._read_session = message["session"]
                    self._drop_deferred()  # a new connection: what was queued on the old one is moot
                    self._on_welcome(message)
                    # what the coordinator sent on this connection before its welcome (a stop it
                    # says again, for a copy we listed) is acted on after it, in order (it was
                    # dropped here before: that copy ran on)
                    self._deferred.extend(early)
                    self._deferred_starts += sum(len(m["agents"]) for m in early if m["type"] == "starts")
                    if self._await_fresh_lease() != "reconnect":
                        return
                    break
                if message["n"] and message["type"] != "refused":
                    self._recv_n = message["n"]  # (said in the heartbeats meanwhile: flow.py)
                    whole = self._whole(message) if message["type"] == "part" else message
                    if whole is not None:
                        early.append(whole)
                    continue
                if message["type"] == "refused":
                    self._stop_told(message["stop"])
                    if message["retry"]:
                        # temporary: drained from this coordinator, or our old self not yet declared lost
                        if message["reason"] != self._last_refusal:
                            self._last_refusal = message["reason"]
                            log.log(logging.DEBUG if message["reason"] == "drained" else logging.WARNING,
                                    "coordinator %s: %s", self.coordinator, message["reason"])
                        break
                    raise Refused(f"coordinator {self.coordinator} refused worker {self.name}:\n{message['reason']}")
            self._pump_outbox_offline()
            self._say_handshake_failure()
            if self._watch is not None and self._watch.drops > drops:
                # the register is lost with it: sent again now, not once a long register's wait is over
                log.info("the connection to coordinator %s closed before its welcome came: sending the register again",
                         self.coordinator)
                break
        # close now, not at the next attempt: a socket left open through the back-off sleep would
        # deliver this register when the coordinator appears, and its welcome would be lost
        self._close_dealer()
        raise NoAnswer()

    def _await_handshake(self) -> bool:
        """Wait until the new connection's ZeroMQ handshake is done (True), or given up on.

        The register carries our clock's stamp, and the lease counts from it once the coordinator
        echoes it: stamped before the handshake (a few round trips), a register over a slow link
        came back with a lease that had run out (300 ms each way and a 1 s window: the worker
        registered, was "silent for 1.8 s" at once, and registered again, for ever).  Stamped
        after, it counts one round trip.  No connection made within REGISTER_TIMEOUT (nobody
        listens, or the handshake failed): the register goes out anyway, as before; one made: its
        handshake gets up to HANDSHAKE_WAIT."""
        start = clock.now()
        watch = self._watch
        if watch is None:
            return True  # (none to ask: wait for the welcome as before)
        while not self._shutdown.is_set():
            self._say_handshake_failure()
            elapsed = clock.now() - start
            if watch.succeeded or elapsed >= (HANDSHAKE_WAIT if watch.connected else REGISTER_TIMEOUT):
                return watch.succeeded
            watch.wait(0.05)
            self._pump_outbox_offline()
        return False

    def _on_welcome(self, message: dict[str, Any]) -> None:
        self._session = message["session"]
        self._coordinator_name = message["coordinator"]
        self._left_by = (self._coordinator_name, self._session)
        self._limits = Limits(float(message["heartbeat_interval"]), int(message["heartbeat_liveness"]))
        self._window.lease = self._limits.lease
        self._renew_lease(message["echo"])
        self._last_heard = clock.now()
        # the coordinator has what the register carried; what came after goes out next
        del self._pending[:self._in_register]
        self._in_register = 0
        self._unread_old = None
        self._errors_kept.clear()  # the next time no coordinator listens, its copies start again at 0
        self._orphans_stopped = False
        self._last_refusal = ""
        for warning in message["warnings"]:
            log.warning("version difference with the coordinator: %s", warning)
        # (at least a quarter of the smallest max_message_size a coordinator may have, 4 MiB)
        self._bus_event_max = min(MAX_EVENT_BYTES, max(message["max_message_size"] // 4, 2**20))
        events_port = message["events_port"]
        self._supervisor.events_address = sockets.with_port(self._connect_to, events_port) if events_port else None
        self._supervisor.events_key = self._key
        if self._pulse is not None and self._pulse_to != self._connect_to:
            self._stop_pulse()  # it would pulse where the coordinator was
        self._maybe_pulse()
        pulse_port = message["pulse_port"]
        self._vouch.aim(sockets.with_port(self._connect_to, pulse_port) if pulse_port else None)
        bus = sockets.with_port(self._connect_to, int(message["bus_port"]))
        if bus != self._bus_address:
            if self._pub is not None:
                self._pub.close(0)
            # an XPUB rather than a PUB: it tells us when the coordinator's subscription has
            # arrived, so nothing is published into the void (and counted as lost) at connect
            self._pub = sockets.make_socket(self._ctx, zmq.XPUB)
            if self._key is not None:
                curve.connect_as(self._pub, self._key)
            sockets.connect(self._pub, bus)
            self._subscribed = False
            self._bus_address = bus
        self._stop_told(message["stop"])
        at = self.coordinator if self._connect_to == self.coordinator else f"{self.coordinator} ({self._connect_to})"
        log.info("registered with coordinator %s at %s (heartbeat %.2fs x %d)",
                 message["coordinator"], at, self._limits.interval, self._limits.liveness)

    def _await_fresh_lease(self) -> str | None:
        """After a welcome, serve only once the lease holds: a welcome's lease counts from its
        register's stamp, and a long register over a narrow link took longer than the window to
        cross (300 kB over 50 kB/s, a 5 s window), so the lease had run out as it came, and the
        worker registered again at once, with the same register, for ever.  The heartbeats sent
        while it crossed follow it, and the coordinator echoes the latest within its heartbeat
        interval: wait that long for a fresh lease, reading what comes meanwhile in order (acted on
        once serving).  "reconnect": frames were lost (register again)."""
        assert self._dealer is not None
        end = clock.now() + self._limits.interval + REGISTER_TIMEOUT
        next_beat = clock.now()
        while clock.now() - self._lease_from > self._limits.lease and clock.now() < end and not self._shutdown.is_set():
            if clock.now() >= next_beat:
                self._beat()
                next_beat = clock.now() + PIPELINED_BEAT
            if self._dealer.poll(50) and self._read_control() == "reconnect":
                return "reconnect"
        round_trip = clock.now() - self._lease_from
        if round_trip > self._limits.lease and not self._slow_link_said:
            # (else all it says is "coordinator silent: registering again", over and over)
            self._slow_link_said = True
            log.error("the round trip to coordinator %s took %.1f s, longer than its heartbeat window (%.1f s = "
                      "heartbeat_interval x heartbeat_liveness): this worker can never show a lease, so it runs "
                      "nothing; give the coordinator a window well above the round trip", self.coordinator,
                      round_trip, self._limits.lease)
        return None

    def _stop_told(self, items: list[dict[str, Any]]) -> None:
        """Stop the copies a coordinator says are not ours to run any more (in a welcome, or in a
        refusal: another process holds this worker's name)."""
        for item in items:
            log.info("coordinator says agent %s (run %s.%d) is not ours to run any more: stopping it",
                     item["agent"], item["run"], item["epoch"])
            self._beating.pop((item["agent"], item["run"], item["epoch"]), None)
            self._supervisor.stop(item["agent"], item["run"], item["epoch"], float(item["timeout"]))

    def _renew_lease(self, echo: float) -> None:
        # the echo is a stamp of our own clock from before the coordinator answered: the lease
        # counts from when we asked, so a reply that sat in a buffer cannot stretch it
        if echo > self._lease_from:
            self._lease_from = echo
            self._lease_expired = False
            self._stuck_said = False
            self._strays_due = None  # the lease runs again: what runs here is its agents' again
            # its process agents told now, not at our next heartbeat: they stop theirs at the end of
            # the lease last told if we are stopped then (lease_guard.py), and a lease told a
            # heartbeat late ended that much sooner (tests/test_starved_worker.py)
            self._supervisor.renew_lease(self._lease_from + self._limits.lease)
        self._supervisor.lease.until = self._lease_from + self._limits.lease  # for its agents' threads

    def _maybe_pulse(self) -> None:
        """Start the pulse process when it is due (see pulse.py); once started it stays."""
        if self._pulse is not None or self._pulse_mode == "never":
            return
        if self._pulse_mode == "auto" and self._supervisor.size() < crowd.MANY_AGENTS:
            return
        keys = str(self._keydir.path) if self._keydir is not None else None
        self._pulse_to = self._connect_to
        config = {"coordinator": self._connect_to, "name": self.name, "token": self._token, "pid": os.getpid(),
                  "interval": self._limits.interval, "keys": keys, "key_name": self._key.name if self._key else None}
        proc, self._pulse_spare = self._pulse_spare or self._spawn_pulse(), None
        if proc is None:
            return
        try:
            proc.stdin.write((json.dumps(config) + "\n").encode())  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except OSError as exc:  # it died meanwhile
            log.warning("could not start the pulse process: %s", exc)
            self._end_pulse(proc)
            self._pulse_mode = "never"
            return
        self._pulse = proc
        log.info("pulse process %d started (%d agents): the coordinator hears this process is alive even "
                 "when this loop cannot speak", proc.pid, self._supervisor.size())

    def _spawn_pulse(self) -> subprocess.Popen | None:
        """A pulse process, waiting for its configuration on its stdin (None: none could start)."""
        try:
            # a session of its own, so a scheduler group of its own (autogroup): in ours it would be one
            # thread among our thousands, starved by the very herd it is there to outlast
            proc = subprocess.Popen([sys.executable, "-m", "pyorchestrate_worker.pulse"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            log.warning("could not start the pulse process: %s", exc)
            self._pulse_mode = "never"
            return None
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        return proc

    def _await_boot(self, proc: subprocess.Popen, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a pulse process to say it is booted (its first stamp,
        which renews nothing: read here and dropped).  Past that, register anyway: a pulse late to
        boot covers this worker later, as it did before."""
        out = proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = clock.now() + timeout
        got = b""
        while len(got) < pulse.ECHO.size and not self._shutdown.is_set():
            left = deadline - clock.now()
            if left <= 0:
                log.warning("the pulse process %d did not boot within %.0f s: registering without it",
                            proc.pid, timeout)
                return
            if not select.select([out], [], [], min(left, 0.1))[0]:
                continue  # (a short wait: a SIGTERM meanwhile is seen at once)
            try:
                chunk = os.read(out, pulse.ECHO.size - len(got))
            except BlockingIOError:
                continue
            if not chunk:
                return  # it died: _maybe_pulse finds out and says so
            got += chunk

    def _pulse_echoes(self) -> None:
        """The coordinator answered our pulse: the lease runs from the latest answered stamp."""
        if self._pulse is None:
            return
        try:
            data = os.read(self._pulse.stdout.fileno(), 64 * pulse.ECHO.size)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        whole = len(data) - len(data) % pulse.ECHO.size
        if whole:
            self._renew_lease(max(pulse.ECHO.unpack_from(data, i)[0] for i in range(0, whole, pulse.ECHO.size)))

    def _stop_pulse(self) -> None:
        for proc in (self._pulse, self._pulse_spare):
            if proc is not None:
                self._end_pulse(proc)
        self._pulse = self._pulse_spare = None

    @staticmethod
    def _end_pulse(proc: subprocess.Popen) -> None:
        try:
            proc.stdin.close()  # type: ignore[union-attr]  # its cue to end
        except OSError:
            pass  # it is gone already
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2)
        proc.stdout.close()  # type: ignore[union-attr]

    def _lease_over(self) -> bool:
        """Has more than the lease passed since the last round trip we can prove?"""
        return clock.now() - self._lease_from > self._limits.lease

    def _check_lease(self) -> bool:
        """Has the lease run out?  The first time, stop every agent that will be replaced."""
        if self._pulse is not None:
            self._pulse_echoes()
        now = clock.now()
        if self._vouch.asked_at:  # (the launch path runs this every turn: one attribute unless asking)
            vouched = self._vouch.vouched(now, self._limits, self._session)
            if vouched is not None:
                self._renew_lease(vouched)  # the coordinator's loop is stalled: see coordinator_vouch.py
        elapsed = now - self._lease_from
        if elapsed <= self._limits.lease:
            if elapsed > self._limits.interval:  # the loop's echoes may be late: ask its pulse (if due)
                self._vouch.ask(now, self._lease_from, self._limits)
            return False
        if not self._lease_expired:
            self._lease_expired = True
            lease_end = self._lease_from + self._limits.lease
            self._watch_what_thread_agents_leave(lease_end)
            stopped = self._supervisor.stop_all(keep=True, lease_end=lease_end)
            if stopped:
                log.warning("lease ran out (no word from coordinator %s for %.1f s): stopping %d agent(s) that "
                            "will be replaced elsewhere; agents with on_disconnect='keep' keep running",
                            self.coordinator, clock.now() - self._lease_from, stopped)
        return True

    # ------------------------------------------------------------------ serving

    def _queue_event(self, name: str, run: str, epoch: int, event: str, fields: dict[str, Any]) -> None:
        if event == "AGENT_ERROR":  # the only report with text of the agent's making
            fields = bounded(fields)
        self._outbox.put((name, run, epoch, event, fields))

    def _beat(self, leaving: bool = False) -> None:
        running = self._supervisor.count() + self._deferred_starts
        # read: frames sent to us after it (starts on their way) explain a difference
        fields: dict[str, Any] = {"leaving": True} if leaving else {}
        if self.dropped.counts:  # (all so far, every time: a lost heartbeat loses nothing)
            fields["dropped"] = dict(self.dropped.counts)
        # reports held back for room (flow.py), or put by an agent that ended since the loop last
        # flushed (its thread queues its end before it counts as ended, so one left out of
        # ``running`` above is in the outbox by now): our count may be ahead of them.  Unsaid, the
        # coordinator counts such a copy still running, and after three such heartbeats in a row
        # asks for a registration, whose error texts are cut to fit one frame: 100 agents failing
        # at once over a narrow link beside 8 CPU burners had about half their errors cut in 3 of
        # 68 runs (tests/test_narrow_links.py)
        if self._pending or len(self._outbox):
            fields["waiting"] = True
        # not numbered: it goes at once, never behind reports waiting for room; ``sent`` says how
        # far the frames before it go (the coordinator reads them first: if not, some were lost)
        now = clock.now()
        # (how old our lease is: the coordinator's echoes wait behind what it sends us, and
        # late, it sends us less at a time; flow.py)
        self._send_plain(protocol.encode("heartbeat", t=now, running=running, read=self._recv_n,
                                         sent=self._sent_n, lease_age=max(0.0, now - self._lease_from), **fields))
        self._unsaid = 0

    def _send(self, frame: bytes) -> None:
        """Send a numbered frame (counted against the connection's credit: flow.py)."""
        self._window.count(self._sent_n, len(frame))
        self._send_plain(frame)

    def _send_plain(self, frame: bytes) -> None:
        assert self._dealer is not None
        try:
            self._dealer.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped.drop("send_queue_full", "control socket full")

    def _serve(self) -> None:
        """Loop while registered; return when the coordinator is gone (to register again).

        Each turn is bounded: it reads at most READ_SLICE control frames (a heartbeat reply renews
        the lease as it is read; everything else waits in order), acts on them for at most
        WORK_SLICE seconds and sends bus batches for at most BUS_SLICE, then heartbeats when due.
        A burst of thousands of starts or log lines therefore never silences the worker."""
        assert self._dealer is not None
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._outbox.wake_socket, zmq.POLLIN)
        poller.register(self._bus_signal.wake_socket, zmq.POLLIN)
        next_beat = clock.now()
        while not self._shutdown.is_set():
            now = clock.now()
            # the lease first: a worker resumed after SIGSTOP must not vouch for agents the
            # coordinator may have restarted elsewhere meanwhile; it registers again instead.  But
            # judged on what has come: an echo that arrived while we were stalled renews it
            if now - self._lease_from > self._limits.lease and not self._lease_expired:
                if self._read_arrived() == "reconnect":
                    return
            if self._check_lease():
                log.warning("coordinator %s silent for %.1f s: registering again", self.coordinator,
                            now - self._lease_from)
                return
            if now >= next_beat:
                self._flush_events()  # what happened goes before the count that reflects it
                self._beat()
                # with few agents CPython's default hands the GIL back to this loop soonest; with
                # thousands of threads it would feed the herd that starves it (crowd.py)
                interval = crowd.switch_interval(threading.active_count(), self._limits.silence)
                if sys.getswitchinterval() != interval:
                    sys.setswitchinterval(interval)
                self._publish_agent_heartbeats()
                self._maybe_pulse()
                self._supervisor.renew_lease(self._lease_from + self._limits.lease)
                if self._left_threads:  # registered again before they were due (see _end_left_threads)
                    self._end_left_threads()
                next_beat = now + self._limits.interval
            busy = bool(self._deferred) or bool(len(self._bus_outbox) and self._bus_ready())
            timeout_ms = 0 if busy else min(POLL_CAP_MS, sockets.wait_ms(next_beat - now))
            ready = dict(poller.poll(timeout_ms))
            if self._dealer in ready and self._read_control() == "reconnect":
                return
            # the upkeep below looks before it calls: most turns have none of it to do, and the
            # calls were a third of the lines this loop ran per launch in S2 (three turns a launch)
            if self._deferred and self._act_on_deferred() == "reconnect":
                return
            if self._outbox.wake_socket in ready or (self._pending and self._window.room()):
                self._flush_events()  # (reports that waited for room go once the coordinator read)
            if self._bus_signal.wake_socket in ready:
                self._bus_signal.drain()
            if len(self._bus_outbox):
                self._send_bus()
            ended = self._supervisor.upkeep()
            if ended:
                self._gc.ended(ended)
            running = self._supervisor.size()
            if self._gc.frozen or running >= crowd.MANY_AGENTS:
                # (not frozen and fewer: nothing to decide, FreezePolicy.decide says NOTHING)
                crowd.apply(self._gc.decide(running))
            if now >= self._next_parent_check:  # a system call: once a poll cap, not every turn
                self._next_parent_check = now + POLL_CAP_MS / 1000
                self._check_parent()

    def _read_arrived(self) -> str | None:
        """Read what came for us, waiting up to ARRIVED_WAIT for it, until an echo renews the lease.

        After a stall (SIGSTOP, a starved CPU) the loop found its lease past the window before its
        poll had seen the echoes that arrived meanwhile: libzmq's I/O thread, stalled too, had not
        yet moved them from the kernel's buffer.  A worker stopped 0.8 s of every second, with a 2 s
        window and no agent, registered again within 6 s, every time.  An echo read late renews the
        lease safely: it counts from our own stamp (_renew_lease).  The wait is at most ARRIVED_WAIT
        and only once the lease looks expired; agents told to stop keep their deadline, counted
        from the lease's end (Supervisor.stop_all)."""
        assert self._dealer is not None
        start = clock.now()
        lease_from = self._lease_from
        while self._lease_from == lease_from:
            left = ARRIVED_WAIT - (clock.now() - start)
            if left <= 0 or not self._dealer.poll(max(1, int(left * 1000))):
                return None
            if self._read_control() == "reconnect":
                return "reconnect"
        return None

    def _read_control(self) -> str | None:
        """Read up to READ_SLICE frames: check their numbering, renew the lease from heartbeat
        replies at once, and queue the rest in order."""
        assert self._dealer is not None
        dealer = self._dealer
        try:
            for i in range(READ_SLICE):
                if i == 1 and not sockets.readable(dealer):  # see sockets.readable
                    return None
                try:
                    frame = dealer.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return None
                self._unsaid += len(frame)
                if self._guarded(self._receive, frame) == "reconnect":
                    return "reconnect"
            return None
        finally:
            if self._unsaid >= flow.SAY_READ_EVERY and self._dealer is not None:
                # what we read makes room for what the coordinator holds for us (flow.py): said
                # now, not at the next heartbeat, or a burst would cross at a credit per heartbeat
                self._send_plain(protocol.encode("read", read=self._recv_n))
                self._unsaid = 0

    def _guarded(self, handler: Any, arg: Any) -> str | None:
        try:
            return handler(arg)
        except Exception as exc:  # never let one strange message end the worker
            self.dropped.drop("handler_error", f"{type(exc).__name__}: {exc}")
            log.debug("handler error", exc_info=True)
            return None

    def _receive(self, frame: bytes) -> str | None:
        try:
            message = protocol.decode(frame)
        except protocol.ProtocolError as exc:
            self.dropped.drop("bad_frame", exc)
            return None
        self._last_heard = clock.now()
        n = message["n"]
        if _from_another_coordinator(message, self._read_session):
            self._recv_n = n - 1  # a new coordinator on the same connection numbers from 1
        if n:
            if n != self._recv_n + 1:
                # the transport lost frames (a reset connection): a start or a stop may be among
                # them; registering on a new connection sets everything right
                log.warning("frames %d..%d from the coordinator were lost: registering again", self._recv_n + 1, n - 1)
                return "reconnect"
            self._recv_n = n
        kind = message["type"]
        if kind == "part":
            message = self._whole(message)
            if message is None:
                return None
            kind = message["type"]
        if kind == "heartbeat_reply":
            self._renew_lease(message["echo"])  # liveness never waits behind a burst of starts
            self._window.echoed(clock.now() - message["echo"], self._limits.interval)  # (flow.py)
            # (room for reports that wait: _serve sends them)
            self._window.read(message["read"], clock.now(), bool(self._pending))
            unread = self._unread
            while unread and unread[0][0] <= message["read"]:
                unread.popleft()
            if message["sent"] > self._recv_n:
                # frames sent before it never came (a reset connection), and none after them shows
                # the gap while they use up the credit (flow.py): registering again sets it right
                log.warning("frames %d..%d from the coordinator were lost: registering again", self._recv_n + 1,
                            message["sent"])
                return "reconnect"
            return None
        if kind == "welcome":
            self._read_session = message["session"]
        elif kind == "starts":
            self._deferred_starts += len(message["agents"])
            if trace.enabled:
                for item in message["agents"]:
                    trace.mark("received", item["agent"])
        self._deferred.append(message)
        return None

    def _whole(self, part: dict[str, Any]) -> dict[str, Any] | None:
        """One more part of a big frame (flow.py): the message once it is whole (it takes the last
        part's number), else None."""
        try:
            whole = self._parts.add(part["data"], part["last"], protocol.DEFAULT_MAX_MESSAGE_SIZE)
            if whole is None:
                return None
            message = protocol.decode(whole)
        except (ValueError, protocol.ProtocolError) as exc:
            self.dropped.drop("bad_frame", exc)
            return None
        message["n"] = part["n"]
        return message

    def _act_on_deferred(self) -> str | None:
        """Act on queued control messages, in order, for at most WORK_SLICE seconds."""
        deadline = clock.now() + WORK_SLICE
        while self._deferred:
            message = self._deferred.popleft()
            if message["type"] == "starts":
                self._deferred_starts -= len(message["agents"])
            if self._guarded(self._handle, message) == "reconnect":
                self._drop_deferred()  # what the coordinator sent before it let us go is moot
                return "reconnect"
            if clock.now() >= deadline:
                break
        return None

    def _drop_deferred(self) -> None:
        self._deferred.clear()
        self._deferred_starts = 0

    def _handle(self, message: dict[str, Any]) -> str | None:
        kind = message["type"]
        if kind == "starts":
            for item in message["agents"]:
                self._start(item)
        elif kind == "stop":
            self._supervisor.stop(message["agent"], message["run"], message["epoch"], float(message["timeout"]))
        elif kind == "deliver":
            dropped = self._supervisor.deliver(message["agent"], message["run"], message["epoch"], message["kind"],
                                               message["payload"])
            if dropped is not None:
                self.dropped.drop(dropped, message["agent"])
        elif kind == "reregister":
            self._send(self._register_message())
            # on this same connection it arrives before anything sent after it: delivered
            del self._pending[:self._in_register]
            self._in_register = 0
        elif kind == "welcome":
            self._on_welcome(message)
        elif kind == "release":
            if message["drain"]:
                self._drained_by = (self._drained_by + [self._session])[-16:]
                log.info("drained by coordinator %s; waiting for the next coordinator", self._session)
            else:
                self._left_by = ("", "")  # it ended cleanly (drained, we cannot know how it ends)
                log.info("coordinator %s finished; stopping its agents and waiting for the next one", self._session)
            self._supervisor.stop_all()
            self._welcomed_conn = 0  # (let go: this connection is not kept while we register again)
            return "reconnect"
        elif kind == "refused":
            (log.info if message["retry"] else log.error)("coordinator refused this worker: %s", message["reason"])
            self._welcomed_conn = 0
            return "reconnect"
        else:
            self.dropped.drop("unexpected", kind)
        return None

    def _start(self, item: dict[str, Any]) -> None:
        # the clock, not only the flag: the loop looks at its lease at the top of a turn, and a
        # turn starved of the GIL or the CPU after that look (thousands of agent threads, a
        # stopped process) can read this start long after the lease ran out, when the coordinator
        # may have started the agent elsewhere (one clock read per start)
        if self._lease_expired or self._lease_over():
            # the coordinator sent this before it could know we lost touch; it will learn from
            # our registration that the agent never started
            self.dropped.drop("start_after_lease", item["agent"])
            return
        if self.capacity and self._supervisor.count() >= self.capacity:
            log.warning("starting %s beyond capacity %d (the coordinator decides placement)",
                        item["agent"], self.capacity)
        self._gc.started()
        try:
            self._supervisor.start(item["agent"], item["run"], item["epoch"], item["class_id"], item["class_blob"],
                                   item["config"], item["mode"], float(item["stop_timeout"]), item["hold"],
                                   item["keep"], self._coordinator_name, item["definition"])
        except Exception as exc:  # one start that fails oddly spoils none of the others in its frame
            self.dropped.drop("handler_error", f"{type(exc).__name__}: {exc}")
            log.debug("start failed", exc_info=True)

    def _bus_ready(self) -> bool:
        if self._pub is None:
            return False
        while self._pub.poll(0):
            frame = self._pub.recv()
            if frame[:1] == b"\x01":
                self._subscribed = True
            elif frame[:1] == b"\x00":
                self._subscribed = False
        return self._subscribed

    def _send_bus_frame(self, frames: list[bytes], lost: int) -> None:
        assert self._pub is not None
        try:
            self._pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # the coordinator sees the gaps (in our frame numbers and in each run's seqs)
            self.dropped.drop("bus_full", f"{lost} event(s)")

    def _send_bus(self) -> None:
        """Send agents' waiting bus events in batches, for at most BUS_SLICE seconds."""
        if not len(self._bus_outbox) or not self._bus_ready():
            return
        deadline = clock.now() + BUS_SLICE
        sent = self._bus_sent
        while len(self._bus_outbox) and clock.now() < deadline:
            batch = self._bus_outbox.take()
            for item in batch:
                key = (item[0], item[1])
                if key in sent:  # only runs still beating: a late event adds no entry
                    sent[key] = item[3]
            if any(len(item[4]) > self._bus_event_max for item in batch):
                batch = self._too_large_dropped(batch)  # counted "sent" above: beats show the gap
                if not batch:
                    continue
            self._bus_seq += 1
            self._send_bus_frame(protocol.encode_batch(self.name, self._token, self._bus_seq, batch), len(batch))

    def _too_large_dropped(self, batch: list[Any]) -> list[Any]:
        """``batch`` without its events over the coordinator's limit, each dropped and counted
        here and, as a gap in its run's numbers, by the coordinator (EVENTS_LOST)."""
        kept = []
        for item in batch:
            if len(item[4]) > self._bus_event_max:
                log.warning("%s: an event of %d bytes (seq %d) is over the coordinator's limit of %d per event "
                            "(a quarter of its max_message_size): dropped; publish a reference instead",
                            item[0], len(item[4]), item[3], self._bus_event_max)
                self.dropped.drop("bus_event_too_large", item[0])
            else:
                kept.append(item)
        return kept

    def _publish_agent_heartbeats(self) -> None:
        """One beats frame per interval for all running agents (not one event each), each with
        the last seq its run handed to the bus: after the events before it, on the same socket,
        so the coordinator can tell a lost tail."""
        if not self._bus_ready():
            return
        self._beat_round += 1
        # an agent's first heartbeat leaves at least one interval after its STARTED event, so the
        # bus (a different path from the control connection) cannot deliver it first
        self._send_bus()
        # the seqs are of events *sent* (before this frame, on this socket), not merely handed off
        beats = [[name, f"{run}.{epoch}", self._bus_sent.get((f"{self.name}/{name}", f"{run}.{epoch}"), 0)]
                 for (name, run, epoch), since in list(self._beating.items()) if since < self._beat_round - 1]
        for i in range(0, len(beats), _BEATS_PER_FRAME):
            self._bus_seq += 1
            self._send_bus_frame(protocol.encode_beats(self.name, self._token, self._bus_seq,
                                                       beats[i:i + _BEATS_PER_FRAME]), 0)

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent process %d is gone: shutting down", self.parent_pid)
            self._shutdown.set()

    # ------------------------------------------------------------------ shutdown

    def _shut_down(self) -> None:
        count = self._supervisor.count()
        log.info("worker %s shutting down: stopping %d agent(s)", self.name, count)
        # while its agents stop (up to their stop timeouts), the worker goes on beating, saying it
        # leaves: silent, it was declared lost (WORKER_LOST, its agents' ends taken for failures)
        # after one window, though it was only stopping them as asked; and the coordinator places
        # nothing new on it meanwhile. Replies are not read: nothing more is started here
        if self._dealer is None and self._old_dealer is not None:
            # between registrations: say we leave on the connection the coordinator knows
            self._dealer, self._sent_n, self._old_dealer = self._old_dealer, self._old_sent_n, None
        self._close_old_dealer()  # (one left beside a connection not yet welcomed)
        beating = self._dealer is not None
        if beating:
            self._flush_events(force=True)  # what ended on its own goes before the word that this worker leaves
            self._beat(leaving=True)
        next_beat = clock.now() + self._limits.interval
        self._supervisor.stop_all(leaving=True)
        # each copy has its own stop timeout (a thread past it is given up on, a process killed
        # 2 s after); the margin only bounds a process that will not die. A fixed 15 s cut off
        # agents that were given longer: this process ended under them, mid-stop
        deadline = clock.now() + self._supervisor.longest_stop_timeout() + SHUTDOWN_MARGIN
        while clock.now() < deadline and self._supervisor.count(include_stuck=False):
            self._supervisor.enforce_stop_timeouts()
            self._flush_events(force=True)  # (replies are not read: no room would ever be made)
            if self._pub is not None and len(self._bus_outbox) and self._bus_ready():
                self._send_bus()  # what they log as they stop, as it comes (it all waited till the end)
            if beating and clock.now() >= next_beat:
                next_beat = clock.now() + self._limits.interval
                self._beat(leaving=True)
            time.sleep(0.02)
        self._flush_events(force=True)
        stuck = self._supervisor.count()
        if self._dealer is not None:
            # "goodbye" says this process's agents are gone, and the coordinator replaces them at
            # once. A thread that ignored its stop runs on until this process ends (cli.entry:
            # os._exit, after this teardown), so then say "closing": the coordinator judges this
            # worker by its silence and replaces that agent only once the lease has certainly run
            # out, long after this process is gone. "exiting": kept agents too (they end with it,
            # and must not wait for a return that may never come)
            if stuck:
                log.warning("%d agent(s) did not stop: leaving without a goodbye, so that the coordinator "
                            "replaces them only after this worker's lease", stuck)
            try:
                self._dealer.send(self._frame("closing", exiting=True) if stuck else self._frame("goodbye"), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        if self._pub is not None:
            deadline = clock.now() + 1.0  # agents' last events, while the coordinator listens
            while len(self._bus_outbox) and self._bus_ready() and clock.now() < deadline:
                self._send_bus()
        self._drop_watch()  # its monitor socket too, or the context would never end
        for sock in (self._dealer, self._pub):
            if sock is not None:
                sock.close(linger=500)
        self._supervisor.close()
        self._stop_pulse()
        self._vouch.close()
        self._resolver.close()
        self._outbox.close()
        self._bus_signal.close()
        self._ctx.term()
        log.info("worker %s stopped", self.name)

    def _flush_events(self, force: bool = False) -> None:
        """Send what agents reported, in order, while this connection has room (flow.py; ``force``:
        all of it, as the worker leaves).  What waits stays in ``_pending``, in order: sent as the
        coordinator reads what went before, or with the next registration if this connection is
        replaced.  (Sent regardless, 100 failures with long tracebacks over 1 MB/s held our
        heartbeats 4 s: the lease ran out, and the reports still on the old connection were lost.)

        A frame ends at _EVENTS_PER_MESSAGE reports or once its error text reaches
        _ERROR_CHARS_PER_MESSAGE: many long tracebacks at once must not add up to a frame over the
        coordinator's max_message_size (which would cost the connection and the reports in it).
        Everything queued since the last flush otherwise goes in one frame: one send here and one
        receive at the coordinator, not three, for an agent that starts and finishes at once."""
        self._keep_reports(online=True)  # after what was kept while registering, in order
        window, pending = self._window, self._pending
        if not pending:
            return
        sent, total = 0, len(pending)
        while sent < total and (force or window.room()):
            end, chars = sent, 0
            # (and within the room left: a frame of long errors far past the credit held our
            # heartbeats behind it, 260 kB of them over a 1 MB/s link with 64 kB of credit)
            most = _ERROR_CHARS_PER_MESSAGE if force else min(_ERROR_CHARS_PER_MESSAGE, window.credit - window.in_flight)
            while end < total and end - sent < _EVENTS_PER_MESSAGE:
                item = pending[end]
                event = item["event"]
                if event == "AGENT_ERROR":
                    cost = _error_chars(item)
                    if end > sent and chars + cost > most:
                        break
                    chars += cost
                elif event == "AGENT_STARTED":
                    copy = (item["agent"], item["run"], item["epoch"])
                    self._beating[copy] = self._beat_round
                    self._bus_sent.setdefault((f"{self.name}/{copy[0]}", f"{copy[1]}.{copy[2]}"), 0)
                elif event == "AGENT_TERMINATED":
                    if item["fields"].get("folded") is not True:  # (else its STARTED never went out alone)
                        self._beating.pop((item["agent"], item["run"], item["epoch"]), None)
                        self._bus_sent.pop((f"{self.name}/{item['agent']}", f"{item['run']}.{item['epoch']}"), None)
                    self._recent_ends.append(item)
                end += 1
            self._send_events(pending[sent:end])
            sent = end
        if trace.enabled:
            trace.ends("flushed", pending[:sent])
        del pending[:sent]
        if not pending:
            self._errors_kept.clear()  # the next wait counts each copy's errors from 0 again
            self._bounded = 0
        elif len(pending) > self._bounded:
            self._bound_held_back()

    def _bound_held_back(self) -> None:
        """What waits for room is kept as what waits for a coordinator is: a copy's recoverable
        errors past the first _ERRORS_KEPT are dropped and counted (an agent failing every cycle
        behind a narrow link would fill this list, then a registration, without end)."""
        kept: dict[tuple[str, str, int], int] = {}
        bounded, dropped = _bound_errors(self._pending, kept)
        for agent in dropped:
            self.dropped.drop("recoverable_error_held_back", agent)
        self._pending[:] = bounded
        self._errors_kept = {copy: min(count, _ERRORS_KEPT) for copy, count in kept.items()}
        self._bounded = len(bounded)  # (looked at again only once more has come)

    def _send_events(self, batch: list[dict[str, Any]]) -> None:
        if self._dealer is not None:
            self._send(self._frame("agent_events", events=batch))
            self._unread.append((self._sent_n, batch))
