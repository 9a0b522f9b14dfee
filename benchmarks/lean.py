"""The lean prototype: the bare prototype's hand-offs plus the least each of our guarantees needs
on a launch, written as straight-line code (issue #13).

The bare prototype (prototype.py) shows what the hand-offs alone cost here.  This one asks the
next question: what would a launch cost if our guarantees were kept by the smallest code that
keeps them, with none of the structure ours has (a pure core behind actions, a mailbox that
serves queries first, bounded slices, plugins, restart policies, dependencies, leases,
adoption, logging)?  What it does on top of the bare prototype, per launch:

* registering: the name checked (a string without spaces, not taken), the config made from the
  class's defaults and pickled once per class, a record kept;
* the coordinator's loop: the record's state moved by a transitions table (PENDING -> STARTING),
  a new epoch for the run, the class shipped once per worker, the start frame numbered in an
  envelope ``{v, type, n}``;
* the worker: the frame's envelope and every start item checked field by field (as protocol.py
  does for ours), the config unpickled once per blob, the agent's ``setup``, ``execute`` and
  ``on_close`` run, and its thread reused only as ours reuses it (a fresh ``contextvars``
  context per agent, the thread's name set to the agent's, the thread-state dict compared after
  the agent, trace and profile functions checked: a thread an agent changed exits);
* the reports: STARTED, READY and TERMINATED with the run's name and epoch and the run's last bus
  sequence number, folded into one item when they go in one frame (as ours folds them), numbered
  and checked on arrival (envelope, each item's fields, the sender is the worker of that run and
  epoch);
* each of the three lifecycle events: the state moved by the table, a sequence number, the
  event's fields (event, agent, worker, host, date and time stamped once a batch, incarnation),
  kept in a bounded history (ours also puts it on the bus, but only while someone subscribes, and
  nobody does in S2: this prototype has no bus), and its callbacks handed to the callback thread
  in one batch, each callback given the keyword arguments its signature takes; at a run's end,
  its last bus sequence number compared with what arrived of it (ours holds the end back until
  the run's tail is in);
* the harness: ours (``harness.Recorder``: callbacks on STARTED, READY and TERMINATED, and the
  same wait) (the bare prototype has one callback, on TERMINATED).

What it leaves out, each of which ours does on every launch: dependencies, restart policies,
the concurrency cap, pins and labels, leases and adoption, worker liveness, the agent's own
runtime (events, inbox, logger, bus hooks are lazy in ours too), query serving between steps,
bounded slices, dropped-frame counting by reason, the orchestrator's handles and the core's
separation from the loop.  So it is a floor for any implementation of our guarantees in Python
here, not a design: if it is above a target, the target is out of reach without leaving Python
(or a guarantee) on this path.  ``python -m benchmarks --prototype`` runs it beside the floor,
the bare prototype and ours.
"""

from __future__ import annotations

import collections
import contextvars
import ctypes
import datetime
import inspect
import itertools
import multiprocessing
import os
import queue
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable

import cloudpickle
import msgpack
import zmq

from pyorchestrate import trace

from .harness import Recorder
from .stats import timed_launches

VERSION = 1
MAX_FRAME = 1 << 20
STARTED, READY, TERMINATED, ERROR = "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", "AGENT_ERROR"
ENVELOPE = {"v": int, "type": str, "n": int}
START_ITEM = {"agent": str, "class_id": str, "config_blob": bytes, "run": str, "epoch": int}
REPORT_ITEM = {"agent": str, "run": str, "epoch": int, "event": str, "fields": dict}
#: (state, event) -> the next state: anything else is refused
TRANSITIONS = {("PENDING", "start"): "STARTING", ("STARTING", STARTED): "RUNNING", ("RUNNING", READY): "READY",
               ("RUNNING", TERMINATED): "TERMINATED", ("READY", TERMINATED): "TERMINATED",
               ("RUNNING", ERROR): "RUNNING", ("READY", ERROR): "READY"}


class BadFrame(Exception):
    pass


def _check(message: dict, schema: dict[str, type]) -> None:
    for name, kind in schema.items():
        if type(message.get(name)) is not kind:
            raise BadFrame(f"field {name!r}: expected {kind.__name__}")


