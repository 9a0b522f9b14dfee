"""Restart policies: whether a finished agent runs again, and after how long."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

MODES = ("never", "on-failure", "always")
#: seconds a run must last for the restarts before it to be forgiven (Kubernetes resets a
#: container's crash-loop backoff after 10 minutes of running)
RESET_AFTER = 600.0


@dataclass(frozen=True)
class RestartPolicy:
    """``mode``: never | on-failure (errors, crashed processes, lost workers) | always.

    Delays grow exponentially from ``initial`` to ``maximum`` with up to 25 % jitter added (never
    subtracted), so no restart comes sooner than ``initial`` seconds: no restart storms.
    ``max_restarts`` counts restarts in a row (-1 = no limit): a run that lasted ``reset_after``
    seconds starts the count, and the delays, over (None: they count over the agent's life).  A
    long-lived agent that fails now and then (a network outage a month) is not given up for
    good after its tenth, nor made to wait the longest delay after each.
    """

    mode: str = "never"
    max_restarts: int = 10
    initial: float = 0.5
    maximum: float = 30.0
    reset_after: float | None = RESET_AFTER

    @classmethod
    def build(cls, mode: str, max_restarts: int, backoff: tuple[float, float],
              reset_after: float | None = RESET_AFTER) -> "RestartPolicy":
        """Check what the user passed to ``register_agent`` and build the policy."""
        if mode not in MODES:
            raise ValueError(f"restart={mode!r}: use one of {', '.join(repr(m) for m in MODES)}")
        if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < -1:
            raise ValueError(f"max_restarts={max_restarts!r}: use a whole number >= 0, or -1 for no limit")
        try:
            initial, maximum = (float(x) for x in backoff)
        except (TypeError, ValueError):
            raise ValueError(f"restart_backoff={backoff!r}: use (initial_seconds, max_seconds)") from None
        if not 0 < initial <= maximum:
            raise ValueError(f"restart_backoff={backoff!r}: need 0 < initial <= max")
        if reset_after is not None and (isinstance(reset_after, bool) or not isinstance(reset_after, (int, float))
                                        or not 0 < reset_after < math.inf):
            raise ValueError(f"restart_reset={reset_after!r}: use a number of seconds > 0, or None to count "
                             "restarts over the agent's life")
        return cls(mode, max_restarts, initial, maximum, None if reset_after is None else float(reset_after))

    def wants_restart(self, failed: bool) -> bool:
        return self.mode == "always" or (self.mode == "on-failure" and failed)

    def forgives(self, run_seconds: float) -> bool:
        """Does a run that lasted ``run_seconds`` start the count of restarts in a row over?"""
        return self.reset_after is not None and run_seconds >= self.reset_after

    def exhausted(self, restarts_done: int) -> bool:
        return self.max_restarts != -1 and restarts_done >= self.max_restarts

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds before restart number ``attempt`` (1-based)."""
        # never ``initial * 2 ** (attempt - 1)``: past 2**1023 that int-to-float product raises
        # OverflowError, which ended an unlimited restarter's restarts for good, silently, at its
        # 1,025th (after 8.5 hours of a crash loop at the default backoff's 30 s)
        try:
            base = min(self.maximum, math.ldexp(self.initial, min(attempt - 1, 4096)))
        except OverflowError:  # doubled past any float: far past maximum
            base = self.maximum
        return min(self.maximum, base * (1.0 + 0.25 * rng.random()))
