"""The benchmark's user side: callbacks that count lifecycle events, and a wait for a count.

Ours (``ours.Cluster``) and the lean prototype (``lean.Lean``) register the same ``_record`` on the
same events, so what the harness costs a launch is the same on both sides."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

TIMEOUT = 120.0


class Recorder:
    """Event counters (and, with ``track``, per-agent times and STARTED counts) to wait on."""

    def __init__(self, track: bool = True) -> None:
        self.track = track
        self.counts: dict[str, int] = defaultdict(int)
        self.times: dict[tuple[str, str], float] = {}
        self.started: dict[str, int] = defaultdict(int)
        self.cond = threading.Condition()
        # what wait() waits for: a callback wakes the waiting thread only when that is reached, as
        # a user's script would (woken on every STARTED/READY/TERMINATED, the waiter took the GIL
        # 3 times an agent from the loop and the callbacks it measures)
        self._awaited: tuple[str, int] | None = None

    def _record(self, event: str, agent_name: str | None = None, worker: str | None = None) -> None:
        with self.cond:
            self.counts[event] += 1
            if self.track:  # per-agent records: off in the soak, where they would be the leak measured
                self.times[(event, agent_name or worker or "")] = time.perf_counter()
                if event == "AGENT_STARTED" and agent_name:
                    self.started[agent_name] += 1
            awaited = self._awaited
            if awaited is not None and awaited[0] == event and self.counts[event] >= awaited[1]:
                self.cond.notify_all()

    def wait(self, event: str, count: int, timeout: float = TIMEOUT) -> None:
        with self.cond:
            self._awaited = (event, count)
            try:
                if not self.cond.wait_for(lambda: self.counts[event] >= count, timeout):
                    raise TimeoutError(f"{event}: {self.counts[event]} of {count} within {timeout} s")
            finally:
                self._awaited = None
