"""Our scenarios (S1-S11), on 127.0.0.1: an in-process coordinator, worker processes, and a
subscriber process.  Every loop is bounded in count and time; every process is cleaned up."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

from . import agents
from .harness import TIMEOUT, Recorder
from .stats import cpu_seconds, rss_mb, session_members, timed_launches


class Cluster(Recorder):
    """A DAEMON orchestrator plus worker processes, with event counters to wait on."""

    def __init__(self, workers: int, worker_args: tuple[str, ...] = (), track: bool = True, keys: str | None = None,
                 worker_command: tuple[str, ...] = (sys.executable, "-m", "pyorchestrate_worker"),
                 **settings: Any) -> None:
        """``keys``: a key directory (CurveZMQ on every connection), as made by ``keys init``;
        ``worker_command``: what starts a worker, before its arguments (lines.py counts in it)."""
        super().__init__(track)
        self.worker_command = worker_command
        if keys:
            settings["keys"] = keys
            worker_args = (*worker_args, "--keys", keys)
        settings = {"address": "tcp://127.0.0.1:*", "run_mode": RunMode.DAEMON, "log_level": "WARNING",
                    "min_workers": workers, **settings}
        self.orch = Orchestrator("bench", config=Orchestrator.Config(**settings))
        for event in (OrchestratorEvent.AGENT_STARTED, OrchestratorEvent.AGENT_READY, OrchestratorEvent.AGENT_TERMINATED, OrchestratorEvent.AGENT_ERROR,
                      OrchestratorEvent.WORKER_JOINED, OrchestratorEvent.WORKER_LOST):
            self.orch.register_event(event, self._record)
        self.orch.start()
        self.procs: list[subprocess.Popen] = []
        self.worker_args = worker_args
        self.add_workers(workers)

    def add_workers(self, n: int) -> None:
        start = len(self.procs)
        for i in range(start, start + n):
            self.procs.append(subprocess.Popen(
                [*self.worker_command, "--coordinator", self.orch.address, "--name", f"b{i}",
                 "--log-level", "ERROR", *self.worker_args], start_new_session=True, stdout=subprocess.DEVNULL))
        self.wait("WORKER_JOINED", start + n)

    def close(self) -> None:
        try:
            self.orch.stop(timeout=5)
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.terminate()
            for proc in self.procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def s1_cold_start() -> dict:
    t0 = time.perf_counter()
    cluster = Cluster(2)
    seconds = time.perf_counter() - t0
    cluster.close()
    return {"seconds": round(seconds, 3)}


def s2_launch(reps: int, keys: str | None = None) -> dict[str, dict]:
    cluster = Cluster(2, keys=keys)
    out = {}
    try:
        # the CPU of the coordinator's process and the workers' (a process agent's own process,
        # a child of its worker, is not counted: S2.process's figures are what we add around it)
        workers = [proc.pid for proc in cluster.procs]
        for variant, cls in (("thread", agents.Trivial), ("process", agents.TrivialProcess)):
            def launch(i: int, cls: type = cls, variant: str = variant) -> None:
                done = cluster.counts["AGENT_TERMINATED"]
                cluster.orch.register_agent(cls, f"{variant}{i}")
                cluster.wait("AGENT_TERMINATED", done + 1)

            # after 10 unmeasured: the first launches ship the class and start the forkserver
            out[variant] = timed_launches(launch, workers, reps)
    finally:
        cluster.close()
    return out


def s2_trace(reps: int) -> list[dict]:
    """S2's thread launches with every hop timestamped (pyorchestrate.trace): the median of each
    hop, from register_agent to the waiting thread waking on AGENT_TERMINATED."""
    import tempfile

    from pyorchestrate import trace

    directory = tempfile.mkdtemp(prefix="pyorchestrate-trace-")
    trace.enable(directory)
    cluster = Cluster(2)
    try:
        for i in range(reps + 10):
            done = cluster.counts["AGENT_TERMINATED"]
            name = f"trace{i}" if i >= 10 else f"warm{i}"  # warm-up: ships the class
            cluster.orch.register_agent(agents.Trivial, name)
            cluster.wait("AGENT_TERMINATED", done + 1)
            trace.mark("woke", name)
    finally:
        cluster.close()  # the workers write their marks as they exit
    marks = {k: v for k, v in trace.collect(directory).items() if k.startswith("trace")}
    return trace.hop_table(marks)


def s3_throughput(n: int, keys: str | None = None) -> dict:
    cluster = Cluster(2, keys=keys)
    try:
        cluster.orch.register_agent(agents.Trivial, "warm")
        cluster.wait("AGENT_TERMINATED", 1)
        t0 = time.perf_counter()
        for i in range(n):
            cluster.orch.register_agent(agents.Trivial, f"t{i}")
        cluster.wait("AGENT_TERMINATED", n + 1)
        seconds = time.perf_counter() - t0
    finally:
        cluster.close()
    return {"per_s": round(n / seconds), "n": n, "seconds": round(seconds, 3)}


def s4_long_lived(n: int) -> dict[str, dict]:
    out = {}
    for variant, cls in (("thread", agents.Idle), ("process", agents.IdleProcess)):
        cluster = Cluster(2)
        try:
            t0 = time.perf_counter()
            for i in range(n):
                cluster.orch.register_agent(cls, f"{variant}{i}")
            cluster.wait("AGENT_READY", n)
            out[variant] = {"seconds": round(time.perf_counter() - t0, 3), "n": n}
        finally:
            cluster.close()
    return out


_SUBSCRIBER = """
import sys, time
from pyorchestrate import EventSubscriber
n = int(sys.argv[2])
with EventSubscriber(sys.argv[1], topics=["AGENT_EVENT.bench"], keys=sys.argv[3] or None) as sub:
    sub.wait_connected(10)
    print("ready", flush=True)
    got, first, last = 0, None, None
    while got < n:
        ev = sub.recv(timeout=10)
        if ev is None:
            break
        last = time.perf_counter()
        first = first or last
        got += 1
