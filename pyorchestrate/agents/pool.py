"""PoolAgent: a periodic agent whose runs may overlap, up to ``pool_size`` at once."""

from __future__ import annotations

import concurrent.futures
import threading
import time

from ..config import ValidationResult
from .base import RecoverableException
from .looping import PeriodicAgent, catch_up


class PoolAgent(PeriodicAgent):
    """Starts :meth:`runner` every ``Config.execution_interval`` seconds on one of ``Config.pool_size``
    threads, so slow runs overlap; when every slot is busy the schedule waits for one.  A
    RecoverableException from a run is reported and the pool goes on; any other ends the agent
    once the runs in flight have finished."""

    class Config(PeriodicAgent.Config):
        pool_size: int = 4

        def validate(self):
            results = super().validate()
            if not isinstance(self.pool_size, int) or self.pool_size < 1:
                results.append(ValidationResult("pool_size", "must be a whole number >= 1"))
            return results

    def execute(self) -> None:
        """The schedule and the pool (do not override; write ``runner``)."""
        size = self.config.pool_size
        slots = threading.BoundedSemaphore(size)
        failure: list[BaseException] = []

        def one_run() -> None:
            try:
                self.runner()
            except RecoverableException as exc:
                self._report_error(exc, recoverable=True)
            except BaseException as exc:  # noqa: BLE001 - sys.exit() too: the pool's executor kept it unread
                failure.append(exc)
                self.stop()
            finally:
                slots.release()

        interval, limit = self.config.execution_interval, self.config.limit
        due, done = time.monotonic(), 0
        with concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix=f"pool-{self.name}") as pool:
            while self._may_go_on() and (limit < 0 or done < limit):
                while not slots.acquire(timeout=0.05):
                    if self.stopping:
                        break
                else:
                    if not self._may_go_on():  # a slot came free past the lease, and it was stopped
                        slots.release()
                        break
                    if self.config.delay_compensation:
                        # every slot busy for long: the slots missed meanwhile are skipped
                        due = catch_up(due, interval, time.monotonic())
                    pool.submit(one_run)
                    done += 1
                    if limit >= 0 and done >= limit:
                        break
                    due += interval
                    delay = due - time.monotonic() if self.config.delay_compensation else interval
                    if delay > 0:
                        self.wait_stop(delay)
        if failure:
            raise failure[0]
