"""Agents that run their work once: plain, deferred, conditional, triggered, and with retries."""

from __future__ import annotations

import abc
import datetime
import time
from typing import Any

import tenacity

from ..config import ValidationResult
from .base import BaseAgent

_POLL = 0.05


class OneShotAgent(BaseAgent):
    """Runs :meth:`execute` once.  The same as a Base agent, under the name users look for."""


class DeferredAgent(OneShotAgent):
    """Runs :meth:`execute` once, ``Config.delay`` seconds after READY or at ``Config.start_at``
    (a datetime; local time if naive).  Stopping cancels the wait."""

    class Config(OneShotAgent.Config):
        #: seconds to wait after READY
        delay: float = 0.0
        #: when to run (overrides delay)
        start_at: datetime.datetime | None = None

        def validate(self):
            results = super().validate()
            if not isinstance(self.delay, (int, float)) or isinstance(self.delay, bool) or not self.delay >= 0:
                results.append(ValidationResult("delay", "must be a number of seconds >= 0"))
            if self.start_at is not None and not isinstance(self.start_at, datetime.datetime):
                results.append(ValidationResult("start_at", "must be a datetime.datetime or None"))
            return results

    def _main(self) -> None:
        start_at = self.config.start_at
        if start_at is not None:
            now = datetime.datetime.now(start_at.tzinfo)
            wait = (start_at - now).total_seconds()
        else:
            wait = self.config.delay
        # (its lease may have run out while it waited, in a process frozen since: see _may_go_on)
        if (wait > 0 and self.wait_stop(wait)) or not self._may_go_on():
            self.logger.info("stopped before its start time: not run")
            self._not_run = True
            return
        self.execute()


class ConditionalAgent(OneShotAgent):
    """Runs :meth:`execute` once, as soon as :meth:`condition` returns true (checked every
    ``Config.poll_interval`` s).  After ``Config.timeout`` seconds (None: never) it gives up with
    AGENT_ERROR."""

    class Config(OneShotAgent.Config):
        poll_interval: float = 0.5
        timeout: float | None = None

        def validate(self):
            results = super().validate()
            if not isinstance(self.poll_interval, (int, float)) or not self.poll_interval > 0:
                results.append(ValidationResult("poll_interval", "must be a number of seconds > 0"))
            if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or not self.timeout >= 0):
                results.append(ValidationResult("timeout", "must be None or a number of seconds >= 0"))
            return results

    @abc.abstractmethod
    def condition(self) -> bool:
        """Return True when the agent should run.  Required."""

    def _main(self) -> None:
        deadline = None if self.config.timeout is None else time.monotonic() + self.config.timeout
        while not self.condition():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {self.config.timeout} s")
            if self.wait_stop(self.config.poll_interval):
                self._not_run = True
                return
        if not self._may_go_on():  # its lease ran out while it polled (a frozen process), and it was stopped
            self._not_run = True
            return
        self.execute()


class TriggeredAgent(OneShotAgent):
    """Runs ``execute(payload)`` once, when triggered: by ``orchestrator.trigger(name, payload)``,
    or by the first bus event whose topic starts with ``Config.trigger`` (an OrchestratorEvent
    name such as ``"AGENT_TERMINATED"``, or a topic prefix such as ``"AGENT_READY.db"``); the
    payload is then that event, as a dict."""

    _reads = frozenset({"trigger"})

    class Config(OneShotAgent.Config):
        trigger: str | None = None

    @abc.abstractmethod
    def execute(self, payload: Any) -> None:  # type: ignore[override]
        """The work, given what triggered it.  Required."""

    def _prepare(self) -> None:
        # subscribed before READY, like EventDriven: a trigger published right after it is not missed
        if self.config.trigger and self.events_address:
            self._subscribe([self.config.trigger])

    def _main(self) -> None:
        subscriber = self._subscriber
        while self._may_go_on():
            delivery = self._next_delivery(_POLL)
            if delivery is not None and delivery[0] == "trigger":
                self.execute(delivery[1])
                return
            event = subscriber.recv(timeout=0) if subscriber is not None else None
            if event is not None:
                self.execute(dict(event))
                return
        self._not_run = True  # stopped before a trigger came


class RecoveryAgent(OneShotAgent):
    """Runs :meth:`execute`, retrying on exception up to ``Config.max_retries`` times with
    exponential backoff (``Config.backoff`` = (initial, max, jitter) seconds, via tenacity).  Each
    failed try is an AGENT_ERROR with its ``attempt`` number; after the last, the agent fails."""

    class Config(OneShotAgent.Config):
        max_retries: int = 3
        backoff: tuple[float, float, float] = (0.5, 10.0, 0.5)

        def validate(self):
            results = super().validate()
            if not isinstance(self.max_retries, int) or self.max_retries < 0:
                results.append(ValidationResult("max_retries", "must be a whole number >= 0"))
            try:
                initial, maximum, jitter = (float(x) for x in self.backoff)
                if not (0 <= initial <= maximum and jitter >= 0):
                    raise ValueError
            except (TypeError, ValueError):
                results.append(ValidationResult("backoff", "must be (initial, max, jitter) seconds, 0 <= initial <= max"))
            return results

    def _main(self) -> None:
        initial, maximum, jitter = (float(x) for x in self.config.backoff)

        def failed_try(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception()
            self._report_error(exc, attempt=state.attempt_number, recoverable=True)

        last: Exception | None = None

        def attempt() -> None:
            nonlocal last
            if last is not None and not self._may_go_on():
                # stopped while it waited to try again (tenacity tries once more after its sleep):
                # no further try, and the last one's failure is the run's
                raise last
            try:
                self.execute()
            except Exception as exc:
                last = exc
                raise

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.max_retries + 1) | tenacity.stop_any(lambda s: self.stopping),
            wait=tenacity.wait_exponential_jitter(multiplier=initial, max=maximum, jitter=jitter),
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=failed_try,
            sleep=lambda seconds: self.wait_stop(seconds),
            reraise=True,
        )
        retrying(attempt)