print(got, (last - first) if got > 1 else 0.0, flush=True)
"""


def s5_event_bus(n: int, keys: str | None = None) -> dict:
    cluster = Cluster(1, keys=keys)
    try:
        sub = subprocess.Popen([sys.executable, "-c", _SUBSCRIBER, cluster.orch.events_address, str(n), keys or ""],
                               stdout=subprocess.PIPE, text=True)
        assert sub.stdout.readline().strip() == "ready"
        cluster.orch.register_agent(agents.Emitter, "emitter", agents.Emitter.Config(count=n))
        out, _ = sub.communicate(timeout=TIMEOUT)
        got, seconds = out.split()
        got, seconds = int(got), float(seconds)
        lost = cluster.orch.status()["lost_events"]
    finally:
        cluster.close()
    return {"per_s": round(got / seconds) if seconds else 0, "lost": n - got, "lost_at_coordinator": lost, "n": n}


def _detect(settings: dict, sig: int) -> float:
    cluster = Cluster(1, **settings)
    try:
        victim = cluster.procs[0]
        time.sleep(settings.get("heartbeat_interval", 1.0) * 2)
        t0 = time.perf_counter()
        os.kill(victim.pid, sig)
        cluster.wait("WORKER_LOST", 1, timeout=60)
        return cluster.times[("WORKER_LOST", "b0")] - t0
    finally:
        cluster.close()


def s6_detection(quick: bool) -> dict[str, dict]:
    fast = {"heartbeat_interval": 0.1}
    out = {"kill": {"seconds": round(_detect(fast if quick else {}, signal.SIGKILL), 3),
                    "setting": "heartbeat_interval=0.1" if quick else "defaults",
                    "how": "closed connection, after one heartbeat interval of grace"},
           "hung.fast": {"seconds": round(_detect(fast, signal.SIGSTOP), 3)}}
    if not quick:
        out["hung.default"] = {"seconds": round(_detect({}, signal.SIGSTOP), 3)}
    cluster = Cluster(1)
    try:
        cluster.orch.register_agent(agents.IdleProcess, "victim")
        cluster.wait("AGENT_READY", 1)
        worker_pid = cluster.procs[0].pid
        # the agent's process is the newest in the worker's session (after the forkserver)
        agent_pid = max(p for p in session_members(worker_pid) if p != worker_pid)
        t0 = time.perf_counter()
        os.kill(agent_pid, signal.SIGKILL)
        cluster.wait("AGENT_ERROR", 1)
        out["process_agent"] = {"seconds": round(cluster.times[("AGENT_ERROR", "victim")] - t0, 4)}
    finally:
        cluster.close()
    return out


def s7_idle(workers: int, seconds: float) -> dict:
    cluster = Cluster(workers)
    try:
        time.sleep(1.0)
        worker_rss = rss_mb(cluster.procs[0].pid)
        c0, t0 = cpu_seconds(), time.perf_counter()
        time.sleep(seconds)
        cpu = (cpu_seconds() - c0) / (time.perf_counter() - t0) * 100
    finally:
        cluster.close()
    return {"rss_mb": worker_rss, "cpu_percent": round(cpu, 2), "workers": workers, "seconds": seconds}


def s8_scale(workers: int, per_worker: int) -> dict:
    cluster = Cluster(workers)
    try:
        n = workers * per_worker
        t0 = time.perf_counter()
        for i in range(n):
            cluster.orch.register_agent(agents.Idle, f"a{i}")
        cluster.wait("AGENT_READY", n)
        seconds = time.perf_counter() - t0
        rss = rss_mb(os.getpid())
    finally:
        cluster.close()
    return {"seconds": round(seconds, 3), "agents": n, "workers": workers, "rss_mb": rss}


def _p95(values: list[float]) -> float:
    return round(sorted(values)[int(len(values) * 0.95)], 1) if values else 0.0


class _Sampler:
    """Samples the coordinator's RSS and ``status()`` latency on a thread until stopped."""

    def __init__(self, orch: Orchestrator, every: float = 0.25) -> None:
        self.orch, self.every = orch, every
        self.rss_peak = 0.0
        self.status_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.rss_peak = max(self.rss_peak, rss_mb(os.getpid()))
            t0 = time.perf_counter()
            self.orch.status()
            self.status_ms.append((time.perf_counter() - t0) * 1000)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def s9_scale(workers: int, n: int, capacity: int = 20, nice: int = 0) -> dict:
    """n agents that each log 10 lines and publish 10 events, on ``workers`` with --capacity
    (and ``--nice``: the priority they give up to the coordinator beside them)."""
    cluster = Cluster(workers, worker_args=("--capacity", str(capacity), "--nice", str(nice)))
    try:
        sampler = _Sampler(cluster.orch)
        t0 = time.perf_counter()
        for i in range(n):
            cluster.orch.register_agent(agents.Chatty, f"c{i}")
        cluster.wait("AGENT_TERMINATED", n, timeout=600)
        seconds = time.perf_counter() - t0
        sampler.stop()
        runs = [cluster.started.get(f"c{i}", 0) for i in range(n)]
        status = cluster.orch.status()
    finally:
        cluster.close()
    return {"seconds": round(seconds, 2), "agents": n, "workers": workers, "capacity": capacity, "nice": nice,
            "executions_min": min(runs), "executions_max": max(runs), "errors": cluster.counts["AGENT_ERROR"],
            "worker_lost": cluster.counts["WORKER_LOST"], "rss_mb": round(sampler.rss_peak, 1),
            "status_ms_max": round(max(sampler.status_ms, default=0.0), 1),
            "status_ms_p50": round(statistics.median(sampler.status_ms), 1) if sampler.status_ms else 0.0,
            "status_ms_p95": _p95(sampler.status_ms),
            "lost_events": status["lost_events"], "dropped": status["dropped"]}


