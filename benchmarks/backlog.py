"""``python -m benchmarks --backlog``: what a backlog of pending agents costs placement.

Each case registers trivial thread agents at once on 2 workers and times them until all ended,
beside the floor's dispatch throughput in the same run (floor.py).  A pass that looked at every
pending agent made each of these quadratic (pyorchestrate/pending.py has the figures before)."""

from __future__ import annotations

import time

from . import agents, floor
from .ours import Cluster

#: name -> (what, the Cluster's worker arguments and settings, how each agent is registered)
CASES = {
    "capacity": ("over 2 workers of --capacity 20", ("--capacity", "20"), {}, {}),
    "max_workers": ("under max_workers=40", (), {"max_workers": 40}, {}),
    "pinned": ("pinned to one worker of --capacity 20", ("--capacity", "20"), {}, {"worker": "b0"}),
}


def _timed(cluster: Cluster, n: int, done_before: int, **how) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        cluster.orch.register_agent(agents.Trivial, f"t{i}", **how)
    cluster.wait("AGENT_TERMINATED", done_before + n, timeout=600)
    return time.perf_counter() - t0


def case(name: str, n: int) -> dict:
    what, worker_args, settings, how = CASES[name]
    cluster = Cluster(2, worker_args=worker_args, **settings)
    try:
        cluster.orch.register_agent(agents.Trivial, "warm")
        cluster.wait("AGENT_TERMINATED", 1)
        seconds = _timed(cluster, n, 1, **how)
    finally:
        cluster.close()
    return {"what": f"{n:,} agents {what}", "per_s": round(n / seconds), "seconds": round(seconds, 2)}


def beside_waiting(n: int, waiting: int) -> dict:
    """``n`` agents while ``waiting`` others wait for a dependency that never starts (pinned to a
    worker that never joins)."""
    cluster = Cluster(2)
    try:
        cluster.orch.register_agent(agents.Trivial, "setup", worker="nowhere")
        cluster.orch.register_agent(agents.Trivial, "warm")
        cluster.wait("AGENT_TERMINATED", 1)
        for i in range(waiting):
            cluster.orch.register_agent(agents.Trivial, f"d{i}", depends_on=["setup"])
        seconds = _timed(cluster, n, 1)
    finally:
        cluster.close()
    return {"what": f"{n:,} agents beside {waiting:,} waiting for a dependency that never starts",
            "per_s": round(n / seconds), "seconds": round(seconds, 2)}


def fan_out(n: int) -> dict:
    """``n`` agents that depend on one setup agent, over 2 workers of ``--capacity 20``: once setup
    has finished, all are ready to go and most wait for room."""
    cluster = Cluster(2, worker_args=("--capacity", "20"))
    try:
        cluster.orch.register_agent(agents.Trivial, "warm")
        cluster.wait("AGENT_TERMINATED", 1)
        t0 = time.perf_counter()
        cluster.orch.register_agent(agents.Trivial, "setup")
        for i in range(n):
            cluster.orch.register_agent(agents.Trivial, f"f{i}", depends_on=["setup"])
        cluster.wait("AGENT_TERMINATED", n + 2, timeout=600)
        seconds = time.perf_counter() - t0
    finally:
        cluster.close()
    return {"what": f"{n:,} agents that depend on one setup agent, over 2 workers of --capacity 20",
            "per_s": round(n / seconds), "seconds": round(seconds, 2)}


def pairs(n: int) -> dict:
    """``n`` pairs registered at once on 2 workers: ``a{i}``, and ``b{i}`` that depends on it
    (agents woken by their dependency's changes while thousands wait for a pass)."""
    cluster = Cluster(2)
    try:
        cluster.orch.register_agent(agents.Trivial, "warm")
        cluster.wait("AGENT_TERMINATED", 1)
        t0 = time.perf_counter()
        for i in range(n):
            cluster.orch.register_agent(agents.Trivial, f"a{i}")
            cluster.orch.register_agent(agents.Trivial, f"b{i}", depends_on=[f"a{i}"])
        cluster.wait("AGENT_TERMINATED", 2 * n + 1, timeout=600)
        seconds = time.perf_counter() - t0
    finally:
        cluster.close()
    return {"what": f"{n:,} pairs, one agent of each depending on the other", "per_s": round(2 * n / seconds),
            "seconds": round(seconds, 2)}


def run(n: int) -> dict[str, dict]:
    """Every case with ``n`` agents (the one beside waiting agents: n/10 beside n), and the floor."""
    out = {"floor": floor.dispatch(50, max(1000, n))[1]}
    for name in CASES:
        out[name] = case(name, n)
    out["beside_waiting"] = beside_waiting(max(1, n // 10), n)
    out["fan_out"] = fan_out(n)
    out["pairs"] = pairs(n // 2)
    for key, value in out.items():
        if key != "floor":
            value["floor_ratio"] = round(value["per_s"] / out["floor"]["per_s"], 3)
    return out


def table(results: dict[str, dict]) -> str:
    rows = [f"floor: dispatch {results['floor']['per_s']:,}/s"]
    rows += [f"{key:<15} {value['per_s']:>8,}/s  {value['floor_ratio']:>6.1%} of the floor  {value['what']}"
             for key, value in results.items() if key != "floor"]
    return "\n".join(rows)
