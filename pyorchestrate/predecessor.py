"""What a coordinator must respect of the one that ran before it under the same name: copies it
left running on the workers.  Part of the pure core (no clock reads, no sockets).

- A copy with the same definition as an agent this script registers is adopted (see core.py).
- A copy reported before this script registered its agent is held for a while ("foreign"); if
  the script does not register it, it is stopped.
- A copy that is stopped (changed definition, stale, or reported stopping), or given up while its
  worker is cut off (disconnect_timeout), blocks its agent until it has ended ("old copy"), so two
  never run at once.  While its worker is alive, only the copy's end (or a register of that worker
  not listing it) ends the wait, however long the copy ignores its stop: a thread stuck in its
  cycle cannot be killed.  Once its worker is lost, the wait ends when the copy has certainly
  stopped (see :meth:`Predecessor.worker_gone`).
- After a crash, agents wait before they start (the adoption window, and longer where a copy on a
  worker that never reports could still be running).
"""

from __future__ import annotations

from typing import Any, Callable

from .limits import Limits
from .records import AgentRecord


class Predecessor:
    """The adoption window and the previous coordinator's copies."""

    def __init__(self, limits: Limits, now: float, window: float, strict: bool, crash_window: float = 0.0) -> None:
        self.limits = limits
        self.started = now
        self.window = window
        self.until = now + window
        #: the window opened (and made strict) if a worker shows that our predecessor crashed (0:
        #: not looked for, the user set the window)
        self.crash_window = crash_window
        #: after a crash: also wait until copies on workers that never report have stopped
        self.strict = strict
        self.found: set[str] = set()  #: agents of which a previous coordinator's copy was reported
        #: copies reported before the script registered their agent: name -> (worker, report, deadline)
        self.foreign: dict[str, tuple[str, dict[str, Any], float]] = {}
        #: agents waiting until older copies have stopped: name -> {(worker, run, epoch): deadline},
        #: the deadline None while that worker is alive (it reports the copy's end)
        self.old_copies: dict[str, dict[tuple[str, str, int], float | None]] = {}
        #: (name, worker, run, epoch) -> the incarnation of the worker process running that old copy
        #: (another process may take the worker's name, and it vouches only for its own copies)
        self._process: dict[tuple[str, str, str, int], str] = {}

    def hold_until(self, record: AgentRecord) -> float:
        """When ``record`` may start.  After a crash, a copy the predecessor left running is reported
        within the window unless its worker is cut off.  Once one was reported running (``found``)
        it was adopted or is stopped before ours starts (the predecessor ran one at a time, but for
        copies it had replaced: their workers stopped them at their lease, and list them as
        stopping, which is no proof, see registration.py); if none was, a cut-off copy may still run
        until its lease (or, kept, the orphan timeout) and stop timeout have passed."""
        if self.window <= 0:
            return 0.0
        if not self.strict or record.name in self.found:
            return self.until
        return max(self.until, self.started + self.limits.unknown_copy_gone(record.keeps_running, record.stop_timeout))

    def stalled(self, since: float, until: float) -> None:
        """Our loop did not listen from ``since`` to ``until`` (a stall): the window is for hearing
        workers, so what was left of it runs after the stall.  (A copy's own lease runs on its
        worker's clock: the strict wait is not moved.)  Without this a stall ate the window, and
        the first register read after it, from a worker with nothing to say, started agents whose
        copies the next register in the queue reported: simulation seed 1720."""
        if self.window > 0 and since < self.until:
            self.until += until - since

    def crash_reported(self) -> bool:
        """A registering worker shows that a coordinator of our name left it without saying it
        finished: it still runs that one's copies, or says so.  So that one crashed (as far as
        this worker knows), though no run marker here said so: the marker lives on the
        coordinator's host, and is lost with a restarted container, a systemd service's private
        /tmp, or a start on another host; without the window a copy on a worker that registered a
        moment later was started a second time.  Wait as after a crash (strict), counted from our
        start.  True if this made the wait a crash's."""
        if self.strict or self.crash_window <= 0:
            return False
        self.strict = True
        if self.window <= 0:
            self.window = self.crash_window
            self.until = self.started + self.window
        return True

    def hold_foreign(self, name: str, worker: str, report: dict[str, Any], now: float) -> None:
        self.foreign[name] = (worker, report, max(now, self.until) + self.limits.silence)

    def block(self, name: str, worker: str, run: str, epoch: int, until: float | None = None,
              process: str = "") -> None:
        """A copy of ``name`` that is not its current run may still run on ``worker``: no new copy
        starts until that copy has reported its end (or ``worker`` registers without it), or, if
        ``until`` is given (its worker is lost: see :meth:`worker_gone`), until then.  A live
        worker's copy blocks with no deadline, not until its stop timeout: a thread agent stuck
        past it still runs (its worker says so, and cannot kill it), and starting another then ran
        two at once.  ``process``: the incarnation of the worker process that runs it."""
        self.old_copies.setdefault(name, {})[(worker, run, epoch)] = until
        self._process[(name, worker, run, epoch)] = process

    def worker_gone(self, worker: str, deadline: Callable[[str], float]) -> None:
        """``worker`` is lost or gone, so its old copies' ends may never be reported: each blocks its
        agent until ``deadline(name)``, when it has certainly stopped (see ClusterCore._worker_gone)."""
        for name, old in self.old_copies.items():
            for copy, until in old.items():
                if copy[0] == worker and until is None:
                    old[copy] = deadline(name)

    def worker_listed(self, worker: str, process: str, listed: set[tuple[str, str, int]]) -> None:
        """``worker`` registered (its process's incarnation ``process``), listing every copy it runs
        (``(agent, run, epoch)``): its old copies not listed have ended (their end reports lost with
        a connection); those listed were blocked again as the list was taken.  It vouches only for
        its own process's copies: another process that ran under that name (lost, maybe only cut
        off, and a rescheduled container took the name) may still run its copies, which wait for
        their deadline (seed 152 of the simulation: a new copy beside one kept there)."""
        for name in list(self.old_copies):
            old = self.old_copies[name]
            for copy in [c for c in old if c[0] == worker and (name, c[1], c[2]) not in listed
                         and self._process.get((name, *c), process) == process]:
                self._forget(name, old, copy)
            if not old:
                del self.old_copies[name]

    def waits_for(self, name: str) -> str | None:
        """A worker an older copy of ``name`` is stopping on, if one has not ended yet."""
        old = self.old_copies.get(name)
        return next(iter(old))[0] if old else None

    def copy_ended(self, name: str, worker: str, run: str, epoch: int) -> None:
        """A copy reported its end: it holds nothing any more (placement says whether its agent
        may start, or still waits for another copy)."""
        if name in self.foreign and (self.foreign[name][1]["run"], self.foreign[name][1]["epoch"]) == (run, epoch):
            del self.foreign[name]
        old = self.old_copies.get(name)
        if old is not None:
            if (worker, run, epoch) in old:
                self._forget(name, old, (worker, run, epoch))
            if not old:
                del self.old_copies[name]

    def _forget(self, name: str, old: dict[tuple[str, str, int], float | None], copy: tuple[str, str, int]) -> None:
        del old[copy]
        self._process.pop((name, *copy), None)

    def expire(self, now: float) -> tuple[list[tuple[str, str, dict[str, Any]]], bool]:
        """Foreign copies not claimed in time (to be stopped: ``(worker, name, report)``), and
        whether an old copy's wait ran out (its worker's lease ended it)."""
        unclaimed = [(worker, name, report) for name, (worker, report, deadline) in self.foreign.items()
                     if now > deadline]
        for _, name, _ in unclaimed:
            del self.foreign[name]
        over = False
        for name, old in list(self.old_copies.items()):
            for copy in [c for c, deadline in old.items() if deadline is not None and now > deadline]:
                self._forget(name, old, copy)
            if not old:
                del self.old_copies[name]
                over = True
        return unclaimed, over
