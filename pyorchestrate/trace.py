"""Per-hop timestamps of agent launches: where one launch's time goes (``python -m benchmarks
--trace``).

Off unless ``PYORCHESTRATE_TRACE`` names a directory (or :func:`enable` is called); callers test
:data:`enabled` before calling :func:`mark`, so a launch pays one global read per hop when off.
Every process on the path (the script with its coordinator, each worker) keeps its marks in
memory and writes them to ``<dir>/<pid>.trace`` at exit; :func:`collect` merges them.  Marks use
``time.perf_counter_ns()``, which on Linux is CLOCK_MONOTONIC: one clock for every process on the
host, so hops between processes subtract correctly.
"""

from __future__ import annotations

import atexit
import os
import statistics
import time
from collections import defaultdict

import msgpack

ENV = "PYORCHESTRATE_TRACE"

#: the hops of one launch, in the order they happen
HOPS = (
    ("register", "register_agent called (user thread)"),
    ("queued", "registered: validated, pickled, in the mailbox"),
    ("loop", "the coordinator's loop took it"),
    ("sent", "placed, start frame sent"),
    ("received", "worker loop decoded the start"),
    ("handed", "worker: agent built, handed to a thread"),
    ("running", "agent thread runs"),
    ("ended", "agent reported TERMINATED"),
    ("flushed", "worker loop sent the report"),
    ("reported", "coordinator decoded the report"),
    ("published", "TERMINATED published and dispatched"),
    ("callback", "callback runs (pool thread)"),
    ("woke", "the waiting user thread woke"),
)

_dir = os.environ.get(ENV, "")
enabled = bool(_dir)
_marks: list[tuple[str, str, int]] = []


def enable(directory: str) -> None:
    """Trace in this process and (through the environment) in processes started after this."""
    global _dir, enabled
    os.makedirs(directory, exist_ok=True)
    os.environ[ENV] = _dir = directory
    enabled = True


def mark(hop: str, agent: str) -> None:
    _marks.append((hop, agent, time.perf_counter_ns()))


def sent(frame: bytes) -> None:
    """Mark a start frame the coordinator just sent (decoded here: only while tracing)."""
    t = time.perf_counter_ns()
    message = msgpack.unpackb(frame, raw=False)
    if message.get("type") == "starts":
        _marks.extend(("sent", item["agent"], t) for item in message["agents"])


def ends(hop: str, events: list[dict]) -> None:
    """Mark ``hop`` for the ends among agent reports (a worker's sent ones: ``flushed``; the
    coordinator's decoded ones: ``reported``)."""
    t = time.perf_counter_ns()
    _marks.extend((hop, item["agent"], t) for item in events if item.get("event") == "AGENT_TERMINATED")


def write() -> None:
    """Write this process's marks now (also done at exit; a second write replaces the first)."""
    if enabled and _marks and _dir:
        with open(os.path.join(_dir, f"{os.getpid()}.trace"), "w") as f:
            f.writelines(f"{hop} {agent} {t}\n" for hop, agent, t in _marks)


atexit.register(write)


def collect(directory: str) -> dict[str, dict[str, int]]:
    """Every agent's marks, this process's and those the other processes wrote: agent -> hop -> ns
    (the first mark of a hop wins: a restart's second run is not mixed in)."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    lines = list(_marks)
    for entry in os.listdir(directory):
        if entry.endswith(".trace") and entry != f"{os.getpid()}.trace":
            with open(os.path.join(directory, entry)) as f:
                lines += [(h, a, int(t)) for h, a, t in (line.split() for line in f)]
    for hop, agent, t in lines:
        out[agent].setdefault(hop, t)
    return dict(out)


def hop_table(marks: dict[str, dict[str, int]]) -> list[dict[str, object]]:
    """Median microseconds of each hop over the agents that have both ends of it."""
    rows = []
    names = [h for h, _ in HOPS]
    for before, (hop, what) in zip(names, HOPS[1:]):
        deltas = [(m[hop] - m[before]) / 1000 for m in marks.values() if hop in m and before in m]
        if deltas:
            rows.append({"hop": f"{before} -> {hop}", "what": what, "median_us": round(statistics.median(deltas), 1),
                         "n": len(deltas)})
    totals = [(m["woke"] - m["register"]) / 1000 for m in marks.values() if "woke" in m and "register" in m]
    if totals:
        rows.append({"hop": "register -> woke", "what": "the whole launch", "median_us": round(statistics.median(totals), 1),
                     "n": len(totals)})
    return rows
