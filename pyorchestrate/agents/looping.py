"""LoopingAgent and PeriodicAgent: the agents that repeat."""

from __future__ import annotations

import abc
import time

from ..config import ValidationResult
from .base import BaseAgent, RecoverableException


class LoopingAgent(BaseAgent):
    """Calls :meth:`cycle` until stopped or ``Config.limit`` cycles have run (-1 = forever).

    It does not pace itself: ``cycle`` should block or sleep (``self.wait_stop(seconds)`` sleeps
    and wakes early on stop).
    """

    class Config(BaseAgent.Config):
        #: number of cycles; -1 runs until stopped
        limit: int = -1

        def validate(self):
            results = super().validate()
            if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < -1:
                results.append(ValidationResult("limit", "must be a whole number >= -1 (-1 = forever)"))
            return results

    @abc.abstractmethod
    def cycle(self) -> None:
        """One iteration of the agent's work.  Required."""

    def execute(self) -> None:
        """The loop: ``cycle()`` until stopped or ``limit`` cycles (do not override; write ``cycle``)."""
        limit = self.config.limit
        done = 0
        while self._may_go_on() and (limit < 0 or done < limit):
            self._guarded(self.cycle)
            done += 1
        self.cycles_done = done

    def _guarded(self, call) -> None:
        try:
            call()
        except RecoverableException as exc:
            self._report_error(exc, recoverable=True)


def catch_up(due: float, interval: float, now: float) -> float:
    """The slot of a fixed schedule that a run starting at ``now`` fills: the one ``due``, or,
    when later slots have come meanwhile too (a run that took long, a process stopped or
    starved), the latest of them: the ones between are skipped, and the schedule goes on from
    it.  Before, every missed slot ran, back to back: a stall of a minute made a 1 s
    PeriodicAgent run 60 times at once."""
    if interval > 0 and now - due >= interval:
        due += (now - due) // interval * interval
    return due


class PeriodicAgent(LoopingAgent):
    """Calls :meth:`runner` every ``Config.execution_interval`` seconds (``limit`` times, -1 =
    forever).  The wait between runs ends early when the agent is stopped."""

    class Config(LoopingAgent.Config):
        #: seconds between the starts of two runs
        execution_interval: float = 1.0
        #: keep a fixed schedule (the next run is due ``interval`` after the previous one was due,
        #: not after it finished); runs missed meanwhile (a long run, a stall) are skipped: the
        #: latest of them runs once, late, not each of them back to back
        delay_compensation: bool = False

        def validate(self):
            results = super().validate()
            interval = self.execution_interval
            if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not interval >= 0:
                results.append(ValidationResult("execution_interval", "must be a number of seconds >= 0"))
            return results

    @abc.abstractmethod
    def runner(self) -> None:
        """The periodic work.  Required."""

    def cycle(self) -> None:
        """One run; the schedule is kept by :meth:`execute`."""
        self.runner()

    def execute(self) -> None:
        """The schedule: ``runner()`` every interval (do not override; write ``runner``)."""
        interval = self.config.execution_interval
        limit = self.config.limit
        due = time.monotonic()
        done = 0
        while self._may_go_on() and (limit < 0 or done < limit):
            self._guarded(self.cycle)
            done += 1
            if limit >= 0 and done >= limit:
                break
            if self.config.delay_compensation:
                now = time.monotonic()
                due = catch_up(due + interval, interval, now)
                delay = due - now
            else:
                delay = interval
            if delay > 0:
                self.wait_stop(delay)
        self.cycles_done = done
