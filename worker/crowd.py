"""How a worker process stays responsive with thousands of agent threads: the GIL switch
interval and the garbage collector, decided from counts (pure: no clock, no threads).

Two effects starve the worker's loop (its heartbeats, its lease) when one process runs thousands
of agent threads, and both were measured (10,000 ``wait_stop(1.0)`` agents per process, two such
processes on 2 cores):

* **The GIL herd.**  Every thread waiting for the GIL wakes once per switch interval to demand
  it.  At CPython's 5 ms, 10,000 threads never even finished starting in 60 s; at a fixed 50 ms a
  run still collapsed now and then.  The interval grows with the number of threads (20 µs each,
  200 ms at 10,000), capped at 1/25 of the liveness window so a CPU-bound agent can delay the
  loop by at most that much per hand-over.

* **Full garbage collections.**  Each running agent keeps ~100 objects the collector tracks; a
  full collection of a million of them holds the GIL for half a second or more, during which
  thousands of agent timers fall due and queue for the GIL: the herd again, and the loop is
  silent for 5-15 s (pure-thread model: worst heartbeat gap 15.2 s with those objects, 1.15 s
  without, 1.15 s with them frozen).  So while many agents run, what exists after a burst of
  starts is frozen (``gc.freeze()``: moved out of the collector's sight, O(1)).  Frozen objects
  that become cyclic garbage are only reclaimed after an unfreeze, so once as many frozen agents
  have ended as run now, the worker collects once and freezes again: one pause per that many
  endings, and memory stays bounded.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from pyorchestrate.collector import GcAction, apply  # noqa: F401 - the worker's policy acts the same way

#: below this many running agents nothing is tuned (CPython's defaults serve best)
MANY_AGENTS = 500
SWITCH_DEFAULT = 0.005
SWITCH_PER_THREAD = 20e-6
SWITCH_MAX = 0.2


def switch_interval(threads: int, window: float) -> float:
    """The GIL switch interval for a process with ``threads`` threads whose loop must be heard
    within ``window`` seconds."""
    if threads < MANY_AGENTS:
        return SWITCH_DEFAULT
    cap = max(SWITCH_DEFAULT, min(SWITCH_MAX, window / 25))
    return min(cap, max(SWITCH_DEFAULT, threads * SWITCH_PER_THREAD))


def host_switch_interval(threads: int) -> float:
    """The GIL switch interval for an agent host (host.py) with ``threads`` threads.

    A host has no heartbeat to keep, so nothing caps the interval by a liveness window; what
    matters is the herd summed over every process of the machine: each thread waiting for the
    GIL wakes once per interval, so splitting 10,000 threads into five processes at 40 ms each
    made five times the wake-ups of one process at 200 ms, and a burst of 20,000 agents tipped the
    whole machine over (load average 1,800, the coordinator's loop starved for 27 s).  Crowded
    hosts take the largest interval a worker would."""
    return SWITCH_DEFAULT if threads < MANY_AGENTS else SWITCH_MAX


#: the collector's youngest generation is collected after this many new objects (CPython: 700).
#: An agent in flight holds ~30 tracked objects, so at 700 a burst of short agents had each one's
#: objects walked by a few young passes and promoted (S3: ~500 young and 4 full passes a worker per
#: 10,000 agents); at 10,000 most are freed by reference counting before any pass sees them
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Tune this process's collector for a worker, once its code is loaded: what exists then
    (modules, classes, the worker's own objects; never garbage) is frozen, so a full pass walks
    only what came later (~50 ms a pass in S3 before, a few ms after), and the youngest generation
    is collected less often (:data:`YOUNG_THRESHOLD`).  Only in a worker's or agent host's own
    process, never in a user's."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


@dataclass
class FreezePolicy:
    """Counts agents started and ended; says when to freeze and when to reclaim."""

    started_since_freeze: int = 0
    ended_since_refresh: int = 0
    frozen: bool = False

    def started(self, n: int = 1) -> None:
        self.started_since_freeze += n

    def ended(self, n: int = 1) -> None:
        self.ended_since_refresh += n

    def decide(self, running: int) -> GcAction:
        """Call once per loop turn with the number of agents running."""
        if not self.frozen:
            if running >= MANY_AGENTS and self.started_since_freeze:
                self.frozen, self.started_since_freeze, self.ended_since_refresh = True, 0, 0
                return GcAction.FREEZE
            return GcAction.NOTHING
        if self.ended_since_refresh >= max(MANY_AGENTS, running):
            self.started_since_freeze = self.ended_since_refresh = 0
            # few left: reclaimed once more and not frozen again after starts; a reclaim freezes
            # what is alive after its pass, so the objects settle() froze stay frozen (fewer than
            # MANY_AGENTS agents' worth with them, until the next reclaim)
            self.frozen = running >= MANY_AGENTS
            return GcAction.REFRESH
        if self.started_since_freeze:
            self.started_since_freeze = 0
            return GcAction.FREEZE
        return GcAction.NOTHING