def decode(frame: bytes, type_: str, items: str, item_schema: dict[str, type]) -> dict:
    """An envelope of ``type_`` whose list ``items`` holds maps of ``item_schema``, or BadFrame."""
    if len(frame) > MAX_FRAME:
        raise BadFrame("too big")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:
        raise BadFrame(f"not msgpack: {exc}") from None
    if type(message) is not dict or message.get("v") != VERSION or message.get("type") != type_:
        raise BadFrame("not a frame of ours")
    _check(message, ENVELOPE)
    listed = message.get(items)
    if type(listed) is not list:
        raise BadFrame(f"{items} is not a list")
    for item in listed:
        if type(item) is not dict:
            raise BadFrame("an item is not a map")
        _check(item, item_schema)
    return message


class Trivial:
    class Config:
        stop_timeout = 10.0

    def setup(self) -> None:
        pass

    def execute(self) -> None:
        pass

    def on_close(self) -> None:
        pass


def _thread_dict() -> Callable[[], dict]:
    get = ctypes.pythonapi.PyThreadState_GetDict
    get.argtypes = []
    get.restype = ctypes.c_void_p  # a borrowed reference (see worker/agent_threads.py)
    return lambda: ctypes.cast(get(), ctypes.py_object).value


def _worker(address: str, name: str) -> None:
    """One worker process: a loop thread (DEALER, outbox pipe) and reused agent threads."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, name.encode())
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.connect(address)
    numbers = itertools.count(1)
    dealer.send(msgpack.packb({"v": VERSION, "type": "hello", "n": next(numbers), "host": socket.gethostname()}))
    outbox: collections.deque = collections.deque()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    woken = [False]
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    idle = [0]
    lock = threading.Lock()
    classes: dict[str, type] = {}
    configs: dict[bytes, Any] = {}
    bus_sent: dict[tuple[str, str, int], int] = {}  # a running run -> the last bus seq it sent
    read_dict = _thread_dict()
    dropped = [0]
    heard = [0]

    def report(job: tuple, event: str, fields: dict | None = None) -> None:
        outbox.append((job[0], job[1], job[2], event, fields or {}))
        if not woken[0]:
            woken[0] = True
            os.write(wake_w, b"\0")

    def run(job: tuple) -> None:
        instance = job[3]
        if trace.enabled:
            trace.mark("running", job[0])
        report(job, STARTED)
        reached = STARTED
        try:
            instance.setup()
            report(job, READY)
            reached = READY
            instance.execute()
        except Exception as exc:
            report(job, ERROR, {"error": repr(exc)})
        try:
            instance.on_close()
        except Exception as exc:
            report(job, ERROR, {"error": repr(exc)})
        report(job, TERMINATED, {"reached": reached})
        if trace.enabled:
            trace.mark("ended", job[0])

    def serve(first: tuple) -> None:
        thread = threading.current_thread()
        baseline = list(read_dict().items())
        job = first
        while job is not None:
            thread.name = f"agent-{job[0]}"
            contextvars.Context().run(run, job)
            job = None
            after = list(read_dict().items())
            if (sys.gettrace() is not None or sys.getprofile() is not None or len(after) != len(baseline)
                    or not all(a[0] == b[0] and a[1] is b[1] for a, b in zip(baseline, after))):
                return  # the agent changed this thread: it serves no other
            thread.name = "agent-idle"
            with lock:
                idle[0] += 1
            job = jobs.get()

    def start(item: dict) -> None:
        cls = classes.get(item["class_id"])
        if cls is None:
            blob = item.get("class_blob")
            if type(blob) is not bytes:
                raise BadFrame("class_blob missing")
            cls = classes[item["class_id"]] = cloudpickle.loads(blob)
        config = configs.get(item["config_blob"])
        if config is None:
            config = configs[item["config_blob"]] = cloudpickle.loads(item["config_blob"])
        instance = cls()
        instance.config, instance.name = config, item["agent"]
        job = (item["agent"], item["run"], item["epoch"], instance)
        with lock:
            reuse = idle[0] > 0
            if reuse:
                idle[0] -= 1
        if reuse:
            jobs.put(job)
        else:
            threading.Thread(target=serve, args=(job,), daemon=True).start()
        if trace.enabled:
            trace.mark("handed", item["agent"])

    def flush() -> None:
        reports = []
        while outbox:
            reports.append(outbox.popleft())
        # a run that went STARTED, READY, TERMINATED within this frame: its end alone, folded
        said: dict[tuple, list[int]] = {}
        gone: set[int] = set()
        for i, (agent, run_, epoch, event, fields) in enumerate(reports):
            copy = (agent, run_, epoch)
            if event == STARTED:
                said[copy] = [i]
                bus_sent.setdefault(copy, 0)
            elif event == READY and copy in said:
                said[copy].append(i)
            elif event == TERMINATED:
                before = said.pop(copy, None)
                fields["bus_seq"] = bus_sent.pop(copy, 0)
                if before is not None and len(before) == (2 if fields["reached"] == READY else 1):
                    fields["folded"] = True
                    gone.update(before)
            else:
                said.pop(copy, None)
        events = [{"agent": r[0], "run": r[1], "epoch": r[2], "event": r[3], "fields": r[4]}
                  for i, r in enumerate(reports) if i not in gone]
        if events:
            dealer.send(msgpack.packb({"v": VERSION, "type": "agent_events", "n": next(numbers), "events": events}))
            if trace.enabled:
                trace.ends("flushed", events)

    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(wake_r, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(1000))
        if dealer in ready:
            while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frame = dealer.recv()
                if frame == b"quit":
                    dealer.close(0)
                    ctx.term()
                    if trace.enabled:
                        trace.write()  # a spawned process may end without atexit
                    return
                try:
                    message = decode(frame, "starts", "agents", START_ITEM)
                    if message["n"] != heard[0] + 1:
                        raise BadFrame("a frame was lost")
                    heard[0] = message["n"]
                    for item in message["agents"]:
                        if trace.enabled:
                            trace.mark("received", item["agent"])
                        start(item)
                except BadFrame:
                    dropped[0] += 1
        if wake_r in ready or outbox:
            try:
                os.read(wake_r, 65536)
            except BlockingIOError:
                pass
            woken[0] = False
            flush()


class _Record:
    __slots__ = ("name", "class_id", "class_blob", "config_blob", "state", "run", "epoch", "worker")

    def __init__(self, name: str, class_id: str, class_blob: bytes, config_blob: bytes) -> None:
        self.name, self.class_id, self.class_blob, self.config_blob = name, class_id, class_blob, config_blob
        self.state, self.run, self.epoch, self.worker = "PENDING", "", 0, b""


def _stamp() -> dict[str, str]:
    now = datetime.datetime.now()
    return {"event_date": now.strftime("%Y-%m-%d"), "event_time": now.strftime("%H:%M:%S.%f")}


class Lean(Recorder):
    """The coordinator side: a loop thread, a mailbox, a callback thread; 2 worker processes."""

    def __init__(self, workers: int = 2, worker_target: Callable[[str, str], None] | None = None) -> None:
        """``worker_target``: what a worker process runs (``_worker``; lines.py counts in it)."""
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.woken = False
        self.mailbox: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.names: set[str] = set()
        self.records: dict[str, _Record] = {}
        self.classes: dict[type, tuple[str, bytes, bytes]] = {}
        self.incarnation = uuid.uuid4().hex[:12]
        self.epochs = itertools.count(1)
        self.seq = 0
        self.history: collections.deque = collections.deque(maxlen=10_000)
        self.bus_seen: dict[tuple[str, str, int], int] = {}  # a run -> its last bus event received (no bus here)
        self.tails_awaited = 0
        self.states: dict[str, str] = {}  # what handles read, updated once a batch
        self.dropped = 0
        self.callbacks: dict[str, list[tuple[Callable, tuple[str, ...]]]] = {}
        self.handed: queue.SimpleQueue = queue.SimpleQueue()
        Recorder.__init__(self)  # the harness, ours.Cluster's
        for event in (STARTED, READY, TERMINATED, ERROR):
            self.register_event(event, self._record)
        mp = multiprocessing.get_context("spawn")
        self.procs = [mp.Process(target=worker_target or _worker, args=(f"tcp://127.0.0.1:{port}", f"l{i}"), daemon=True)
                      for i in range(workers)]
        for proc in self.procs:
            proc.start()
        self.workers: dict[bytes, list] = {}  # identity -> [load, host, frames sent, frames heard, class ids sent]
        while len(self.workers) < workers:
            if not self.router.poll(30_000):
                for proc in self.procs:
                    proc.kill()
                    proc.join(10)
                raise TimeoutError("lean prototype workers did not say hello")
            identity, frame = self.router.recv_multipart()
            hello = msgpack.unpackb(frame)
            _check(hello, {**ENVELOPE, "host": str})
            self.workers[identity] = [0, hello["host"], 0, hello["n"], set()]
        self.closing = False
        self.loop = threading.Thread(target=self._loop, name="lean-loop", daemon=True)
        self.runner = threading.Thread(target=self._run_callbacks, name="lean-callback", daemon=True)
        self.loop.start()
        self.runner.start()

    # the user's side
    def register_event(self, event: str, callback: Callable) -> None:
        accepted = frozenset(inspect.signature(callback).parameters)
        self.callbacks.setdefault(event, []).append((callback, accepted))

    def launch(self, name: str, cls: type = Trivial) -> None:
        if trace.enabled:
            trace.mark("register", name)
        if not isinstance(name, str) or name.split() != [name]:
            raise ValueError(f"agent name {name!r} must be a non-empty string without spaces")
        shipped = self.classes.get(cls)
        if shipped is None:
            shipped = self.classes[cls] = (uuid.uuid4().hex, cloudpickle.dumps(cls), cloudpickle.dumps(cls.Config()))
        record = _Record(name, *shipped)
        with self.lock:
            if name in self.names:
                raise ValueError(f"an agent named {name!r} is already registered")
            self.names.add(name)
            self.mailbox.append(record)
            if not self.woken:
                self.woken = True
                os.write(self.wake_w, b"\0")
        if trace.enabled:
            trace.mark("queued", name)

    # the coordinator's loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        while not self.closing:
            ready = dict(poller.poll(100))
            if self.wake_r in ready:
                os.read(self.wake_r, 65536)
                with self.lock:
                    self.woken = False
                    records = list(self.mailbox)
                    self.mailbox.clear()
                self._place(records)
            if self.router in ready:
                while self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    identity, frame = self.router.recv_multipart()
                    try:
                        self._on_reports(identity, frame)
                    except BadFrame:
                        self.dropped += 1

    def _place(self, records: list[_Record]) -> None:
        starts: dict[bytes, list] = collections.defaultdict(list)
        for record in records:
            if trace.enabled:
                trace.mark("loop", record.name)
            record.state = TRANSITIONS[(record.state, "start")]
            identity = min(self.workers, key=lambda w: self.workers[w][0])
            worker = self.workers[identity]
            worker[0] += 1
            record.run, record.epoch, record.worker = self.incarnation, next(self.epochs), identity
            self.records[record.name] = record
            item = {"agent": record.name, "class_id": record.class_id, "config_blob": record.config_blob,
                    "run": record.run, "epoch": record.epoch}
            if record.class_id not in worker[4]:
                worker[4].add(record.class_id)
                item["class_blob"] = record.class_blob
            starts[identity].append(item)
        for identity, items in starts.items():
            worker = self.workers[identity]
            worker[2] += 1
            self.router.send_multipart([identity, msgpack.packb({"v": VERSION, "type": "starts", "n": worker[2],
                                                                 "agents": items})])
            if trace.enabled:
                for item in items:
                    trace.mark("sent", item["agent"])

    def _on_reports(self, identity: bytes, frame: bytes) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            raise BadFrame("not a worker")
        message = decode(frame, "agent_events", "events", REPORT_ITEM)
        if message["n"] != worker[3] + 1:
            raise BadFrame("a frame was lost")
        worker[3] = message["n"]
        if trace.enabled:
            trace.ends("reported", message["events"])
        stamp = _stamp()
        batch = []
        changed = {}
        for item in message["events"]:
            record = self.records.get(item["agent"])
            if (record is None or record.worker != identity or record.run != item["run"]
                    or record.epoch != item["epoch"]):
                self.dropped += 1  # not the current run of an agent of this worker's
                continue
            fields = item["fields"]
            if fields.get("folded") is True:  # the run's STARTED (and READY) went with its end
                said = (STARTED, READY, TERMINATED) if fields.get("reached") == READY else (STARTED, TERMINATED)
            else:
                said = (item["event"],)
            for event in said:
                state = TRANSITIONS.get((record.state, event))
                if state is None:
                    self.dropped += 1
                    break
                record.state = changed[record.name] = state
                self.seq += 1
                published = {"event": event, "agent_name": record.name, "worker": identity.decode(),
                             "host": worker[1], "seq": self.seq, "incarnation": self.incarnation, **stamp}
                # ours also puts it on the bus, only while someone subscribes: nobody does in S2
                self.history.append(published)
                if event in self.callbacks:
                    batch.append((event, published))
                if event == TERMINATED:
                    worker[0] -= 1
                    # the run's tail: ours holds the end back until every bus event the run sent
                    # has arrived; this prototype has no bus, so it only compares
                    if fields.get("bus_seq", 0) > self.bus_seen.pop((record.name, record.run, record.epoch), 0):
                        self.tails_awaited += 1
                    del self.records[record.name]
                    if trace.enabled:
                        trace.mark("published", record.name)
        if changed:
            with self.lock:
                self.states.update(changed)
        if batch:
            self.handed.put(batch)

    def _run_callbacks(self) -> None:
        while True:
            batch = self.handed.get()
            if batch is None:
                return
            for event, fields in batch:
                if trace.enabled and event == TERMINATED:
                    trace.mark("callback", fields["agent_name"])
                for callback, accepted in self.callbacks[event]:
                    names = fields.keys() & accepted  # as events.py picks them
                    kwargs = dict(zip(names, map(fields.__getitem__, names)))
                    try:
                        callback(**kwargs)
                    except Exception:
                        pass

    def close(self) -> None:
        self.closing = True
        self.loop.join(5)
        self.handed.put(None)
        for identity in self.workers:
            self.router.send_multipart([identity, b"quit"])
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.router.close(0)
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.ctx.term()


def s2(reps: int) -> dict:
    """S2 as ours runs it: launch one trivial agent, wait for its TERMINATED callback."""
    lean = Lean()

    def launch(i: int) -> None:
        done = lean.counts[TERMINATED]
        lean.launch(f"t{i}")
        lean.wait(TERMINATED, done + 1)

    try:
        result = timed_launches(launch, [proc.pid for proc in lean.procs], reps)
        assert lean.dropped == lean.tails_awaited == 0 and not lean.records, "the lean prototype dropped or lost a report"
        return result
    finally:
        lean.close()


def s3(n: int) -> dict:
    """S3 of the lean prototype: ``n`` launches at once, until all ended."""
    lean = Lean()
    try:
        lean.launch("warm")
        lean.wait(TERMINATED, 1)
        t0 = time.perf_counter()
        for i in range(n):
            lean.launch(f"t{i}")
        lean.wait(TERMINATED, n + 1)
        seconds = time.perf_counter() - t0
    finally:
        lean.close()
    return {"per_s": round(n / seconds), "n": n, "seconds": round(seconds, 3)}


def s2_trace(reps: int) -> list[dict]:
    """S2 of the lean prototype with every hop timestamped as ours (pyorchestrate.trace)."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="pyorchestrate-lean-trace-")
    trace.enable(directory)
    lean = Lean()
    try:
        for i in range(reps + 10):
            name = f"lean{i}" if i >= 10 else f"leanwarm{i}"
            done = lean.counts[TERMINATED]
            lean.launch(name)
            lean.wait(TERMINATED, done + 1)
            trace.mark("woke", name)
    finally:
        lean.close()  # the workers write their marks as they quit
    marks = {k: v for k, v in trace.collect(directory).items() if k.startswith("lean") and not k.startswith("leanwarm")}
    return trace.hop_table(marks)
