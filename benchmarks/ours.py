"""Our scenarios (S1-S8), on 127.0.0.1: an in-process coordinator, worker processes, and a
subscriber process.  Every loop is bounded in count and time; every process is cleaned up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

from . import agents
from .stats import cpu_seconds, latency, rss_mb, session_members

TIMEOUT = 120.0


class Cluster:
    """A DAEMON orchestrator plus worker processes, with event counters to wait on."""

    def __init__(self, workers: int, worker_args: tuple[str, ...] = (), **settings: Any) -> None:
        settings = {"address": "tcp://127.0.0.1:*", "run_mode": RunMode.DAEMON, "log_level": "WARNING",
                    "min_workers": workers, **settings}
        self.orch = Orchestrator("bench", config=Orchestrator.Config(**settings))
        self.counts: dict[str, int] = defaultdict(int)
        self.times: dict[tuple[str, str], float] = {}
        self.cond = threading.Condition()
        for event in (OrchestratorEvent.AGENT_STARTED, OrchestratorEvent.AGENT_READY, OrchestratorEvent.AGENT_TERMINATED, OrchestratorEvent.AGENT_ERROR,
                      OrchestratorEvent.WORKER_JOINED, OrchestratorEvent.WORKER_LOST):
            self.orch.register_event(event, self._record)
        self.orch.start()
        self.procs: list[subprocess.Popen] = []
        self.worker_args = worker_args
        self.started: dict[str, int] = defaultdict(int)
        self.add_workers(workers)

    def _record(self, event: str, agent_name: str | None = None, worker: str | None = None) -> None:
        with self.cond:
            self.counts[event] += 1
            if event == "AGENT_STARTED" and agent_name:
                self.started[agent_name] += 1
            self.times[(event, agent_name or worker or "")] = time.perf_counter()
            self.cond.notify_all()

    def add_workers(self, n: int) -> None:
        start = len(self.procs)
        for i in range(start, start + n):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", self.orch.address, "--name", f"b{i}",
                 "--log-level", "ERROR", *self.worker_args], start_new_session=True, stdout=subprocess.DEVNULL))
        self.wait("WORKER_JOINED", start + n)

    def wait(self, event: str, count: int, timeout: float = TIMEOUT) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.counts[event] >= count, timeout):
                raise TimeoutError(f"{event}: {self.counts[event]} of {count} within {timeout} s")

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


def s2_launch(reps: int) -> dict[str, dict]:
    cluster = Cluster(2)
    out = {}
    try:
        for variant, cls in (("thread", agents.Trivial), ("process", agents.TrivialProcess)):
            samples = []
            for i in range(reps + 10):
                done = cluster.counts["AGENT_TERMINATED"]
                t0 = time.perf_counter()
                cluster.orch.register_agent(cls, f"{variant}{i}")
                cluster.wait("AGENT_TERMINATED", done + 1)
                if i >= 10:  # warm-up: the first launches ship the class and start the forkserver
                    samples.append(time.perf_counter() - t0)
            out[variant] = latency(samples)
    finally:
        cluster.close()
    return out


def s3_throughput(n: int) -> dict:
    cluster = Cluster(2)
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
with EventSubscriber(sys.argv[1], topics=["AGENT_EVENT.bench"]) as sub:
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


def s5_event_bus(n: int) -> dict:
    cluster = Cluster(1)
    try:
        sub = subprocess.Popen([sys.executable, "-c", _SUBSCRIBER, cluster.orch.events_address, str(n)],
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


def s9_scale(workers: int, n: int, capacity: int = 20) -> dict:
    """n agents that each log 10 lines and publish 10 events, on ``workers`` with --capacity."""
    cluster = Cluster(workers, worker_args=("--capacity", str(capacity)))
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
    return {"seconds": round(seconds, 2), "agents": n, "workers": workers, "capacity": capacity,
            "executions_min": min(runs), "executions_max": max(runs), "errors": cluster.counts["AGENT_ERROR"],
            "worker_lost": cluster.counts["WORKER_LOST"], "rss_mb": round(sampler.rss_peak, 1),
            "status_ms_max": round(max(sampler.status_ms, default=0.0), 1),
            "lost_events": status["lost_events"], "dropped": status["dropped"]}
