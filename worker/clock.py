"""The clock of a worker's lease: CLOCK_BOOTTIME where the system has one.

``time.monotonic()`` (CLOCK_MONOTONIC) stands still while the machine is suspended: a laptop's
lid closed, a cloud VM hibernated.  CLOCK_BOOTTIME counts that time too (clock_gettime(2)).  A
worker whose host slept past its lease must find the lease over the moment it wakes, before its
agents run on: on the monotonic clock the lease had not moved, and the agents ran beside the
copies their coordinator had started elsewhere meanwhile (a partition must never leave two live
copies), until a whole lease had run out again after the wake-up and their stop timeouts after.

Every process of a worker that deals in its lease reads this one clock: the loop (its stamps go
to the coordinator and come back as echoes), its pulse process (whose echoes renew the lease),
the supervisor (a copy's stop counted from the lease's end) and the lease guards of its child
processes (told the lease's end as a time).  The coordinator keeps its own clock: it only echoes
a worker's stamps, and judges by its own.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

#: seconds on CLOCK_BOOTTIME (Linux), else on the monotonic clock
now: Callable[[], float] = (functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
                            if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic)
