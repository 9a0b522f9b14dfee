"""The coordinator: one thread that owns every socket and all cluster state.

Sockets: a ROUTER for workers' control connections, an XSUB that workers publish into, and an
XPUB that subscribers read.  Lifecycle events arrive on the control connection (which never
drops silently); the coordinator applies them to its state and republishes them on the bus with
its own sequence numbers.  What workers publish directly is checked, gap-detected and forwarded.
Liveness is judged by control traffic: a worker silent for ``interval * liveness`` is lost.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import zmq

from . import protocol, sockets
from .drops import DropCounter
from .events import EventDispatcher, OrchestratorEvent, stamp
from .mailbox import Mailbox
from .scheduling import RUNNING, TERMINAL, AgentRecord, Scheduling, StateIndex
from .versions import compare, local_versions, table

log = logging.getLogger("pyorchestrate.coordinator")

_DRAIN_BATCH = 1000
_EVENTS = {e.value: e for e in OrchestratorEvent}

__all__ = ["AgentRecord", "Coordinator", "WorkerRecord", "WorkerWaitTimeout"]


@dataclass
class WorkerRecord:
    """What the coordinator knows of one worker."""

    name: str
    identity: bytes
    incarnation: str
    host: str
    pid: int
    labels: dict[str, str]
    capacity: int
    versions: dict[str, str]
    order: int
    last_seen: float
    alive: bool = True
    draining: bool = False
    last_beat_sent: float = 0.0
    fd: int = -1  #: the file descriptor its messages arrive on (for closed-connection detection)
    disconnected_at: float | None = None  #: when that connection closed, if it has
    agents: set[str] = field(default_factory=set)
    sent_classes: set[str] = field(default_factory=set)


class WorkerWaitTimeout(TimeoutError):
    """Too few workers joined within ``worker_wait_timeout``."""


class Coordinator(Scheduling):
    """The coordinator's sockets, state and loop thread (used by :class:`Orchestrator`)."""

    def __init__(self, name: str, config: Any, agents: dict[str, AgentRecord], dispatcher: EventDispatcher,
                 on_finished: Callable[[], None]) -> None:
        self.name = name
        self.config = config
        self.agents = agents
        self.states = StateIndex()
        self.dispatcher = dispatcher
        self.session = uuid.uuid4().hex
        self.workers: dict[str, WorkerRecord] = {}
        self.dropped = DropCounter(log)
        self.lost_events = 0
        self.class_blobs_sent = 0
        self.start_error: str | None = None
        self._by_identity: dict[bytes, str] = {}
        self._order = 0
        self._seq = 0
        self._bus_seqs: dict[tuple[str, str], int] = {}
        self._versions = local_versions()
        self._on_finished = on_finished
        self._finished = False
        self._stopping_deadline: float | None = None
        self._workers_ready = False
        self._wait_deadline = 0.0
        self._closing = False
        self._stop_requested = False
        self._joined = False
        self._dirty = True  # something changed that placement should look at
        self._awaited_bus: dict[tuple[str, str], int] = {}  # publisher -> last seq it announced
        self._bus_deadline: float | None = None
        self.on_agent_state: Callable[[str, str, str | None, int], None] | None = None
        self._history: collections.deque = collections.deque(maxlen=config.history_max_events)
        self.final_snapshot: dict[str, Any] | None = None
        self._last_bus_beat = 0.0
        self._fd_workers: dict[int, str] = {}
        self.monitor: zmq.Socket | None = None
        self.min_workers = 1
        self._thread: threading.Thread | None = None
        self.ctx = zmq.Context()
        self.mailbox = Mailbox(self.ctx)
        self.address = self.events_address = self.bus_address = ""

    # ================================================================== setup (caller's thread)

    def bind(self, address: str, events_address: str | None) -> None:
        """Bind the three sockets.  ``*``/``0`` ports are chosen by the OS."""
        cfg = self.config
        try:
            sockets.check_bind_allowed(address, insecure=cfg.insecure)
            port = sockets.parse_tcp(address)[1]
            if events_address is None:
                events_address = sockets.with_port(address, int(port) + 1) if port.isdigit() else address
            sockets.check_bind_allowed(events_address, insecure=cfg.insecure)
            ev_port = sockets.parse_tcp(events_address)[1]
            bus_in = sockets.with_port(address, int(ev_port) + 1) if ev_port.isdigit() else address
            size = cfg.max_message_size
            self.router = sockets.make_socket(self.ctx, zmq.ROUTER, max_message_size=size)
            self.xsub = sockets.make_socket(self.ctx, zmq.XSUB, max_message_size=size)
            self.xpub = sockets.make_socket(self.ctx, zmq.XPUB, max_message_size=4096)
            self.address = sockets.bind(self.router, address)
            self.events_address = sockets.bind(self.xpub, events_address)
            self.bus_address = sockets.bind(self.xsub, bus_in)
            # a worker whose process dies closes its connection: the monitor tells us at once
            self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        except Exception:
            self._close()  # nothing half-open is left behind
            raise
        self.xsub.send(b"\x01")  # hear everything workers publish

    def start(self) -> None:
        for record in self.agents.values():  # those registered before start
            self.states.add(record)
        self._wait_deadline = time.monotonic() + self.config.worker_wait_timeout
        self._thread = threading.Thread(target=self._run, name="pyorchestrate-coordinator", daemon=True)
        self._thread.start()

    def join_thread(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ================================================================== loop

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.router, self.xsub, self.xpub, self.mailbox.wake_socket, self.monitor):
            poller.register(sock, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        next_tick = time.monotonic()
        try:
            while not self._closing:
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = self._next_tick(now, interval)
                ready = dict(poller.poll(max(0, int((next_tick - now) * 1000))))
                if self.mailbox.wake_socket in ready:
                    for command, args, future in self.mailbox.drain():
                        self._run_command(command, args, future)
                if self.router in ready:
                    self._drain_control()
                if self.monitor in ready:
                    self._on_monitor()
                if self.xsub in ready:
                    self._drain(self.xsub, self._on_bus)
                if self.xpub in ready:
                    self._drain(self.xpub, self._on_subscription)
                self._place_pending()
                self._release_drained()
                self._check_finished()
        except Exception:
            log.exception("coordinator loop crashed; shutting down")
            self.start_error = "the coordinator loop crashed (see the log)"
            self._mark_finished()
        finally:
            self._close()

    def _run_command(self, command: str, args: tuple, future: Any) -> None:
        try:
            result = getattr(self, f"_cmd_{command}")(*args)
        except Exception as exc:
            if future is None:
                log.exception("command %s failed", command)
            else:
                future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)

    def _drain_control(self) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                fd = frames[-1].get(zmq.SRCFD)
            except zmq.ZMQError:  # libzmq has no source fd for some frames (empty ones)
                fd = -1
            self._handle(self._on_control, [f.bytes for f in frames], fd)

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

        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            worker = self.workers.get(self._fd_workers.pop(int(event["value"]), ""))
            if worker is not None and worker.alive and worker.fd == int(event["value"]):
                worker.disconnected_at = time.monotonic()

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(handler, frames)

    def _next_tick(self, now: float, interval: float) -> float:
        """When to look again: the regular beat, sooner while a closed connection waits out its
        grace, and no later than the moment the quietest worker's silence limit runs out (so a
        hung worker is declared lost on time, not up to a tick late)."""
        limit = interval * self.config.heartbeat_liveness
        alive = [w for w in self.workers.values() if w.alive]
        soonest = now + (0.05 if any(w.disconnected_at is not None for w in alive) else min(interval, 0.25))
        return min([soonest] + [w.last_seen + limit + 0.001 for w in alive])

    def _tick(self, now: float) -> None:
        limit = self.config.heartbeat_interval * self.config.heartbeat_liveness
        beat = protocol.encode("heartbeat")
        grace = self.config.heartbeat_interval + 0.2  # a live worker that reconnected speaks by then
        for worker in list(self.workers.values()):
            if not worker.alive:
                continue
            if worker.disconnected_at is not None and now - worker.disconnected_at > grace:
                self._worker_gone(worker, OrchestratorEvent.WORKER_LOST,
                                  f"worker {worker.name!r} was lost (its connection closed and it did not come back)")
                continue
            if now - worker.last_seen > limit:
                self._worker_gone(worker, OrchestratorEvent.WORKER_LOST,
                                  f"worker {worker.name!r} was lost (no heartbeat for {now - worker.last_seen:.1f} s)")
                continue
            if now - worker.last_beat_sent >= self.config.heartbeat_interval:
                worker.last_beat_sent = now
                self._send(worker, beat)
        self._publish_bus_heartbeat(now)
        if any(now >= r.restart_at for r in self.states.of("RESTARTING")):
            self._dirty = True
        if self._stopping_deadline is not None and now > self._stopping_deadline:
            for record in self.agents.values():
                if record.state != TERMINAL:
                    self._fail_run(record, f"agent {record.name!r} did not stop in time", final=True)
            self._stopping_deadline = None
        if not self._workers_ready and now > self._wait_deadline and self._pending():
            self._give_up_waiting()

    def _publish_bus_heartbeat(self, now: float) -> None:
        # lets subscribers confirm their subscription and notice a lost last event
        if now - self._last_bus_beat < self.config.heartbeat_interval:
            return
        self._last_bus_beat = now
        fields = {"event": "_HEARTBEAT", "seq": self._seq, "publisher": self.name,
                  "incarnation": self.session, **stamp()}
        self.xpub.send_multipart(protocol.encode_event("_HEARTBEAT", fields))

    # ================================================================== commands from the user thread

    def _cmd_close(self) -> None:
        self.final_snapshot = self._cmd_snapshot()
        release = protocol.encode("release")
        for worker in self.workers.values():
            if worker.alive:
                self._send(worker, release)
        self._publish(OrchestratorEvent.SHUTDOWN, self.name, {"coordinator": self.name})
        self._closing = True

    # ================================================================== control messages

    def _send(self, worker: WorkerRecord, frame: bytes) -> None:
        try:
            self.router.send_multipart([worker.identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # unreachable or full: heartbeats will tell whether the worker is really gone
            log.debug("could not send to worker %s: %s", worker.name, exc)

    def _on_control(self, frames: list[bytes], fd: int = -1) -> None:
        if len(frames) != 2:
            raise protocol.ProtocolError(f"control message with {len(frames)} frames")
        identity, frame = frames
        try:
            message = protocol.decode(frame, self.config.max_message_size)
        except protocol.ProtocolError:
            self._maybe_refuse_old_peer(identity, frame)
            raise
        kind = message["type"]
        if kind == "register":
            self._on_register(identity, message)
            self._note_fd(self.workers.get(message["name"]), identity, fd)
            return
        name = self._by_identity.get(identity)
        worker = self.workers.get(name) if name else None
        if worker is None or not worker.alive or worker.identity != identity:
            if kind in ("heartbeat", "agent_events"):
                # a worker we do not know (we restarted) or had given up on (it was frozen)
                self.router.send_multipart([identity, protocol.encode("reregister")], zmq.NOBLOCK)
                if kind == "agent_events" and worker is not None:
                    for item in protocol.agent_events(message):
                        self._on_stale_event(worker, item)
            elif kind != "goodbye":
                self.dropped.drop("unexpected", kind)
            return
        worker.last_seen = time.monotonic()
        self._note_fd(worker, identity, fd)
        if kind == "agent_events":
            for item in protocol.agent_events(message):
                self._handle(self._on_agent_event, worker, item)  # one bad item spoils no other
        elif kind == "goodbye":
            self._worker_gone(worker, OrchestratorEvent.WORKER_LEFT, f"worker {worker.name!r} shut down")
        elif kind != "heartbeat":
            self.dropped.drop("unexpected", kind)

    def _note_fd(self, worker: WorkerRecord | None, identity: bytes, fd: int) -> None:
        """Remember which connection a worker speaks on now; speaking means it is connected."""
        if worker is None or worker.identity != identity or fd < 0:
            return
        worker.disconnected_at = None
        if worker.fd != fd:
            self._fd_workers.pop(worker.fd, None)
            worker.fd = fd
            self._fd_workers[fd] = worker.name

    def _maybe_refuse_old_peer(self, identity: bytes, frame: bytes) -> None:
        try:
            version, kind = protocol.peek_version(frame)
        except protocol.ProtocolError:
            return
        if kind == "register" and version != protocol.PROTOCOL_VERSION:
            reason = (f"protocol version mismatch: coordinator speaks {protocol.PROTOCOL_VERSION}, worker speaks "
                      f"{version!r}. Install the same pyorchestrate version on both sides.")
            self.router.send_multipart([identity, protocol.encode("refused", reason=reason)], zmq.NOBLOCK)

    def _on_register(self, identity: bytes, message: dict[str, Any]) -> None:
        name = message["name"]
        errors, warnings = compare(self._versions, message["versions"])
        if errors:
            reason = ("incompatible versions (" + "; ".join(errors) + "):\n" + table(self._versions, message["versions"]))
            log.error("refused worker %s: %s", name, reason)
            self.router.send_multipart([identity, protocol.encode("refused", reason=reason)], zmq.NOBLOCK)
            return
        drained_by = message.get("drained_by")
        if isinstance(drained_by, list) and self.session in drained_by:
            # drained from this session: it waits for the next coordinator
            self.router.send_multipart([identity, protocol.encode("refused", reason="drained", retry=True)], zmq.NOBLOCK)
            return
        existing = self.workers.get(name)
        if existing is not None and existing.alive and existing.incarnation != message["incarnation"]:
            # maybe a restarted worker whose old self is not declared lost yet: let it retry
            reason = (f"a live worker named {name!r} is already registered (host {existing.host}, pid {existing.pid}); "
                      "give each worker a unique --name (retrying until the old one is gone)")
            log.warning("worker %s: %s", name, reason)
            self.router.send_multipart([identity, protocol.encode("refused", reason=reason, retry=True)], zmq.NOBLOCK)
            return
        rejoined = existing is not None
        if existing is not None:
            self._by_identity.pop(existing.identity, None)
        self._order += 1
        worker = WorkerRecord(
            name=name, identity=identity, incarnation=message["incarnation"], host=message["host"],
            pid=message["pid"], labels={str(k): str(v) for k, v in message["labels"].items()},
            capacity=message["capacity"], versions=message["versions"], order=self._order,
            last_seen=time.monotonic())
        same_process = existing is not None and existing.alive and existing.incarnation == worker.incarnation
        if same_process:
            # the same process on a new socket: what we sent the old one may never have arrived
            worker.agents, worker.order = existing.agents, existing.order
        self.workers[name] = worker
        self._by_identity[identity] = name
        bus_seq = message.get("bus_seq")
        if isinstance(bus_seq, int):
            self._bus_seqs[(name, worker.incarnation)] = bus_seq
        stop, reported = [], set()
        for item in message["agents"]:
            if not (isinstance(item, list) and len(item) == 2):
                continue
            agent_name, epoch = item
            record = self.agents.get(agent_name)
            if record is None or record.worker != name or record.epoch != epoch or record.state not in RUNNING:
                stop.append([agent_name, epoch])
            else:
                worker.agents.add(agent_name)
                reported.add(agent_name)
        self.router.send_multipart([identity, protocol.encode(
            "welcome", coordinator=self.name, session=self.session,
            heartbeat_interval=float(self.config.heartbeat_interval),
            heartbeat_liveness=int(self.config.heartbeat_liveness),
            bus_port=sockets.port_of(self.bus_address), stop=stop, warnings=warnings,
            events_port=sockets.port_of(self.events_address))], zmq.NOBLOCK)
        self._dirty = True
        if same_process:
            self._reconcile(worker, reported)
        if not (existing is not None and existing.alive):
            log.info("worker %s joined%s (host %s, pid %d, labels %s, capacity %s)", name,
                     " again" if rejoined else "", worker.host, worker.pid, worker.labels or "{}",
                     worker.capacity or "unlimited")
            self._publish(OrchestratorEvent.WORKER_JOINED, name, {
                "worker": name, "host": worker.host, "pid": worker.pid, "labels": worker.labels,
                "capacity": worker.capacity, "rejoined": rejoined})

    def _reconcile(self, worker: WorkerRecord, reported: set[str]) -> None:
        """A live worker re-registered: its list of running agents is the truth."""
        for agent_name in sorted(worker.agents - reported):
            record = self.agents[agent_name]
            worker.agents.discard(agent_name)
            if record.state == "ASSIGNED":
                self._assign(record, worker)  # the start message went to its old socket
            elif record.state in RUNNING:
                self._fail_run(record, f"worker {worker.name!r} no longer runs agent {agent_name!r} "
                                       "and its end was not reported")

    def _on_agent_event(self, worker: WorkerRecord, message: dict[str, Any]) -> None:
        record = self.agents.get(message["agent"])
        if record is None or record.worker != worker.name or record.epoch != message["epoch"] or record.state not in RUNNING:
            self._on_stale_event(worker, message)
            return
        try:
            event = OrchestratorEvent(message["event"])
        except ValueError:
            raise protocol.ProtocolError(f"unknown agent event {message['event']!r}") from None
        fields = {k: v for k, v in message["fields"].items() if isinstance(k, str)}
        if event is OrchestratorEvent.AGENT_TERMINATED:
            marker = [fields.pop(k, None) for k in ("bus_publisher", "bus_incarnation", "bus_seq")]
            if isinstance(marker[2], int) and marker[2] > self._bus_seqs.get((marker[0], marker[1]), 0):
                self._awaited_bus[(marker[0], marker[1])] = marker[2]
            ok = fields.pop("ok", True) is True and not record.run_errored
            record.run_errored = False
            self._run_over(record, ok, fields)
            return
        if event is OrchestratorEvent.AGENT_STARTED:
            record.state = "STARTED"
            record.run_errored = False
        elif event is OrchestratorEvent.AGENT_READY:
            record.state = "READY"
            self._dirty = True  # dependents may start now
        elif event is OrchestratorEvent.AGENT_ERROR:
            record.error = str(fields.get("error_message", ""))
            if fields.get("recoverable") is not True:  # a recoverable error does not fail the run
                record.run_errored = True
        else:
            raise protocol.ProtocolError(f"agent event {event.name} is not a lifecycle event")
        self._publish_agent(record, event, fields, worker)

    def _on_stale_event(self, worker: WorkerRecord, message: dict[str, Any]) -> None:
        # an agent copy we no longer consider running there: make sure it stops
        if message["event"] != "AGENT_TERMINATED" and worker.alive:
            self._send(worker, protocol.encode("stop", agent=message["agent"], epoch=message["epoch"], timeout=0.0))

    def _worker_gone(self, worker: WorkerRecord, event: OrchestratorEvent, reason: str) -> None:
        worker.alive = False
        (log.warning if event is OrchestratorEvent.WORKER_LOST else log.info)("%s", reason)
        self._publish(event, worker.name, {"worker": worker.name, "host": worker.host, "reason": reason,
                                           "agents": sorted(worker.agents)})
        for agent_name in sorted(worker.agents):
            record = self.agents.get(agent_name)
            if record is not None and record.state in RUNNING:
                self._fail_run(record, f"{reason}; agent {agent_name!r} was running there")
        worker.agents.clear()
        self._dirty = True

    # ================================================================== bus traffic from workers

    def _on_bus(self, frames: list[bytes]) -> None:
        size = self.config.max_message_size
        if frames and frames[0] == protocol.BATCH_TOPIC:
            publisher, incarnation, items = protocol.decode_batch(frames, size)
            for topic, seq, body in items:
                self._on_bus_event((publisher, incarnation), seq, topic, body, None)
        else:
            fields = protocol.decode_event(frames, size)
            self._on_bus_event((fields["publisher"], fields["incarnation"]), fields["seq"], frames[0].decode(),
                               frames[1], fields)

    def _on_bus_event(self, key: tuple[str, str], seq: int, topic: str, body: bytes,
                      fields: dict[str, Any] | None) -> None:
        """Check one event's place in its publisher's sequence and forward it.  Its body is only
        parsed here if something here reads it (a log line, a callback): subscribers check it."""
        last = self._bus_seqs.get(key)
        if last is not None and seq > last + 1:
            self._report_gap(key[0], seq - last - 1)
        if last is None or seq > last:
            self._bus_seqs[key] = seq
            if key in self._awaited_bus and seq >= self._awaited_bus[key]:
                del self._awaited_bus[key]
        self.xpub.send_multipart([topic.encode(), body])
        name = topic.partition(".")[0]
        if name != "AGENT_HEARTBEAT":
            self._history.append((topic, body))
        event = _EVENTS.get(name)
        if event is None or not (event is OrchestratorEvent.AGENT_LOG or self.dispatcher.wants(event)):
            return
        if fields is None:
            fields = protocol.decode_body(topic, body, self.config.max_message_size)
        if event is OrchestratorEvent.AGENT_LOG:
            self._reemit_log(fields)
        if self.dispatcher.wants(event):
            self.dispatcher.dispatch(event, fields)

    @staticmethod
    def _reemit_log(fields: dict[str, Any]) -> None:
        agent = str(fields.get("agent_name", "?"))
        level = fields.get("levelno")
        logging.getLogger(f"pyorchestrate.agent.{agent}").log(
            level if isinstance(level, int) else logging.INFO, "%s [%s@%s]", fields.get("message", ""),
            fields.get("worker", "?"), fields.get("host", "?"))

    def _report_gap(self, publisher: str, lost: int) -> None:
        self.lost_events += lost
        log.warning("%d event(s) from %s were lost on the bus (high-water mark reached?)", lost, publisher)
        self._publish(OrchestratorEvent.EVENTS_LOST, publisher, {"lost": lost, "source": publisher})

    def _on_subscription(self, frames: list[bytes]) -> None:
        frame = frames[0] if len(frames) == 1 else b""
        if frame[:1] not in (b"\x00", b"\x01"):
            raise protocol.ProtocolError("subscriber sent something other than a subscription")
        prefixes = protocol.parse_history_request(frame[1:]) if frame[:1] == b"\x01" else None
        if prefixes is not None:
            # answer on the subscriber's own unique topic: only it hears the reply
            items = [[t, b] for t, b in self._history if any(t.startswith(p) for p in prefixes)]
            self.xpub.send_multipart([frame[1:], msgpack.packb(items, use_bin_type=True)], zmq.NOBLOCK)

    # ================================================================== publishing

    def _publish(self, event: OrchestratorEvent, subject: str, fields: dict[str, Any]) -> dict[str, Any]:
        self._seq += 1
        fields = {"event": event.value, "seq": self._seq, "publisher": self.name, "incarnation": self.session,
                  **stamp(), **fields}
        topic = protocol.event_topic(event.value, subject)
        frames = protocol.encode_event(topic, fields)
        try:
            self.xpub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._history.append((topic, frames[1]))
        self.dispatcher.dispatch(event, fields)
        return fields

    def _publish_agent(self, record: AgentRecord, event: OrchestratorEvent, fields: dict[str, Any],
                       worker: WorkerRecord | None = None) -> None:
        worker = worker or self.workers.get(record.worker or "")
        base = {"agent_name": record.name, "worker": record.worker, "host": worker.host if worker else None,
                "epoch": record.epoch}
        published = self._publish(event, record.name, {**fields, **base})
        if self.on_agent_state is not None:
            self.on_agent_state(record.name, record.state, record.worker, record.epoch)
        where = f"on {record.worker}" if record.worker else "(not placed)"
        if event is OrchestratorEvent.AGENT_ERROR:
            log.error("agent %s %s: %s%s", record.name, where, published.get("error_message"),
                      ("\n" + published["traceback"].rstrip()) if published.get("traceback") else "")
        else:
            log.info("agent %s %s %s", record.name, event.value.removeprefix("AGENT_").lower(), where)

    # ================================================================== finishing

    def _give_up_waiting(self) -> None:
        alive = sum(w.alive for w in self.workers.values())
        self.start_error = (
            f"only {alive} of min_workers={self.min_workers} worker(s) joined within "
            f"worker_wait_timeout={self.config.worker_wait_timeout} s. Start workers with:\n"
            f"    pyorchestrate-worker --coordinator {sockets.connectable(self.address)}\n"
            "or lower min_workers / raise worker_wait_timeout.")
        log.error("%s", self.start_error)
        for record in self._pending():
            self._fail_run(record, "no worker to run it: " + self.start_error.splitlines()[0], final=True)

    def _pending(self) -> list[AgentRecord]:
        return self.states.of("PENDING")

    def _check_finished(self) -> None:
        if self._finished:
            return
        if self.states.count(TERMINAL) == len(self.agents):
            stopping = self._stopping_deadline is not None or self._stop_requested
            # STOP_ON_EMPTY ends in join(): agents registered between start() and join() all run
            batch_done = self.config.run_mode.name == "STOP_ON_EMPTY" and self._joined
            if batch_done or stopping:
                if self._awaited_bus:  # finished agents' last logs/events are still on their way
                    if self._bus_deadline is None:
                        self._bus_deadline = time.monotonic() + 2.0
                    if time.monotonic() < self._bus_deadline:
                        return
                    log.warning("gave up waiting for the last bus events of %d agent(s)", len(self._awaited_bus))
                if self.agents:
                    self._publish(OrchestratorEvent.ALL_AGENTS_TERMINATED, self.name, {"agents": len(self.agents)})
                self._mark_finished()

    def _cmd_join(self) -> None:
        self._joined = True

    def _cmd_request_stop(self) -> None:
        self._stop_requested = True

    def _mark_finished(self) -> None:
        self._finished = True
        self._stopping_deadline = None
        self._on_finished()

    def _close_sockets(self) -> None:
        for name in ("router", "xsub", "xpub"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=sockets.LINGER_MS)

    def _close(self) -> None:
        if self.monitor is not None:
            self.router.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self._close_sockets()
        self.mailbox.close()
        self.ctx.term()