def s11_burst(n: int, workers: int = 2, hold: float = 30.0) -> dict:
    """n long-lived agents (``wait_stop(1.0)`` in a loop) registered in one burst on ``workers``:
    time to all READY, then ``hold`` seconds running; WORKER_LOST and errors counted before the
    cluster is stopped (the harness's short stop would add its own)."""
    cluster = Cluster(workers)
    try:
        sampler = _Sampler(cluster.orch, every=1.0)
        t0 = time.perf_counter()
        for i in range(n):
            cluster.orch.register_agent(agents.Idle, f"b{i}")
        registered = time.perf_counter() - t0
        cluster.wait("AGENT_READY", n, timeout=600)
        ready = time.perf_counter() - t0
        time.sleep(hold)
        sampler.stop()
        counts = dict(cluster.counts)
        status = cluster.orch.status()
        running = sum(a["state"] in ("READY", "STARTED") for a in status["agents"].values())
    finally:
        cluster.close()
    return {"seconds": round(ready, 2), "agents": n, "workers": workers, "register_s": round(registered, 2),
            "ready": counts.get("AGENT_READY", 0), "running_after_hold": running, "hold_s": hold,
            "worker_lost": counts.get("WORKER_LOST", 0), "errors": counts.get("AGENT_ERROR", 0),
            "rss_mb": round(sampler.rss_peak, 1), "status_ms_max": round(max(sampler.status_ms, default=0.0), 1)}


