"""What every peer's scenarios share: argument parsing, one result per scenario (an error in one
is recorded and the others go on), bounded waits, and the process facts we report."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..stats import latency

#: the longest any single wait in a peer scenario may take
WAIT_CAP = 90.0


class Results:
    """The scenarios one peer ran, in the shape ``python -m benchmarks --json`` writes."""

    def __init__(self, peer: str, versions: dict[str, str]) -> None:
        self.peer = peer
        self.scenarios: dict[str, Any] = {}
        self.versions = versions

    @contextmanager
    def scenario(self, key: str, differs: str = "") -> Iterator[dict[str, Any]]:
        """Record what the block puts in the yielded dict under ``key``, or the error it raised."""
        out: dict[str, Any] = {}
        step = time.perf_counter()
        try:
            yield out
        except Exception as exc:  # a peer failing one scenario still reports the others
            out = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc(file=sys.stderr)
        if differs:
            out["differs"] = differs
        self.scenarios[key] = out
        print(f"  [{self.peer}] {key:<18} {json.dumps(out)}  ({time.perf_counter() - step:.1f} s)",
              file=sys.stderr, flush=True)

    def skip(self, key: str, why: str) -> None:
        self.scenarios[key] = {"not_run": why}


def until(predicate: Callable[[], bool], timeout: float, poll: float = 0.005) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate():
            return time.perf_counter() - t0
        time.sleep(poll)
    return None


def detected(seconds: float | None, cap: float) -> dict[str, Any]:
    """A detection time, or the fact that there was none within ``cap`` seconds."""
    if seconds is None:
        return {"seconds": None, "not_within_s": cap}
    return {"seconds": round(seconds, 3)}


def main(peer: str, run: Callable[[Results, bool, float], None], versions: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.peers.{peer}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", metavar="FILE", required=True)
    args = parser.parse_args()
    results = Results(peer, versions)
    try:
        run(results, args.quick, args.scale)
    finally:
        with open(args.json, "w") as f:
            json.dump({"versions": results.versions, "scenarios": results.scenarios}, f, indent=2)
    return 0


@contextmanager
def stopwatch(out: dict[str, Any]) -> Iterator[None]:
    """Put the block's duration in ``out["seconds"]``."""
    t0 = time.perf_counter()
    yield
    out["seconds"] = round(time.perf_counter() - t0, 3)


def timed(call: Callable[[int], Any], reps: int, warmup: int = 10) -> dict[str, float]:
    """Median and p99 of ``call(i)`` over ``reps`` calls after ``warmup`` untimed ones."""
    samples = []
    for i in range(reps + warmup):
        t0 = time.perf_counter()
        call(i)
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return latency(samples)


def rate(run_all: Callable[[int], Any], n: int) -> dict[str, float]:
    """Units per second of ``run_all(n)``, which starts ``n`` units and waits for them all."""
    t0 = time.perf_counter()
    run_all(n)
    seconds = time.perf_counter() - t0
    return {"per_s": round(n / seconds), "n": n, "seconds": round(seconds, 3)}
