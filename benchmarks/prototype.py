"""The bare prototype: a launch's hand-offs with nothing of ours in between (issue #13).

It makes every hand-off S2 and S3 make, and nothing else: the user's thread puts a launch in the
coordinator loop's mailbox (a deque and a wake frame), the loop sends it over ROUTER/DEALER to a
worker process's loop (2 workers, least loaded first), that loop loads the class (cached per class,
as ours does), builds the agent and hands it to a reused agent thread, the agent runs and hands
STARTED/READY/TERMINATED to the worker's outbox (a deque and a pipe), the worker's loop sends them
back in one frame, the coordinator's loop hands the batch to a callback thread, and the callback
wakes the waiting user thread.  No validation, no state, no history, no bus: what is left between it
and the floor is the cost of the hand-offs themselves on this machine, and what is left between us
and it is our own work.  ``python -m benchmarks --prototype`` runs it beside the floor and ours.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import threading
import time

import cloudpickle
import msgpack
import zmq

from pyorchestrate import trace

from .stats import timed_launches


class Trivial:
    def execute(self):
        pass


def _worker(address: str, name: str) -> None:
    """One worker process: a loop thread (DEALER, outbox pipe) and reused agent threads."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, name.encode())
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.connect(address)
    dealer.send(msgpack.packb({"type": "hello"}))
    outbox: collections.deque = collections.deque()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    woken = [False]
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    idle = [0]
    lock = threading.Lock()
    classes: dict[str, type] = {}

    def report(agent: str, event: str) -> None:
        outbox.append((agent, event))
        if not woken[0]:
            woken[0] = True
            os.write(wake_w, b"\0")

    def serve(first) -> None:
        job = first
        while job is not None:
            agent_name, instance = job
            if trace.enabled:
                trace.mark("running", agent_name)
            report(agent_name, "AGENT_STARTED")
            report(agent_name, "AGENT_READY")
            instance.execute()
            report(agent_name, "AGENT_TERMINATED")
            if trace.enabled:
                trace.mark("ended", agent_name)
            with lock:
                idle[0] += 1
            job = jobs.get()

    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(wake_r, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(1000))
        if dealer in ready:
            while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                message = msgpack.unpackb(dealer.recv())
                if message["type"] == "quit":
                    dealer.close(0)
                    ctx.term()
                    if trace.enabled:
                        trace.write()  # a spawned process may end without atexit
                    return
                for item in message["agents"]:
                    if trace.enabled:
                        trace.mark("received", item["agent"])
                    cls = classes.get(item["class_id"])
                    if cls is None:
                        cls = classes[item["class_id"]] = cloudpickle.loads(item["class_blob"])
                    job = (item["agent"], cls())
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
        if wake_r in ready or outbox:
            try:
                os.read(wake_r, 65536)
            except BlockingIOError:
                pass
            woken[0] = False
            events = []
            while outbox:
                agent, event = outbox.popleft()
                events.append({"agent": agent, "event": event})
            if events:
                dealer.send(msgpack.packb({"type": "agent_events", "events": events}))
                if trace.enabled:
                    trace.ends("flushed", events)


