"""A worker node: registers with a coordinator, runs what it is sent, heartbeats, and comes back.

The main thread owns every socket.  It registers (retrying with backoff until a coordinator
answers), then loops: control messages in, agent events out, heartbeats on a timer.  If the
coordinator falls silent or says goodbye, the worker registers again, with it or its successor.
Agent code runs on other threads or in child processes, so it cannot block heartbeats (except by
holding the GIL in C code; see the README).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import tenacity
import zmq

from pyorchestrate import protocol, sockets
from pyorchestrate.drops import DropCounter
from pyorchestrate.events import stamp
from pyorchestrate.mailbox import Mailbox
from pyorchestrate.versions import local_versions

from .supervisor import Supervisor

log = logging.getLogger("pyorchestrate.worker")

REGISTER_TIMEOUT = 2.0
_EVENTS_PER_MESSAGE = 500  # keeps one message well under any max_message_size
POLL_CAP_MS = 100


class NoAnswer(Exception):
    """The coordinator did not answer a registration in time."""


class Refused(Exception):
    """The coordinator refused this worker; retrying will not help."""


class Worker:
    """One ``pyorchestrate-worker`` process."""

    def __init__(self, coordinator: str, name: str | None = None, labels: dict[str, str] | None = None,
                 capacity: int = 0, parent_pid: int | None = None, orphan_timeout: float = 60.0) -> None:
        sockets.parse_tcp(coordinator)
        self.coordinator = coordinator
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.labels = labels or {}
        self.capacity = capacity
        self.parent_pid = parent_pid
        self.orphan_timeout = orphan_timeout
        self._orphans_stopped = False
        self._drained_by: list[str] = []  # sessions that released us after a drain
        self._last_refusal = ""
        self.incarnation = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.dropped = DropCounter(log)
        self._ctx = zmq.Context()
        self._outbox = Mailbox(self._ctx)
        self._supervisor = Supervisor(self._queue_event, self.name)
        self._dealer: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._bus_address = ""
        self._bus_seq = 0
        self._subscribed = False
        self._beating: dict[tuple[str, int], int] = {}  # (agent, epoch) whose STARTED went out -> round
        self._beat_round = 0
        self._shutdown = threading.Event()
        self._session = ""
        self._interval = 1.0
        self._liveness = 5
        self._last_heard = 0.0

    # ------------------------------------------------------------------ public

    def request_shutdown(self) -> None:
        """Ask the worker to stop its agents and exit (safe from a signal handler)."""
        self._shutdown.set()

    def run(self) -> int:
        """Serve coordinators until shutdown; return the process exit code."""
        log.info("worker %s (pid %d) serving coordinator %s", self.name, os.getpid(), self.coordinator)
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

    def _new_dealer(self) -> zmq.Socket:
        if self._dealer is not None:
            self._dealer.close(linger=200)
        dealer = sockets.make_socket(self._ctx, zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, f"{self.name}/{uuid.uuid4().hex[:8]}".encode())
        dealer.connect(self.coordinator)
        self._dealer = dealer
        return dealer

    def _register_message(self) -> bytes:
        return protocol.encode(
            "register", name=self.name, incarnation=self.incarnation, host=self.host, pid=os.getpid(),
            labels=self.labels, capacity=self.capacity, versions=local_versions(),
            agents=[[n, e] for n, e in self._supervisor.running()], bus_seq=self._bus_seq,
            drained_by=self._drained_by)

    def _register_with_retries(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(NoAnswer),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.5),
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
        level = logging.INFO if state.attempt_number in (1, 5) or state.attempt_number % 20 == 0 else logging.DEBUG
        log.log(level, "no coordinator at %s yet (attempt %d); retrying", self.coordinator, state.attempt_number)

    def _sleep_interruptibly(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._shutdown.is_set() and time.monotonic() < deadline:
            self._pump_outbox_offline()
            self._shutdown.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    def _pump_outbox_offline(self) -> None:
        # while no coordinator listens, keep agents' events flowing out of the mailbox, and keep
        # enforcing stop timeouts; events are dropped (the next coordinator asks what runs)
        for _ in self._outbox.drain():
            pass
        if (self.orphan_timeout and not self._orphans_stopped and self._supervisor.count()
                and time.monotonic() - self._last_heard > self.orphan_timeout):
            self._orphans_stopped = True
            log.warning("no coordinator for %.0f s (orphan timeout): stopping %d agent(s)",
                        self.orphan_timeout, self._supervisor.count())
            self._supervisor.stop_all()
        self._supervisor.enforce_stop_timeouts()
        self._supervisor.forget_finished()
        self._check_parent()

    def _register_once(self) -> None:
        dealer = self._new_dealer()
        dealer.send(self._register_message())
        deadline = time.monotonic() + REGISTER_TIMEOUT
        while time.monotonic() < deadline and not self._shutdown.is_set():
            if dealer.poll(50):
                frame = dealer.recv()
                try:
                    message = protocol.decode(frame)
                except protocol.ProtocolError as exc:
                    self.dropped.drop("bad_frame", exc)
                    continue
                if message["type"] == "welcome":
                    self._on_welcome(message)
                    return
                if message["type"] == "refused":
                    if message.get("retry") is True:
                        # temporary: drained from this coordinator, or our old self not yet declared lost
                        if message["reason"] != self._last_refusal:
                            self._last_refusal = message["reason"]
                            log.log(logging.DEBUG if message["reason"] == "drained" else logging.WARNING,
                                    "coordinator %s: %s", self.coordinator, message["reason"])
                        break
                    raise Refused(f"coordinator {self.coordinator} refused worker {self.name}:\n{message['reason']}")
            self._pump_outbox_offline()
        # close now, not at the next attempt: a socket left open through the back-off sleep would
        # deliver this register when the coordinator appears, and its welcome would be lost
        dealer.close(0)
        self._dealer = None
        raise NoAnswer()

    def _on_welcome(self, message: dict[str, Any]) -> None:
        self._session = message["session"]
        self._interval = float(message["heartbeat_interval"])
        self._liveness = int(message["heartbeat_liveness"])
        self._last_heard = time.monotonic()
        self._orphans_stopped = False
        self._last_refusal = ""
        for warning in message["warnings"]:
            log.warning("version difference with the coordinator: %s", warning)
        events_port = message.get("events_port")
        self._supervisor.events_address = (sockets.with_port(self.coordinator, events_port)
                                           if isinstance(events_port, int) else None)
        bus = sockets.with_port(self.coordinator, int(message["bus_port"]))
        self._supervisor.bus_address = bus
        if bus != self._bus_address:
            if self._pub is not None:
                self._pub.close(0)
            # an XPUB rather than a PUB: it tells us when the coordinator's subscription has
            # arrived, so nothing is published into the void (and counted as lost) at connect
            self._pub = sockets.make_socket(self._ctx, zmq.XPUB)
            self._pub.connect(bus)
            self._subscribed = False
            self._bus_address = bus
        for name, epoch in message["stop"]:
            log.info("coordinator says agent %s (epoch %s) is not ours to run any more: stopping it", name, epoch)
            self._beating.pop((str(name), int(epoch)), None)
            self._supervisor.stop(str(name), int(epoch), 0.0)
        log.info("registered with coordinator %s at %s (heartbeat %.2fs x %d)",
                 message["coordinator"], self.coordinator, self._interval, self._liveness)

    # ------------------------------------------------------------------ serving

    def _queue_event(self, name: str, epoch: int, event: str, fields: dict[str, Any]) -> None:
        self._outbox.put((name, epoch, event, fields))

    def _send(self, frame: bytes) -> None:
        assert self._dealer is not None
        try:
            self._dealer.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped.drop("send_queue_full", "control socket full")

    def _serve(self) -> None:
        """Loop while registered; return when the coordinator is gone (to register again)."""
        assert self._dealer is not None
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._outbox.wake_socket, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._shutdown.is_set():
            now = time.monotonic()
            # silence first: a worker resumed after SIGSTOP must not vouch for agents the
            # coordinator may have restarted elsewhere meanwhile; it registers again instead
            if now - self._last_heard > self._interval * self._liveness:
                log.warning("coordinator %s silent for %.1f s: registering again", self.coordinator,
                            now - self._last_heard)
                return
            if now >= next_beat:
                self._send(protocol.encode("heartbeat"))
                self._publish_agent_heartbeats()
                next_beat = now + self._interval
            timeout_ms = max(0, min(POLL_CAP_MS, int((next_beat - now) * 1000)))
            ready = dict(poller.poll(timeout_ms))
            if self._outbox.wake_socket in ready:
                self._flush_events()
            if self._dealer in ready:
                while self._dealer.poll(0):
                    try:
                        outcome = self._handle(self._dealer.recv())
                    except Exception as exc:  # never let one strange message end the worker
                        self.dropped.drop("handler_error", f"{type(exc).__name__}: {exc}")
                        log.debug("handler error", exc_info=True)
                        continue
                    if outcome == "reconnect":
                        return
            self._supervisor.enforce_stop_timeouts()
            self._supervisor.forget_finished()
            self._check_parent()

    def _handle(self, frame: bytes) -> str | None:
        try:
            message = protocol.decode(frame)
        except protocol.ProtocolError as exc:
            self.dropped.drop("bad_frame", exc)
            return None
        self._last_heard = time.monotonic()
        kind = message["type"]
        if kind == "heartbeat":
            return None
        if kind == "start":
            if self.capacity and self._supervisor.count() >= self.capacity:
                log.warning("starting %s beyond capacity %d (the coordinator decides placement)",
                            message["agent"], self.capacity)
            stop_timeout = message.get("stop_timeout")
            self._supervisor.start(message["agent"], message["epoch"], message["class_id"],
                                   message["class_blob"], message["config"], message["mode"],
                                   float(stop_timeout) if isinstance(stop_timeout, (int, float)) else 10.0,
                                   message.get("hold") is True)
        elif kind == "stop":
            self._supervisor.stop(message["agent"], message["epoch"], float(message["timeout"]))
        elif kind == "deliver":
            if not self._supervisor.deliver(message["agent"], message["epoch"], message["kind"], message["payload"]):
                self.dropped.drop("deliver_to_unknown_agent", message["agent"])
        elif kind == "reregister":
            self._dealer.send(self._register_message())  # type: ignore[union-attr]
        elif kind == "welcome":
            self._on_welcome(message)
        elif kind == "release":
            if message.get("drain") is True:
                self._drained_by = (self._drained_by + [self._session])[-16:]
                log.info("drained by coordinator %s; waiting for the next coordinator", self._session)
            else:
                log.info("coordinator %s finished; stopping its agents and waiting for the next one", self._session)
            self._supervisor.stop_all()
            return "reconnect"
        elif kind == "refused":
            log.error("coordinator refused this worker: %s", message["reason"])
            return "reconnect"
        else:
            self.dropped.drop("unexpected", kind)
        return None

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

    def _publish_agent_heartbeats(self) -> None:
        if not self._bus_ready():
            return
        assert self._pub is not None
        base = {"publisher": self.name, "incarnation": self.incarnation, "worker": self.name,
                "host": self.host, **stamp()}
        self._beat_round += 1
        # an agent's first heartbeat leaves at least one interval after its STARTED event, so the
        # bus (a different path from the control connection) cannot deliver it first
        for (name, _epoch), since in list(self._beating.items()):
            if since >= self._beat_round - 1:
                continue
            self._bus_seq += 1
            fields = {"event": "AGENT_HEARTBEAT", "agent_name": name, "seq": self._bus_seq, **base}
            try:
                self._pub.send_multipart(protocol.encode_event(
                    protocol.event_topic("AGENT_HEARTBEAT", name), fields), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the gap in seq tells the coordinator

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent process %d is gone: shutting down", self.parent_pid)
            self._shutdown.set()

    # ------------------------------------------------------------------ shutdown

    def _shut_down(self) -> None:
        count = self._supervisor.count()
        if count:
            log.info("stopping %d agent(s)", count)
        self._supervisor.stop_all()
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and self._supervisor.count(include_stuck=False):
            self._supervisor.enforce_stop_timeouts()
            self._flush_events()
            time.sleep(0.02)
        self._flush_events()
        if self._dealer is not None:
            try:
                self._dealer.send(protocol.encode("goodbye"), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for sock in (self._dealer, self._pub):
            if sock is not None:
                sock.close(linger=500)
        self._outbox.close()
        self._ctx.term()
        log.info("worker %s stopped", self.name)

    def _flush_events(self) -> None:
        # everything queued since the last flush goes in one message: one send here and one
        # receive at the coordinator, not three, for an agent that starts and finishes at once
        batch = []
        for name, epoch, event, fields in self._outbox.drain():
            if event == "AGENT_TERMINATED":
                self._beating.pop((name, epoch), None)
            batch.append(protocol.agent_event(name, epoch, event, fields))
            if event == "AGENT_STARTED":
                self._beating[(name, epoch)] = self._beat_round
            if len(batch) == _EVENTS_PER_MESSAGE:
                self._send_events(batch)
                batch = []
        if batch:
            self._send_events(batch)

    def _send_events(self, batch: list[dict[str, Any]]) -> None:
        if self._dealer is not None:
            self._send(protocol.encode("agent_events", events=batch))
