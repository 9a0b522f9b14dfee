"""The coordinator's key directory, read by a thread of its own.

Who is admitted is read from the key directory (``allowed/ROLE/*.key``) again and again, so that a
revocation or a new key takes effect without a restart.  That read is file system work, and a key
directory can sit on a file system that stops answering (a hard-mounted NFS server gone away): a
``stat`` there waits, uninterruptibly, until the server is back.  Read in the coordinator's loop
(once a tick), it held the loop: no heartbeat answered, every worker's lease ran out and its
replaceable agents were stopped.  Read in the gatekeeper (ZAP) thread (once a handshake), it held
every handshake.  So this thread reads it, and they use what it read last
(:meth:`~pyorchestrate.keys.KeyDir.latest`): while the directory does not answer, the keys in force
are those of its last answer, and a revocation waits for the next.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from . import own_threads
from .keys import KeyDir
from .log_thread import defer_in_this_thread

INTERVAL = 0.25  #: seconds between two reads (how long a revocation or a new key may wait)


class KeyWatch:
    """Reads ``keydir`` every ``interval`` seconds on a daemon thread."""

    def __init__(self, keydir: KeyDir, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.keydir = keydir
        self.interval = interval
        self.clock = clock
        #: when the read under way began (None between reads): how long the directory keeps us waiting
        self.reading_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Read once now (the caller waits for the first answer: nothing is admitted before it),
        then on the thread."""
        self._read()
        self._thread = own_threads.thread(self._run, "pyorchestrate-keys")
        self._thread.start()

    def stuck_for(self, now: float) -> float:
        """Seconds the read under way has waited (0 if none is)."""
        since = self.reading_since
        return 0.0 if since is None else max(0.0, now - since)

    def stop(self) -> None:
        """Stop reading.  Not joined: a read stuck in a file system that does not answer cannot
        be (the thread is a daemon, and ends with the process if it never comes back)."""
        self._stop.set()

    def _read(self) -> None:
        self.reading_since = self.clock()
        try:
            self.keydir.admitted()
        except OSError:
            pass  # what it admitted last stays in force (KeyDir.admitted keeps unreadable folders' keys)
        finally:
            self.reading_since = None

    def _run(self) -> None:
        defer_in_this_thread()  # what it logs (a folder it cannot read) waits on no stream or handler
        while not self._stop.wait(self.interval):
            self._read()
