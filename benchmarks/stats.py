"""Small helpers: percentiles and the process facts the scenarios report."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def count(full: int, fast: int, quick: bool, scale: float) -> int:
    """How many of something a scenario runs: ``full`` or (``--quick``) ``fast``, times ``--scale``."""
    return max(2, int((fast if quick else full) * scale))


def latency(samples_s: list[float]) -> dict[str, float]:
    """median and p99 of durations in seconds, as microseconds."""
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"median_us": round(statistics.median(ordered) * 1e6, 1), "p99_us": round(p99 * 1e6, 1),
            "n": len(ordered)}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def process_cpu(pids: list[int]) -> int:
    """Nanoseconds of CPU the live threads of processes ``pids`` ran so far (ZeroMQ's I/O
    threads too), from the scheduler's own count (/proc/PID/task/*/schedstat): exact, where
    /proc/PID/stat counts in 10 ms ticks.  0 for what /proc does not show."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended meanwhile
    return total


def cpu_per_launch(before: tuple[int, int], after: tuple[int, int], launches: int) -> dict[str, float]:
    """µs of CPU per launch between two readings of ``(coordinator, workers)`` :func:`process_cpu`:
    S2 runs one launch at a time, so this is the work on a launch's path, beside its latency."""
    return {"coordinator_cpu_us": round((after[0] - before[0]) / launches / 1e3, 1),
            "workers_cpu_us": round((after[1] - before[1]) / launches / 1e3, 1)}


def session_members(sid: int) -> list[int]:
    """Live processes in session ``sid`` (a worker started with its own session, and its children)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry))
    return members


def timed_launches(launch: Callable[[int], None], workers: list[int], reps: int, warm: int = 10) -> dict[str, float]:
    """S2's measure: ``launch(i)`` (launch one agent and wait for its end) ``warm`` times unmeasured
    (the first launches ship the class), then ``reps`` times: latency, and the CPU per launch of
    this process and of ``workers`` (pids)."""
    samples = []
    for i in range(reps + warm):
        if i == warm:
            cpu = process_cpu([os.getpid()]), process_cpu(workers)
        t0 = time.perf_counter()
        launch(i)
        if i >= warm:
            samples.append(time.perf_counter() - t0)
    return {**latency(samples), **cpu_per_launch(cpu, (process_cpu([os.getpid()]), process_cpu(workers)), reps)}
