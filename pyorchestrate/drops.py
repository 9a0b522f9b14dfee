"""Counting what we drop from the network, and saying so without flooding the log."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any


class DropCounter:
    """Counts dropped frames by kind; logs at most once per ``interval`` seconds."""

    def __init__(self, log: logging.Logger, interval: float = 5.0) -> None:
        self.counts: Counter[str] = Counter()
        self._log = log
        self._interval = interval
        self._last_log = -interval

    def drop(self, kind: str, detail: Any = "", count: int = 1, what: str = "frame") -> None:
        """Count ``count`` of ``kind`` (``what``: the thing dropped, as the log says it)."""
        self.counts[kind] += count
        now = time.monotonic()
        if now - self._last_log >= self._interval:
            self._last_log = now
            if count == 1:
                self._log.warning("dropped a %s %s (%s); dropped so far: %s", kind, what, detail, dict(self.counts))
            else:
                self._log.warning("dropped %d %s %ss (%s); dropped so far: %s", count, kind, what, detail,
                                  dict(self.counts))