def _proc_counts(pid: int) -> dict:
    return {"threads": len(os.listdir(f"/proc/{pid}/task")), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mm = sum(m for _, m in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (m - mm) for t, m in samples) / var if var else 0.0


def s10_soak(seconds: float, rate: int = 500, workers: int = 4, warmup: float | None = None) -> dict:
    """DAEMON; ``rate`` agents a second registered and finished (each logs 10 lines and publishes
    10 events) for ``seconds``; RSS slope of the coordinator and a worker after warm-up."""
    warmup = min(60.0, seconds / 5) if warmup is None else warmup
    cluster = Cluster(workers, track=False)
    me, worker_pid = os.getpid(), cluster.procs[0].pid
    try:
        time.sleep(1.0)
        start = {"coordinator": _proc_counts(me), "worker": _proc_counts(worker_pid)}
        coord: list[tuple[float, float]] = []
        work: list[tuple[float, float]] = []
        t0 = time.perf_counter()
        next_sample = t0
        registered = 0
        while (now := time.perf_counter()) - t0 < seconds:
            due = int((now - t0) * rate)
            for i in range(registered, due):
                cluster.orch.register_agent(agents.Chatty, f"s{i}")
            registered = max(registered, due)
            if now >= next_sample:
                if now - t0 >= warmup:
                    coord.append((now - t0, rss_mb(me)))
                    work.append((now - t0, rss_mb(worker_pid)))
                next_sample = now + 2.0
            time.sleep(0.02)
        cluster.wait("AGENT_TERMINATED", registered, timeout=120)
        end = {"coordinator": _proc_counts(me), "worker": _proc_counts(worker_pid)}
        finished_per_s = registered / (time.perf_counter() - t0)
        status = cluster.orch.status()
    finally:
        cluster.close()
    return {"seconds": round(seconds), "agents": registered, "per_s": round(finished_per_s),
            "coordinator_mb_per_min": round(_slope_mb_per_min(coord), 3),
            "worker_mb_per_min": round(_slope_mb_per_min(work), 3),
            "coordinator_rss_mb": [coord[0][1], coord[-1][1]] if coord else None,
            "worker_rss_mb": [work[0][1], work[-1][1]] if work else None,
            "start": start, "end": end, "worker_lost": cluster.counts["WORKER_LOST"],
            "errors": cluster.counts["AGENT_ERROR"], "lost_events": status["lost_events"]}


def s5_lossless(n: int, stall: float = 5.0) -> dict:
    """A subscriber that stalls ``stall`` s mid-stream: events delivered (recovered from history)
    vs reported lost vs silently missing (must be 0)."""
    cluster = Cluster(1)
    try:
        sub = subprocess.Popen([sys.executable, "-c", _STALLER, cluster.orch.events_address, str(n), str(stall)],
                               stdout=subprocess.PIPE, text=True)
        assert sub.stdout.readline().strip() == "ready"
        cluster.orch.register_agent(agents.Emitter, "emitter", agents.Emitter.Config(count=n))
        out, _ = sub.communicate(timeout=TIMEOUT + stall)
        got, lost, recovered, in_order = out.split()
    finally:
        cluster.close()
    got, lost = int(got), int(lost)
    return {"delivered": got, "reported_lost": lost, "silent": n - got - lost, "recovered": int(recovered),
            "in_order": in_order == "True", "n": n}


_STALLER = r"""
import sys, time
from pyorchestrate import EventSubscriber
address, n, stall = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sub = EventSubscriber(address)
sub.wait_connected(30)
print("ready", flush=True)
got, lost, seen, last = 0, 0, 0, -1
in_order = True
deadline = time.monotonic() + 120
while got + lost < n and time.monotonic() < deadline:
    ev = sub.recv(10)
    if ev is None:
        break
    if ev.event == "EVENTS_LOST":
        lost += ev.lost
    elif ev.event == "AGENT_EVENT":
        got += 1
        in_order = in_order and ev.data["i"] > last
        last = ev.data["i"]
        if got == n // 4:
            time.sleep(stall)  # mid-stream: everything published meanwhile piles up, then spills
print(got, lost, sub.recovered, in_order, flush=True)
"""
