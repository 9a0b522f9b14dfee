"""Runs the agents assigned to this worker and reports what happens to them.

Thread agents run in this process.  Process agents run in children started by a forkserver (never
a fork of this threaded process); a watcher thread per child relays its events and reports its
death the moment it exits, without waiting for heartbeats.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from pyorchestrate import publisher, shipping
from pyorchestrate.agents.base import AGENT_LOGGERS
from pyorchestrate.events import stamp

from . import child

log = logging.getLogger("pyorchestrate.worker.supervisor")

# agent name, epoch, event name, fields
Report = Callable[[str, int, str, dict], None]

_CLASS_CACHE_SIZE = 256


def _stderr_level() -> int:
    """The level this worker prints at (its handlers' level), for its children to copy."""
    levels = [h.level for h in logging.getLogger().handlers if h.level]
    return min(levels) if levels else logging.INFO


def _error_fields(exc: BaseException, hint: str = "") -> dict[str, Any]:
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError):
        message += (f"{hint} - module {exc.name!r} is not installed on this worker: install it there, or "
                    "keep it next to the coordinator script so it is shipped with the agent")
    return {"error_message": message,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def _forget_logger(logger: logging.Logger) -> None:
    """Drop a finished agent's logger from the logging registry, which otherwise keeps one per
    agent name the worker ever ran (agents with unique names would grow it without bound)."""
    registry = logging.Logger.manager.loggerDict
    if registry.get(logger.name) is logger and not logger.handlers:
        registry.pop(logger.name, None)


@dataclass
class Running:
    name: str
    epoch: int
    mode: str
    agent: Any = None  # thread agents
    process: Any = None  # process agents
    conn: Any = None
    terminated: bool = False
    stop_requested_at: float | None = None
    stop_timeout: float = 10.0
    forced: bool = False  #: it ignored a stop past its timeout
    thread: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Starts, stops and watches agents; every lifecycle event goes to ``report``."""

    def __init__(self, report: Report, worker_name: str) -> None:
        self._report = report
        self._worker_name = worker_name
        self._lock = threading.Lock()
        self._agents: dict[str, Running] = {}
        self._blobs: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._classes: dict[str, tuple[type, type]] = {}
        self.events_address: str | None = None
        self.bus_address: str | None = None
        self.host = socket.gethostname()
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(["pyorchestrate_worker.child"])
        if AGENT_LOGGERS.level == logging.NOTSET:
            AGENT_LOGGERS.setLevel(logging.INFO)  # agents' INFO records reach the bus

    # ------------------------------------------------------------------ queries

    def running(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(r.name, r.epoch) for r in self._agents.values() if not r.terminated]

    def count(self, include_stuck: bool = True) -> int:
        """Agents still running; ``include_stuck=False`` leaves out threads that ignored a stop
        past their timeout (they cannot be killed, so nobody should wait for them)."""
        with self._lock:
            return sum(not r.terminated and (include_stuck or not (r.forced and r.mode == "thread"))
                       for r in self._agents.values())

    # ------------------------------------------------------------------ start

    def _emit(self, name: str, epoch: int, event: str, fields: dict[str, Any]) -> None:
        fields.update(stamp())
        self._report(name, epoch, event, fields)

    def _fail_before_start(self, name: str, epoch: int, exc: BaseException, hint: str = "") -> None:
        self._emit(name, epoch, "AGENT_STARTED", {})
        self._emit(name, epoch, "AGENT_ERROR", _error_fields(exc, hint))
        self._emit(name, epoch, "AGENT_TERMINATED", {"ok": False})

    def start(self, name: str, epoch: int, class_id: str, class_blob: bytes | None,
              config_blob: bytes, mode: str, stop_timeout: float = 10.0, hold: bool = False) -> None:
        if class_blob is not None:
            self._blobs[class_id] = class_blob
            self._blobs.move_to_end(class_id)
            while len(self._blobs) > _CLASS_CACHE_SIZE:
                old, _ = self._blobs.popitem(last=False)
                self._classes.pop(old, None)
        blob = self._blobs.get(class_id)
        if blob is None:
            self._fail_before_start(name, epoch, LookupError(f"class {class_id} was never sent to this worker"))
            return
        with self._lock:
            previous = self._agents.get(name)
        if previous is not None and not previous.terminated:
            log.warning("agent %s (epoch %d) replaced by epoch %d; stopping the old copy", name, previous.epoch, epoch)
            self.stop(name, previous.epoch, 0.0)
        if mode == "process":
            self._start_process(name, epoch, blob, config_blob, stop_timeout, hold)
        else:
            self._start_thread(name, epoch, class_id, blob, config_blob, hold)

    def _start_thread(self, name: str, epoch: int, class_id: str, blob: bytes, config_blob: bytes, hold: bool) -> None:
        try:
            if class_id not in self._classes:
                self._classes[class_id] = shipping.unpack_class(blob)
            agent_class, config_class = self._classes[class_id]
            config, plugin = shipping.unpack_config(config_class, config_blob)
            agent = agent_class(name, config, plugin)
        except Exception as exc:
            self._fail_before_start(name, epoch, exc)
            return
        record = Running(name, epoch, "thread", agent=agent,
                         stop_timeout=float(getattr(agent.config, "stop_timeout", 10.0)))

        def report(event: str, **fields: Any) -> None:
            if event == "AGENT_TERMINATED":
                record.terminated = True
            self._emit(name, epoch, event, fields)

        bus = {"address": self.bus_address, "worker": self._worker_name, "host": self.host}

        def run() -> None:
            publisher.attach(agent, bus["address"], bus["worker"], bus["host"])
            try:
                agent.run()
            finally:
                publisher.detach(agent)
                _forget_logger(agent.logger)

        agent._report = report
        agent.events_address = self.events_address
        if hold:
            agent.control_events.execute_event.clear()  # until the coordinator says execute
        record.thread = threading.Thread(target=run, name=f"agent-{name}", daemon=True)
        with self._lock:
            self._agents[name] = record
        record.thread.start()

    def _start_process(self, name: str, epoch: int, blob: bytes, config_blob: bytes, stop_timeout: float,
                       hold: bool) -> None:
        parent_conn, child_conn = self._mp.Pipe()
        process = self._mp.Process(target=child.main, args=(blob, config_blob, name, child_conn,
                                                                    _stderr_level(),
                                                                    self.events_address,
                                                                    [self.bus_address, self._worker_name, self.host],
                                                                    hold),
                                   name=f"agent-{name}", daemon=False)
        try:
            process.start()
        except Exception as exc:
            self._fail_before_start(name, epoch, exc, " (could not start the process)")
            return
        child_conn.close()
        record = Running(name, epoch, "process", process=process, conn=parent_conn, stop_timeout=stop_timeout)
        with self._lock:
            self._agents[name] = record
        record.thread = threading.Thread(target=self._watch_process, args=(record,),
                                         name=f"watch-{name}", daemon=True)
        record.thread.start()

    def _watch_process(self, record: Running) -> None:
        seen_error = False
        try:
            while True:
                event, fields = msgpack.unpackb(record.conn.recv_bytes(), raw=False)
                if event == "AGENT_ERROR":
                    seen_error = True
                if event == "AGENT_TERMINATED":
                    record.terminated = True
                self._report(record.name, record.epoch, event, fields)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("bad message from process agent %s", record.name)
        record.process.join(5.0)
        code = record.process.exitcode
        if not record.terminated:
            # the child died without saying goodbye (SIGKILL, segfault, os._exit): report it now
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            if record.forced:
                how = f"ignored stop for {record.stop_timeout:.1f} s and was terminated ({how})"
            record.terminated = True
            if not seen_error:
                self._emit(record.name, record.epoch, "AGENT_ERROR", {
                    "error_message": f"process agent {record.name} {how} on worker {self._worker_name}",
                    "traceback": "", "exitcode": code})
            self._emit(record.name, record.epoch, "AGENT_TERMINATED", {"ok": False, "exitcode": code})
        record.conn.close()

    # ------------------------------------------------------------------ stop

    def stop(self, name: str, epoch: int, timeout: float | None = None) -> bool:
        """Ask one agent to stop; False if it is not running here at that epoch."""
        with self._lock:
            record = self._agents.get(name)
        if record is None or record.epoch != epoch or record.terminated:
            return False
        self._request_stop(record, timeout)
        return True

    def _request_stop(self, record: Running, timeout: float | None) -> None:
        if timeout is not None:
            record.stop_timeout = timeout
        if record.stop_requested_at is None:
            record.stop_requested_at = time.monotonic()
        if record.mode == "thread":
            record.agent.stop()
        else:
            self._to_child(record, ["stop"])

    def deliver(self, name: str, epoch: int, kind: str, payload: Any) -> bool:
        """Hand a message to a running agent; False if it is not running here at that epoch."""
        with self._lock:
            record = self._agents.get(name)
        if record is None or record.epoch != epoch or record.terminated:
            return False
        if record.mode == "thread":
            record.agent.deliver(kind, payload)
        else:
            self._to_child(record, ["deliver", kind, payload])
        return True

    @staticmethod
    def _to_child(record: Running, message: list) -> None:
        try:
            record.conn.send_bytes(msgpack.packb(message, use_bin_type=True))
        except (OSError, ValueError):
            pass  # the child is gone; its watcher reports that

    def stop_all(self, timeout: float | None = None) -> None:
        with self._lock:
            records = list(self._agents.values())
        for record in records:
            if not record.terminated:
                self._request_stop(record, timeout)

    def enforce_stop_timeouts(self) -> None:
        """Terminate process agents that ignored a stop request past their timeout (call often)."""
        now = time.monotonic()
        with self._lock:
            records = list(self._agents.values())
        for record in records:
            if record.terminated or record.stop_requested_at is None:
                continue
            overdue = now - record.stop_requested_at - record.stop_timeout
            if overdue < 0:
                continue
            if record.mode == "process" and record.process.is_alive():
                record.forced = True
                if overdue < 2.0:
                    log.warning("process agent %s ignored stop for %.1f s: terminating it", record.name, record.stop_timeout)
                    record.process.terminate()
                else:
                    record.process.kill()
            elif record.mode == "thread" and not record.forced:
                record.forced = True  # threads cannot be killed: say so once
                message = (f"thread agent {record.name} has not stopped {record.stop_timeout:.1f} s after the "
                           "request: it is stuck (threads cannot be terminated; make cycle() return or use a "
                           "process agent)")
                log.warning("%s", message)
                self._emit(record.name, record.epoch, "AGENT_ERROR", {"error_message": message, "traceback": "",
                                                                      "stuck": True})

    def forget_finished(self) -> None:
        with self._lock:
            for name in [n for n, r in self._agents.items() if r.terminated]:
                del self._agents[name]
