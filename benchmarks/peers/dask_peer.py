"""Dask distributed, the same scenarios as closely as it allows: a LocalCluster of worker
processes (one thread each) on 127.0.0.1, ``submit`` for launches, actors for long-lived units,
``log_event``/``subscribe_topic`` for the event stream."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

from ..stats import count, rss_mb
from .common import WAIT_CAP, Results, detected, main, rate, stopwatch, timed, until

HUNG_CAP = 30.0  # dask's default worker-ttl is 5 minutes: waiting that long is not informative


def trivial(i: int = 0) -> int:
    return i


class Idle:
    def ping(self) -> int:
        return 1


def _emit(n: int) -> int:
    from distributed import get_worker

    worker = get_worker()
    for i in range(n):
        worker.log_event("bench", {"i": i, "v": 1.5})
    return n


def _cluster(workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=":0", silence_logs=logging.CRITICAL)
    client = Client(cluster)
    client.wait_for_workers(workers, timeout=WAIT_CAP)
    return cluster, client


def _close(cluster, client) -> None:
    try:
        client.close(timeout=10)
    finally:
        cluster.close(timeout=10)


def run(results: Results, quick: bool, scale: float) -> None:
    with results.scenario("S1", "LocalCluster: scheduler in this process, 2 worker processes with nannies") as out, \
            stopwatch(out):
        cluster, client = _cluster(2)
    try:
        reps = count(200, 30, quick, scale)
        with results.scenario("S2.thread", "a task (submit(...).result()) on a worker's thread pool, "
                                           "not a new thread per unit") as out:
            out.update(timed(lambda i: client.submit(trivial, i, pure=False).result(timeout=WAIT_CAP), reps))
        results.skip("S2.process", "dask runs tasks and actors in its worker processes' threads; "
                                   "it starts no process per unit")
        with results.scenario("S2.actor", "create an actor, call it once") as out:
            def launch(_: int) -> None:
                actor = client.submit(Idle, actor=True, pure=False).result(timeout=WAIT_CAP)
                actor.ping().result(timeout=WAIT_CAP)

            out.update(timed(launch, reps))
        n = count(2000, 300, quick, scale)
        with results.scenario("S3", "tasks (submit, then gather)") as out:
            out.update(rate(lambda n: client.gather([client.submit(trivial, i, pure=False) for i in range(n)]), n))
        n = count(100, 20, quick, scale)
        with results.scenario("S4.thread", "actors (objects on a worker thread), created and each called once") as out:
            t0 = time.perf_counter()
            actors = client.gather([client.submit(Idle, actor=True, pure=False) for _ in range(n)])
            for future in [a.ping() for a in actors]:
                future.result(timeout=WAIT_CAP)
            out.update({"seconds": round(time.perf_counter() - t0, 3), "n": n})
            del actors
        results.skip("S4.process", "no process-per-unit variant")
        n = count(100_000, 20_000, quick, scale)
        with results.scenario("S5", "worker.log_event -> scheduler -> client.subscribe_topic (dask 2026 has "
                                    "no Pub/Sub any more; this is its replacement); subscriber is this process") as out:
            got, first, last = [0], [0.0], [0.0]
            done = threading.Event()

            def handler(event) -> None:
                now = time.perf_counter()
                if got[0] == 0:
                    first[0] = now
                got[0] += 1
                last[0] = now
                if got[0] >= n:
                    done.set()

            client.subscribe_topic("bench", handler)
            client.run_on_scheduler(lambda: 1)  # the subscription has reached the scheduler
            client.submit(_emit, n, pure=False).result(timeout=WAIT_CAP)
            done.wait(WAIT_CAP)
            time.sleep(0.5)  # stragglers
            seconds = last[0] - first[0]
            out.update({"per_s": round(got[0] / seconds) if seconds else 0, "lost": n - got[0], "n": n})
            client.unsubscribe_topic("bench")
        with results.scenario("S7", "RSS of one idle worker process (its nanny not counted)") as out:
            pid = next(iter(client.run(os.getpid).values()))
            out["rss_mb"] = rss_mb(pid)
    finally:
        _close(cluster, client)
    _detection(results, quick)


def _detection(results: Results, quick: bool) -> None:
    import dask

    cases = [("S6.kill", signal.SIGKILL, {}, WAIT_CAP, "defaults; a closed connection"),
             ("S6.hung.fast", signal.SIGSTOP, {"distributed.scheduler.worker-ttl": "0.5s"}, HUNG_CAP,
              "worker-ttl=0.5s, which dask raises to 10 heartbeats (5 s)")]
    if not quick:
        cases.append(("S6.hung.default", signal.SIGSTOP, {}, HUNG_CAP, "defaults: worker-ttl 5 minutes"))
    for key, sig, settings, cap, differs in cases:
        with results.scenario(key, differs) as out, dask.config.set(settings):  # for this case only
            cluster, client = _cluster(2)
            victim = None
            try:
                address, victim = next(iter(client.run(os.getpid).items()))
                workers = cluster.scheduler.workers
                time.sleep(1.0)
                os.kill(victim, sig)
                out.update(detected(until(lambda: address not in workers, cap), cap))
            finally:
                if victim is not None:
                    with contextlib.suppress(ProcessLookupError):  # its nanny may have ended it
                        os.kill(victim, signal.SIGKILL)
                _close(cluster, client)
    results.skip("S6.process_agent", "dask starts no process per unit (a killed worker is S6.kill)")


if __name__ == "__main__":
    from importlib import metadata

    raise SystemExit(main("dask", run, {"dask": metadata.version("dask"),
                                        "distributed": metadata.version("distributed")}))