class Prototype:
    """The coordinator side: a loop thread, a mailbox, a callback thread; 2 worker processes."""

    def __init__(self, workers: int = 2) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.wake_pull = self.ctx.socket(zmq.PAIR)
        self.wake_pull.bind(f"inproc://proto-wake-{id(self)}")
        self.wake_push = self.ctx.socket(zmq.PAIR)
        self.wake_push.connect(f"inproc://proto-wake-{id(self)}")
        self.mailbox: collections.deque = collections.deque()
        self.mailbox_lock = threading.Lock()
        self.callbacks: queue.SimpleQueue = queue.SimpleQueue()
        self.ended = 0
        self.cond = threading.Condition()
        self.blob = cloudpickle.dumps(Trivial)
        mp = multiprocessing.get_context("spawn")
        self.procs = [mp.Process(target=_worker, args=(f"tcp://127.0.0.1:{port}", f"p{i}"), daemon=True)
                      for i in range(workers)]
        for proc in self.procs:
            proc.start()
        self.workers: dict[bytes, int] = {}
        while len(self.workers) < workers:  # their hellos, before the loop owns the socket
            if not self.router.poll(30_000):
                for proc in self.procs:  # nothing is left behind
                    proc.kill()
                    proc.join(10)
                raise TimeoutError("prototype workers did not say hello")
            identity, _ = self.router.recv_multipart()
            self.workers[identity] = 0
        self.closing = False
        self.loop = threading.Thread(target=self._loop, name="proto-loop", daemon=True)
        self.runner = threading.Thread(target=self._callbacks, name="proto-callback", daemon=True)
        self.loop.start()
        self.runner.start()

    # the user's side
    def launch(self, name: str) -> None:
        if trace.enabled:
            trace.mark("register", name)
        with self.mailbox_lock:
            was_empty = not self.mailbox
            self.mailbox.append(name)
            if was_empty:
                self.wake_push.send(b"")
        if trace.enabled:
            trace.mark("queued", name)

    def wait(self, count: int, timeout: float = 120.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.ended >= count, timeout):
                raise TimeoutError(f"prototype: {self.ended} of {count} ended")

    def _on_terminated(self, agent: str) -> None:  # the user's callback
        with self.cond:
            self.ended += 1
            self.cond.notify_all()

    # the coordinator's loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        while not self.closing:
            ready = dict(poller.poll(100))
            if self.wake_pull in ready:
                while self.wake_pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self.wake_pull.recv()
                with self.mailbox_lock:
                    names = list(self.mailbox)
                    self.mailbox.clear()
                starts: dict[bytes, list] = collections.defaultdict(list)
                for name in names:
                    if trace.enabled:
                        trace.mark("loop", name)
                    identity = min(self.workers, key=self.workers.__getitem__)
                    self.workers[identity] += 1
                    starts[identity].append({"agent": name, "class_id": "t", "class_blob": self.blob})
                for identity, items in starts.items():
                    frame = msgpack.packb({"type": "starts", "agents": items})
                    self.router.send_multipart([identity, frame])
                    if trace.enabled:
                        trace.sent(frame)
            if self.router in ready:
                while self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    identity, frame = self.router.recv_multipart()
                    events = msgpack.unpackb(frame)["events"]
                    if trace.enabled:
                        trace.ends("reported", events)
                    ended = [e["agent"] for e in events if e["event"] == "AGENT_TERMINATED"]
                    self.workers[identity] -= len(ended)
                    if ended:
                        if trace.enabled:
                            for agent in ended:
                                trace.mark("published", agent)
                        self.callbacks.put(ended)

    def _callbacks(self) -> None:
        while True:
            batch = self.callbacks.get()
            if batch is None:
                return
            for agent in batch:
                if trace.enabled:
                    trace.mark("callback", agent)
                self._on_terminated(agent)

    def close(self) -> None:
        self.closing = True
        self.loop.join(5)
        self.callbacks.put(None)
        for identity in self.workers:
            self.router.send_multipart([identity, msgpack.packb({"type": "quit"})])
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        for sock in (self.router, self.wake_pull, self.wake_push):
            sock.close(0)
        self.ctx.term()


def s2(reps: int) -> dict:
    """S2 with nothing of ours: launch one trivial agent, wait for its TERMINATED callback."""
    proto = Prototype()

    def launch(i: int) -> None:
        proto.launch(f"t{i}")
        proto.wait(i + 1)

    try:
        return timed_launches(launch, [proc.pid for proc in proto.procs], reps)
    finally:
        proto.close()


def s2_trace(reps: int) -> list[dict]:
    """S2 of the prototype with every hop timestamped as ours (pyorchestrate.trace), for the
    per-hop table beside ours (``python -m benchmarks --trace``)."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="pyorchestrate-proto-trace-")
    trace.enable(directory)
    proto = Prototype()
    try:
        for i in range(reps + 10):
            name = f"proto{i}" if i >= 10 else f"protowarm{i}"
            proto.launch(name)
            proto.wait(i + 1)
            trace.mark("woke", name)
    finally:
        proto.close()  # the workers write their marks as they quit
    marks = {k: v for k, v in trace.collect(directory).items() if k.startswith("proto") and not k.startswith("protowarm")}
    return trace.hop_table(marks)


def s3(n: int) -> dict:
    """S3 with nothing of ours: ``n`` launches at once, until all ended."""
    proto = Prototype()
    try:
        proto.launch("warm")
        proto.wait(1)
        t0 = time.perf_counter()
        for i in range(n):
            proto.launch(f"t{i}")
        proto.wait(n + 1)
        seconds = time.perf_counter() - t0
    finally:
        proto.close()
    return {"per_s": round(n / seconds), "n": n, "seconds": round(seconds, 3)}

