"""``python -m benchmarks --backlog``: what a backlog of pending agents costs placement.

Each case registers trivial thread agents at once on 2 workers and times them until all ended,
beside the floor's dispatch throughput in the same run (floor.py).  A pass that looked at every
pending agent made each of these quadratic (pyorchestrate/pending.py has the figures before)."""

from __future__ import annotations

import time
from typing import Any, Callable

from . import agents, floor
from .ours import Cluster

#: name -> (what, the Cluster's worker arguments and settings, how each agent is registered)
CASES = {
    "capacity": ("over 2 workers of --capacity 20", ("--capacity", "20"), {}, {}),
    "max_workers": ("under max_workers=40", (), {"max_workers": 40}, {}),
    "pinned": ("pinned to one worker of --capacity 20", ("--capacity", "20"), {}, {"worker": "b0"}),
}


def _timed(register: Callable[[Cluster], int], worker_args: tuple[str, ...] = (), before: Callable[[Cluster], None] | None = None,
           **settings: Any) -> float:
    """Seconds from ``register(cluster)`` (which registers agents and returns how many will end)
    until all of them ended, on a fresh cluster of 2 workers, after a warm-up agent shipped the
    class (and ``before``: what it registers then, untimed)."""
    cluster = Cluster(2, worker_args=worker_args, **settings)
    try:
        cluster.orch.register_agent(agents.Trivial, "warm")
        cluster.wait("AGENT_TERMINATED", 1)
        if before is not None:
            before(cluster)
        t0 = time.perf_counter()
        ends = register(cluster)
        cluster.wait("AGENT_TERMINATED", 1 + ends, timeout=600)
        return time.perf_counter() - t0
    finally:
        cluster.close()


def _trivial(n: int, prefix: str = "t", **how: Any) -> Callable[[Cluster], int]:
    def register(cluster: Cluster) -> int:
        for i in range(n):
            cluster.orch.register_agent(agents.Trivial, f"{prefix}{i}", **how)
        return n
    return register


def _result(what: str, n: int, seconds: float) -> dict:
    return {"what": what, "per_s": round(n / seconds), "seconds": round(seconds, 2)}


def case(name: str, n: int) -> dict:
    what, worker_args, settings, how = CASES[name]
    return _result(f"{n:,} agents {what}", n, _timed(_trivial(n, **how), worker_args, **settings))


def beside_waiting(n: int, waiting: int) -> dict:
    """``n`` agents while ``waiting`` others wait for a dependency that never starts (pinned to a
    worker that never joins)."""
    def waiters(cluster: Cluster) -> None:
        cluster.orch.register_agent(agents.Trivial, "setup", worker="nowhere")
        _trivial(waiting, "d", depends_on=["setup"])(cluster)

    seconds = _timed(_trivial(n), before=waiters)
    return _result(f"{n:,} agents beside {waiting:,} waiting for a dependency that never starts", n, seconds)


def fan_out(n: int) -> dict:
    """``n`` agents that depend on one setup agent, over 2 workers of ``--capacity 20``: once setup
    has finished, all are ready to go and most wait for room."""
    def register(cluster: Cluster) -> int:
        cluster.orch.register_agent(agents.Trivial, "setup")
        return 1 + _trivial(n, "f", depends_on=["setup"])(cluster)

    seconds = _timed(register, ("--capacity", "20"))
    return _result(f"{n:,} agents that depend on one setup agent, over 2 workers of --capacity 20", n, seconds)


def pairs(n: int) -> dict:
    """``n`` pairs registered at once on 2 workers: ``a{i}``, and ``b{i}`` that depends on it
    (agents woken by their dependency's changes while thousands wait for a pass)."""
    def register(cluster: Cluster) -> int:
        for i in range(n):
            cluster.orch.register_agent(agents.Trivial, f"a{i}")
            cluster.orch.register_agent(agents.Trivial, f"b{i}", depends_on=[f"a{i}"])
        return 2 * n

    return _result(f"{n:,} pairs, one agent of each depending on the other", 2 * n, _timed(register))


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
