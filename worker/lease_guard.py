"""A child process's own end of its worker's lease.

A worker that loses its coordinator stops, when its lease runs out, every agent the coordinator
will replace elsewhere.  A worker that is stopped (SIGSTOP of its pid, a debugger) cannot: its
thread agents are frozen with it, but its child processes are not, and a process agent ran on
beside its replacement until the worker was resumed.  So the worker tells each such child its
lease (``["lease", until, stop_timeout]`` on their pipe, every heartbeat), and the child, seeing its
worker stopped (state T) past that lease, stops its agent, and ends itself if the agent is still
running ``stop_timeout`` later: as the worker would have, on time.  A worker that is only busy or
cut off is not stopped, acts itself, and the guard does nothing (busy is not dead).

An agent host runs many thread agents, some kept (they run on without a coordinator): it is told
which of its agents the lease covers, stops those, and ends itself only if nothing else runs there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from pyorchestrate.log_thread import deferrable

from . import clock
from .pulse import worker_state

log = deferrable(logging.getLogger("pyorchestrate.worker"))

LEASE_OVER = 71  #: the exit status of a child that ended itself at its stopped worker's lease
POLL = 0.05  #: seconds between two looks at the worker (a lease is a second or more)


class Lease:
    """Until when a worker's lease holds (``clock.now()`` seconds) as last told, for the threads of
    the agents it covers to look at before each iteration (``BaseAgent._may_go_on``).

    Those agents are stopped when the lease runs out, by whoever watches it (the worker's loop, a
    guard), and the coordinator replaces them once the lease and their stop timeout have passed.
    A process frozen past that (SIGSTOP of its group, a paused VM) wakes with both the watcher and
    the agents' threads due, in no set order: a looping agent's thread woke first and ran a whole
    cycle more, seconds after its replacement had started elsewhere (every thread agent of a
    worker frozen for 3 s, 20 times in 20).  So a thread that finds the lease and its stop timeout
    over begins nothing until the lease is renewed (the watcher had echoes it had not read or
    passed on yet: busy is not dead) or the agent is stopped.  Not at the lease's end itself: a
    worker's loop that is only busy passes renewals to its process agents late, and they would
    pause for nothing."""

    def __init__(self) -> None:
        self.until = float("inf")  # no lease told yet: nothing to hold to

    def hold(self, stop: threading.Event, stop_timeout: float) -> None:
        """Return once the lease plus ``stop_timeout`` holds, or ``stop`` is set."""
        while clock.now() > self.until + stop_timeout and not stop.wait(POLL):
            pass


class LeaseGuard(Lease):
    """Watches ``worker_pid`` once told a lease (the worker's own pid: a child's parent is the
    forkserver; 0, not known, is never stopped); ``renewed`` is called from the pipe's reader.
    ``stop`` stops what the lease covers; ``may_end``: whether this process may end itself once
    that ignored the stop for its timeout (default: yes)."""

    def __init__(self, worker_pid: int, stop: Callable[[], None], may_end: Callable[[], bool] = lambda: True,
                 end: Callable[[int], None] = os._exit) -> None:
        """``end``: how this process ends itself (with what it started: child.end_with_group)."""
        self.worker_pid = worker_pid
        self.stop = stop
        self.may_end = may_end
        self.end = end
        super().__init__()
        self.stop_timeout = 10.0
        self._thread: threading.Thread | None = None

    def renewed(self, until: float, stop_timeout: float) -> None:
        self.until, self.stop_timeout = until, stop_timeout
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="lease-guard", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:
                # no thread to be had (a pids limit, the agent's own processes filling it): tried
                # again at the next lease.  Raised, it ended the thread that reads the worker's
                # pipe: no stop reached the agent, nor the worker's death (it ran on, beside its
                # replacement)
                log.warning("could not start the thread that holds this process to its worker's lease (%s): "
                            "trying again at the next lease", exc)
                return
            self._thread = thread

    def _run(self) -> None:
        stop_by: float | None = None
        while True:
            time.sleep(POLL)
            now = clock.now()
            if stop_by is not None:
                if now >= stop_by and self.may_end():
                    self.end(LEASE_OVER)  # it ignored the stop: as the worker would kill it
                if self.until < now:
                    continue
                stop_by = None  # a lease told since: the worker is back (a host's kept agents ran on)
            if now > self.until and worker_state(self.worker_pid) in ("T", "t"):
                self.stop()
                stop_by = now + self.stop_timeout
