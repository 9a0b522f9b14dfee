"""A bounded, seeded run of network partitions on the multi-host tier, and the guarantees that
must hold through all of them.

A coordinator and three workers, each in its own network namespace on one bridge (see
test_partition_netns.py).  The faults, one after the other at random (seeded): a worker's link cut
for 0.3-4 s (the liveness window is 1 s: short cuts are missed heartbeats, long ones a worker lost
and its copies replaced), two workers' links cut at once, the coordinator's link cut (every
worker cut off from it at once: their leases run out together), a link that flaps (cut and
healed five times in 2 s), and the coordinator SIGKILLed and started again while a worker is cut
off (the new one must not start what that worker may still run).  Every copy of every agent
writes its start and each cycle to a file of its agent's (CopyTracer) in a directory all
namespaces share, on one host clock.

Seeds 1-14 (10-12 faults) pass.  It fails (seeds 1 and 2) with all three of the worker's own
defences off: the stop at the lease, each loop's hold past the lease and stop timeout, and the
exec that ends thread agents stuck past them.  With the stop at the lease off it passed, and with
the hold off too (the exec ended what they left).

Then, once the links are healed: every agent with a restart policy runs exactly one copy again,
and no two copies of one agent ever worked at the same time.  ``PYORCHESTRATE_CHAOS_SEED`` and
``PYORCHESTRATE_CHAOS_STEPS`` (8 by default) repeat or lengthen a run.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import pytest
from agents import copy_spans
from conftest import wait_for
from test_chaos_mixed import _live, settle_and_check
from test_partition_netns import net  # noqa: F401 (the fixture: a bridge for the namespaces, removed after)

TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = int(os.environ.get("PYORCHESTRATE_CHAOS_STEPS", "8"))
WORKERS = ("w1", "w2", "w3")

SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from agents import CopyTracer, CopyTracerProcess
from pyorchestrate import Orchestrator, RunMode

o = Orchestrator("cut", address={address!r}, insecure=True, run_mode=RunMode.DAEMON, min_workers=3,
                 heartbeat_interval=0.1, heartbeat_liveness=10)
fast = dict(restart="always", max_restarts=-1, restart_backoff=(0.1, 0.5))
for name, stop in (("t0", 0.5), ("t1", 0.5), ("t2", 2.0), ("t3", 2.0)):
    o.register_agent(CopyTracer, name, CopyTracer.Config(trace={ledger!r} + "/" + name, stop_timeout=stop), **fast)
o.register_agent(CopyTracerProcess, "p0", CopyTracerProcess.Config(trace={ledger!r} + "/p0", stop_timeout=0.5),
                 **fast)
o.register_agent(CopyTracerProcess, "p1", CopyTracerProcess.Config(trace={ledger!r} + "/p1", stop_timeout=2.0),
                 **fast)
o.start()
time.sleep(900)
"""
RESTARTED = ("t0", "t1", "t2", "t3", "p0", "p1")


@pytest.mark.timeout(300)
def test_seeded_partitions_never_leave_two_working_copies_and_every_agent_runs_once_after(tmp_path, net):
    seed = int(os.environ.get("PYORCHESTRATE_CHAOS_SEED", "1"))
    rng = random.Random(seed)
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    coordinator = net.host("c")
    for name in WORKERS:
        net.host(name)
    address = f"tcp://{coordinator}:25620"
    path = tmp_path / "coordinator.py"
    path.write_text(SCRIPT.format(tests=TESTS, address=address, ledger=str(ledger)))
    coordinator_proc = net.spawn("c", [sys.executable, str(path)], tmp_path / "coordinator.log")
    for name in WORKERS:
        net.spawn(name, [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", address, "--name", name],
                  tmp_path / f"{name}.log")
    journal: list[str] = []
    cut: set[str] = set()

    def set_cut(names: list[str], on: bool) -> None:
        for name in names:
            net.cut(name, on)
            (cut.add if on else cut.discard)(name)

    try:
        wait_for(lambda: all(len(_live(ledger).get(name, [])) == 1 for name in RESTARTED), 90,
                 "every agent running before the faults")
        for _ in range(STEPS):
            fault = rng.choice(["worker", "worker", "two workers", "coordinator", "flap", "restart"])
            seconds = round(rng.uniform(0.3, 4.0), 2)
            if fault in ("worker", "restart"):
                names = [rng.choice(WORKERS)]
            elif fault == "two workers":
                names = rng.sample(WORKERS, 2)
            elif fault == "coordinator":
                names = ["c"]
            else:
                names, seconds = [rng.choice(WORKERS)], 2.0
            journal.append(f"{fault} {'+'.join(names)} {seconds}")
            if fault == "flap":
                for _ in range(5):
                    set_cut(names, True)
                    time.sleep(rng.uniform(0.1, 0.3))
                    set_cut(names, False)
                    time.sleep(rng.uniform(0.05, 0.2))
            elif fault == "restart":  # the coordinator SIGKILLed and started again while a worker is cut off
                set_cut(names, True)
                time.sleep(rng.uniform(0.0, 1.0))
                os.killpg(coordinator_proc.pid, signal.SIGKILL)
                coordinator_proc.wait(10)
                coordinator_proc = net.spawn("c", [sys.executable, str(path)],
                                             tmp_path / f"coordinator-{len(journal)}.log")
                time.sleep(seconds)
                set_cut(names, False)
            else:
                set_cut(names, True)
                time.sleep(seconds)
                set_cut(names, False)
            time.sleep(rng.uniform(0.2, 1.5))

        settle_and_check(ledger, RESTARTED, 90, f"seed {seed}, faults {journal}")
        copies = {p.name: len(copy_spans(p)) for p in ledger.iterdir()}
        print(f"partitions: seed {seed}, {len(journal)} faults: {journal}; copies {copies}")
    finally:
        set_cut(sorted(cut), False)
