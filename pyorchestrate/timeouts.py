"""Timeouts the user passes to a wait of ours: any length works, ``float("inf")`` included.

CPython's waits raise past ``threading.TIMEOUT_MAX`` (292 years): ``threading.Event.wait(1e10)``
and ``wait(float("inf"))`` raise OverflowError ("timestamp out of range for platform time_t"), a
process-shared Event raises OSError for inf, and a ZeroMQ poll takes whole milliseconds, which
inf is not.  Such a timeout means "until it happens", which None says.
"""

from __future__ import annotations

import threading


def until_done_if_past_max(timeout: float | None) -> float | None:
    """``timeout``, or None (wait until it happens) for anything past ``threading.TIMEOUT_MAX``."""
    if timeout is not None and timeout > threading.TIMEOUT_MAX:
        return None
    return timeout
