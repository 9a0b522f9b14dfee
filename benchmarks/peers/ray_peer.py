"""Ray, the same scenarios as closely as it allows: a local node with 2 CPUs on 127.0.0.1, tasks
for launches, actors for long-lived units and per-unit processes, an actor's streaming generator
for the event stream, and a two-node cluster (``ray.cluster_utils``) for failure detection."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from ..stats import count, rss_mb
from .common import WAIT_CAP, Results, detected, main, rate, stopwatch, timed, until

_QUIET = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
FAST = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 100, "health_check_timeout_ms": 100,
        "health_check_failure_threshold": 5}


def _remote():
    """Ray's decorated task and actors (defined after import, so this module loads without Ray)."""
    import ray

    @ray.remote
    def trivial(i: int = 0) -> int:
        return i

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> int:
            return 1

        def pid(self) -> int:
            return os.getpid()

        def snooze(self, seconds: float) -> None:
            time.sleep(seconds)

    @ray.remote(num_cpus=0)
    class Emitter:
        def stream(self, n: int):
            for i in range(n):
                yield {"i": i, "v": 1.5}

    return trivial, Idle, Emitter


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def run(results: Results, quick: bool, scale: float) -> None:
    import ray

    trivial, Idle, Emitter = _remote()
    with results.scenario("S1", "ray.init: one node (GCS + raylet), num_cpus=2, until a first task has run") as out, \
            stopwatch(out):
        ray.init(num_cpus=2, **_QUIET)
        ray.get(trivial.remote(), timeout=WAIT_CAP)
    try:
        reps = count(200, 30, quick, scale)
        with results.scenario("S2.thread", "a task (in a pooled worker process), submit -> result") as out:
            out.update(timed(lambda i: ray.get(trivial.remote(i), timeout=WAIT_CAP), reps))
        reps = count(50, 10, quick, scale)
        with results.scenario("S2.process", "an actor (its own worker process) created, called once, killed") as out:
            def launch(_: int) -> None:
                actor = Idle.remote()
                ray.get(actor.ping.remote(), timeout=WAIT_CAP)
                ray.kill(actor)  # asynchronous: it returns at once

            out.update(timed(launch, reps, warmup=3))
        n = count(2000, 300, quick, scale)
        with results.scenario("S3", "tasks, submitted then all awaited") as out:
            out.update(rate(lambda n: ray.get([trivial.remote(i) for i in range(n)], timeout=WAIT_CAP), n))
        with results.scenario("S3.actor", "method calls on 2 existing actors (not new units)") as out:
            actors = [Idle.remote() for _ in range(2)]
            ray.get([a.ping.remote() for a in actors], timeout=WAIT_CAP)
            out.update(rate(lambda n: ray.get([actors[i % 2].ping.remote() for i in range(n)], timeout=WAIT_CAP), n))
            for a in actors:
                ray.kill(a)
        results.skip("S4.thread", "Ray starts a process per actor; there is no thread variant")
        n = count(100, 20, quick, scale)
        with results.scenario("S4.process", "actors (num_cpus=0), created and each called once") as out:
            t0 = time.perf_counter()
            actors = [Idle.remote() for _ in range(n)]
            ray.get([a.ping.remote() for a in actors], timeout=max(WAIT_CAP, 2.0 * n))
            out.update({"seconds": round(time.perf_counter() - t0, 3), "n": n})
            for a in actors:
                ray.kill(a)
        n = count(100_000, 20_000, quick, scale)
        with results.scenario("S5", "an actor's streaming generator, consumed by this process") as out:
            emitter = Emitter.remote()
            got, first, last = 0, 0.0, 0.0
            deadline = time.perf_counter() + WAIT_CAP
            for ref in emitter.stream.options(num_returns="streaming").remote(n):
                ray.get(ref)
                last = time.perf_counter()
                first = first or last
                got += 1
                if last > deadline:
                    out["stopped_after_s"] = WAIT_CAP
                    break
            seconds = last - first
            out.update({"per_s": round(got / seconds) if seconds else 0, "lost": n - got, "n": n})
            ray.kill(emitter)
        with results.scenario("S6.process_agent", "SIGKILL an actor's process during a call -> the call's error") as out:
            actor = Idle.remote()
            pid = ray.get(actor.pid.remote(), timeout=WAIT_CAP)
            call = actor.snooze.remote(60)
            time.sleep(0.5)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                ray.get(call, timeout=WAIT_CAP)
            except ray.exceptions.RayError:
                out["seconds"] = round(time.perf_counter() - t0, 4)
        with results.scenario("S7", "RSS of the idle node's raylet (its pooled workers not counted)") as out:
            out["rss_mb"] = rss_mb(_raylet_pid(ray._private.worker._global_node))
    finally:
        ray.shutdown()
    cases = [("S6.kill", signal.SIGKILL, {}, WAIT_CAP, "SIGKILL a second node's raylet, defaults"),
             ("S6.hung.fast", signal.SIGSTOP, FAST, WAIT_CAP,
              "SIGSTOP a second node's raylet, health check every 100 ms, 5 failures")]
    if not quick:
        cases.append(("S6.hung.default", signal.SIGSTOP, {}, WAIT_CAP,
                      "SIGSTOP a second node's raylet, defaults (3 s period, 10 s timeout, 5 failures)"))
    for key, sig, system_config, cap, differs in cases:
        with results.scenario(key, differs) as out:
            out.update(_detect(sig, system_config, cap))


def _detect(sig: int, system_config: dict, cap: float) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    head_args: dict = {"num_cpus": 0, "include_dashboard": False}
    if system_config:
        head_args["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    victim = None
    try:
        node = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        node_id = node.node_id
        victim = _raylet_pid(node)
        time.sleep(1.0)

        def dead() -> bool:
            return any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes())

        os.kill(victim, sig)
        return detected(until(dead, cap, poll=0.02), cap)
    finally:
        if victim is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    from importlib import metadata

    raise SystemExit(main("ray", run, {"ray": metadata.version("ray")}))
