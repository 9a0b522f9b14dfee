"""Garbage collection in processes that hold thousands of agents: what to freeze, and when.

CPython's full (generation 2) collection walks every tracked object of the process while holding
the GIL.  In a coordinator with thousands of agent records (and their event history) it stops the
loop: heartbeats, leases and ``status()`` wait.  Measured: up to 103 ms at the peak of S9 (10,000
agents on 100 workers); 120-270 ms every few seconds with 20,000 agents running beside 4 CPU
burners.  ``gc.freeze()`` moves every object the collector tracks into a permanent generation it
never walks; objects freed by reference counting still go at once, only cyclic garbage that was
frozen waits for an unfreeze.

The coordinator's policy: when its loop starts, collect once and freeze: what the process holds
then (the script's modules and objects, ours) is out of every later pass's way, which walked all
of it before (S3, 2,000 agents: one or two full passes of 15-45 ms inside a run of 160-270 ms).
Once it holds ``MANY_AGENTS`` agents, freeze (no pass: what came since the start is walked by the
normal passes, and the pass we used to make here cost 23-44 ms in that same run); then freeze again
right after each full collection (what survived one is live, so nothing dead is frozen then; and
each such pass walks only what came since the last freeze); once the frozen population has doubled
since it was last reclaimed, unfreeze and collect once (one pause, the size of the ones avoided;
doubling makes them rare), so cyclic garbage stays bounded.  Under half ``MANY_AGENTS`` it stops
freezing after passes; it reclaims then only if the frozen population has grown that much (agent
records freed by reference counting leave it as they go).  Closing the coordinator unfreezes.
The worker's policy, counted in agents started and ended, is in ``pyorchestrate_worker.crowd``.

``gc.freeze`` is process-wide: in the script's process it also freezes the script's objects (the
same rule holds for them: only what survived a full collection; one of the script's frozen objects
that becomes cyclic garbage later waits for a reclaim or the coordinator's close).  A script that
freezes for itself should know the coordinator unfreezes when it reclaims and when it closes.
"""

from __future__ import annotations

import gc
from enum import Enum
from typing import Any, Callable

#: from this many agent records on, the coordinator freezes after full collections
MANY_AGENTS = 2_000
#: the frozen population may grow to this multiple of what was left after the last reclaim
REFRESH_GROWTH = 2.0
#: ... and by at least this many objects (a small population is not worth a pause)
REFRESH_MIN = 200_000
#: the frozen population is counted at most this often (seconds): counting walks all of it
COUNT_EVERY = 30.0


class GcAction(Enum):
    NOTHING = "nothing"
    FREEZE = "freeze"  #: gc.freeze(): what exists now is out of the collector's sight
    REFRESH = "refresh"  #: gc.unfreeze(); gc.collect(); gc.freeze(): reclaim frozen cyclic garbage


def apply(action: GcAction) -> None:
    """Carry out ``action`` on this process's collector."""
    if action is GcAction.FREEZE:
        gc.freeze()
    elif action is GcAction.REFRESH:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


class AfterFullCollection:
    """The coordinator's policy (pure: it is told the counts; see the module docstring)."""

    def __init__(self, many: int = MANY_AGENTS) -> None:
        self.many = many
        self.begun = False  #: the first decision (the loop's start) collected and froze
        self.active = False  #: many agents: freezing after each full collection
        self.full_done = False  #: a full collection finished since the last decision
        self.base = 0  #: frozen objects after the last reclaim
        self.next_count = 0.0  #: when the frozen population may be counted again

    def collected(self, generation: int) -> None:
        """A collection of ``generation`` finished (called from ``gc.callbacks``)."""
        if generation == 2:
            self.full_done = True

    def decide(self, agents: int, frozen: Callable[[], int], now: float) -> GcAction:
        """Call now and then on the loop with the agent records held and the time; ``frozen``
        counts the frozen objects (``gc.get_freeze_count`` walks them all: 4 ms at 10,000 agents,
        2 % of the loop's time in S3 when asked after every full collection), so it is asked
        right after a full collection (the one time the population grows), at most every
        ``COUNT_EVERY`` seconds, and when the agents have gone."""
        full_done, self.full_done = self.full_done, False
        if not self.begun:
            self.begun = True
            return GcAction.REFRESH  # before any agent: the process's objects, once and for all
        if not self.active:
            if agents >= self.many:
                self.active = True
                return GcAction.FREEZE
            return GcAction.NOTHING
        if agents < self.many // 2:
            self.active = False
            return GcAction.REFRESH if self._grown(frozen()) else GcAction.NOTHING
        if not full_done:
            return GcAction.NOTHING
        if now >= self.next_count:
            self.next_count = now + COUNT_EVERY
            if self._grown(frozen()):
                return GcAction.REFRESH
        return GcAction.FREEZE

    def _grown(self, frozen: int) -> bool:
        return frozen > max(REFRESH_GROWTH * self.base, self.base + REFRESH_MIN)

    def applied(self, action: GcAction, frozen: Callable[[], int]) -> None:
        """After ``apply(action)``; ``frozen`` as for :meth:`decide`."""
        if action is GcAction.REFRESH:
            self.full_done = False  # that full pass was ours, and its survivors are frozen already
            self.base = frozen()


class Collector:
    """The policy wired to this process's collector; ``close()`` undoes everything."""

    def __init__(self, many: int = MANY_AGENTS) -> None:
        self.policy = AfterFullCollection(many)
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            self.policy.collected(info["generation"])

    def tick(self, agents: int, now: float) -> GcAction:
        action = self.policy.decide(agents, gc.get_freeze_count, now)
        if action is not GcAction.NOTHING:
            apply(action)
            self.policy.applied(action, gc.get_freeze_count)
        return action

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self.policy.begun:
            self.policy.active = self.policy.begun = False
            gc.unfreeze()  # the script's process goes on as it was; the next full pass sees all
