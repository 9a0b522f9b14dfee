"""ipyparallel, the same scenarios as closely as it allows: a controller and 2 engines on
127.0.0.1, ``apply`` on a load-balanced view for launches, its heartbeat for a hung engine."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from ..stats import count, rss_mb
from .common import WAIT_CAP, Results, detected, main, rate, stopwatch, timed, until


def trivial(i: int = 0) -> int:
    return i


def _pid() -> int:
    import os

    return os.getpid()


def _snooze(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _cluster(engines: int, controller_args: list[str] | None = None):
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=engines, log_level=logging.CRITICAL, controller_ip="127.0.0.1",
                          controller_args=controller_args or [])
    client = cluster.start_and_connect_sync(activate=False)
    client.wait_for_engines(engines, timeout=WAIT_CAP)
    return cluster, client


def _close(cluster, client) -> None:
    try:
        client.close()
    finally:
        cluster.stop_cluster_sync()


def run(results: Results, quick: bool, scale: float) -> None:
    with results.scenario("S1", "a controller and 2 engine processes") as out, stopwatch(out):
        cluster, client = _cluster(2)
    try:
        view = client.load_balanced_view()
        reps = count(200, 30, quick, scale)
        with results.scenario("S2.thread", "apply_sync on a load-balanced view: a call in a running engine "
                                           "process, not a new thread per unit") as out:
            out.update(timed(lambda i: view.apply_sync(trivial, i), reps))
        results.skip("S2.process", "engines are started with the cluster; nothing starts a process per unit")
        n = count(2000, 300, quick, scale)
        with results.scenario("S3", "apply_async on a load-balanced view, then wait for all") as out:
            def run_all(n: int) -> None:
                for ar in [view.apply_async(trivial, i) for i in range(n)]:
                    ar.get(timeout=WAIT_CAP)

            out.update(rate(run_all, n))
        results.skip("S4.thread", "no long-lived unit other than an engine (a process per engine)")
        results.skip("S4.process", "no long-lived unit other than an engine (a process per engine)")
        results.skip("S5", "no event stream for user events (publish_data keeps only the latest value)")
        with results.scenario("S6.process_agent", "SIGKILL the engine running a task -> the task's EngineError") as out:
            pid = client[0].apply_sync(_pid)
            ar = client[0].apply_async(_snooze, 60)
            time.sleep(0.5)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                ar.get(timeout=WAIT_CAP)
            except Exception:  # noqa: BLE001 - EngineError is what we wait for
                out["seconds"] = round(time.perf_counter() - t0, 4)
        with results.scenario("S7", "RSS of one idle engine process") as out:
            alive = client.ids
            out["rss_mb"] = rss_mb(client[alive[-1]].apply_sync(_pid))
    finally:
        _close(cluster, client)
    cases = [("S6.kill", signal.SIGKILL, [], WAIT_CAP, "defaults; the engine's nanny reports its exit"),
             ("S6.hung.fast", signal.SIGSTOP,
              ["--HeartMonitor.period=100", "--HeartMonitor.max_heartmonitor_misses=5"], WAIT_CAP,
              "HeartMonitor.period=100 ms, max_heartmonitor_misses=5")]
    if not quick:
        cases.append(("S6.hung.default", signal.SIGSTOP, [], WAIT_CAP, "defaults: 3 s period, 10 misses"))
    for key, sig, args, cap, differs in cases:
        with results.scenario(key, differs) as out:
            cluster, client = _cluster(2, args)
            victim = None
            try:
                target = client.ids[0]
                victim = client[target].apply_sync(_pid)
                time.sleep(1.0)
                os.kill(victim, sig)
                out.update(detected(until(lambda: target not in client.ids, cap), cap))
            finally:
                if victim is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                _close(cluster, client)


if __name__ == "__main__":
    from importlib import metadata

    raise SystemExit(main("ipyparallel", run, {"ipyparallel": metadata.version("ipyparallel")}))
