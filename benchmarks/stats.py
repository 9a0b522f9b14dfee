"""Small helpers: percentiles and the process facts the scenarios report."""

from __future__ import annotations

import os
import statistics


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
