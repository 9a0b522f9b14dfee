"""The floor: what raw pyzmq does on this machine, in the same run, with nothing of ours."""

from __future__ import annotations

import multiprocessing
import time

import cloudpickle
import msgpack
import zmq

from .stats import latency

PAYLOAD = msgpack.packb({"type": "x", "data": "y" * 80})  # about 100 bytes


def _server(port_queue, dispatch: bool) -> None:
    """Echo each frame back, or (``dispatch``) load the pickled class in it, run it, and reply:
    our dispatch with nothing else."""
    ctx = zmq.Context()
    sock = _unbounded(ctx.socket(zmq.ROUTER))
    port_queue.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        ident, frame = sock.recv_multipart()
        if frame == b"quit":
            break
        sock.send_multipart([ident, msgpack.packb(cloudpickle.loads(frame)().execute()) if dispatch else frame])
    sock.close(0)
    ctx.term()


def _unbounded(sock):
    # pipelined floors must not hit a high-water mark: a ROUTER drops silently beyond it
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def _serve(dispatch: bool):
    mp = multiprocessing.get_context("spawn")
    q = mp.Queue()
    proc = mp.Process(target=_server, args=(q, dispatch), daemon=True)
    proc.start()
    return proc, q.get(timeout=30)


def _client(port: int):
    ctx = zmq.Context()
    sock = _unbounded(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.RCVTIMEO, 30_000)  # a dead server fails the run instead of hanging it
    sock.connect(f"tcp://127.0.0.1:{port}")
    return ctx, sock


def _stop(proc, ctx, sock) -> None:
    sock.send(b"quit")
    proc.join(10)
    sock.close(0)
    ctx.term()


def rtt(reps: int) -> dict:
    proc, port = _serve(dispatch=False)
    ctx, sock = _client(port)
    samples = []
    for i in range(reps + 50):
        t0 = time.perf_counter()
        sock.send(PAYLOAD)
        sock.recv()
        if i >= 50:
            samples.append(time.perf_counter() - t0)
    _stop(proc, ctx, sock)
    return latency(samples)


class Trivial:
    def execute(self):
        return 1


def dispatch(reps: int, throughput_n: int) -> tuple[dict, dict]:
    proc, port = _serve(dispatch=True)
    ctx, sock = _client(port)
    samples = []
    for i in range(reps + 50):
        t0 = time.perf_counter()
        sock.send(cloudpickle.dumps(Trivial))  # pickled every time, as a fresh class would be
        sock.recv()
        if i >= 50:
            samples.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(throughput_n):
        sock.send(cloudpickle.dumps(Trivial))
    for _ in range(throughput_n):
        sock.recv()
    per_s = throughput_n / (time.perf_counter() - t0)
    _stop(proc, ctx, sock)
    return latency(samples), {"per_s": round(per_s), "n": throughput_n}


def _subscriber(port_queue, result_queue, n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    port = port_queue.get()
    sock.connect(f"tcp://127.0.0.1:{port}")
    got, first = 0, None
    while True:
        if not sock.poll(5000):
            break
        topic, body = sock.recv_multipart()
        if topic == b"ready":
            continue
        if first is None:
            first = time.perf_counter()
        if topic == b"end":
            break
        msgpack.unpackb(body)
        got += 1
    result_queue.put((got, time.perf_counter() - (first or time.perf_counter())))
    sock.close(0)
    ctx.term()


def pubsub(n: int) -> dict:
    """Raw PUB/SUB of ``n`` small msgpack messages between two processes, HWM off: no loss."""
    mp = multiprocessing.get_context("spawn")
    ports, results = mp.Queue(), mp.Queue()
    proc = mp.Process(target=_subscriber, args=(ports, results, n), daemon=True)
    proc.start()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    ports.put(pub.bind_to_random_port("tcp://127.0.0.1"))
    pub.recv()  # the subscription arrived: nothing is lost to a slow join
    for i in range(n):
        pub.send_multipart([b"AGENT_EVENT.x", msgpack.packb({"event": "AGENT_EVENT", "seq": i, "v": 1.5})])
    pub.send_multipart([b"end", b""])
    got, seconds = results.get(timeout=120)
    proc.join(10)
    pub.close(1000)
    ctx.term()
    return {"per_s": round(got / seconds) if seconds else 0, "lost": n - got, "n": n}
