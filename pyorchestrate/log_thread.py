"""Log records written by a thread of their own, so that a loop that keeps time never waits on a
log stream.

A logging handler writes in the thread that logs.  When its stream stops taking data (a terminal
paused with Ctrl-S, ``script.py | less`` not scrolled, a pipe nobody reads, a container runtime's
blocking log driver that falls behind), the write waits, and the thread with it:

* the coordinator's loop, which prints its INFO lines and its agents' log lines, stopped answering
  heartbeats once its stderr pipe was full, and its workers' leases ran out: they stopped a
  running agent (``restart="always"``) 1.1 s after the pipe filled;
* a worker's loop that logged one line to a full stderr stopped heartbeating: its coordinator took
  it for lost and started its agents elsewhere while they ran on here (a process agent's lease
  guard acts only on a *stopped* worker, and this one only waits).

So the coordinator's loop hands its records to a :class:`LogThread` (loggers made
:func:`deferrable`, in a thread marked by :func:`defer_in_this_thread`; other threads, the
user's among them, log as before), and a worker process's stderr handler writes through one
(:class:`QueuedHandler`: no thread of a worker, agents included, waits on stderr).  The queue is
bounded: beyond ``LIMIT`` records waiting, records are dropped and counted, and the log says how
many, in the place where they are missing (an agent's lines still travel on the bus: only their
printed copy is lost).  That is for a stream that takes nothing: while it takes data, a full queue
makes the logging thread wait for room, as its own write would have (a burst is slowed, not cut).
A record's message is formatted when it is logged, not when it is written.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from typing import Callable

from . import own_threads

#: records waiting to be written, at most; later ones are dropped (and counted) until there is room
LIMIT = 10_000
#: seconds the process's exit waits for the records still queued (a blocked stream never empties)
EXIT_WAIT = 2.0
#: a full queue waits for room while the stream takes a record at least this often; after that
#: it counts as stuck and records are dropped at once, until it takes one.  Well under any lease
#: (0.5 s in the tests' tightest settings): a loop waits this long once a stall, not once a record
STALL = 0.1

Handle = Callable[[logging.LogRecord], object]


class LogThread:
    """Handles records (``handle(record)``) on a daemon thread of its own, started on first use."""

    def __init__(self, name: str = "pyorchestrate-log", limit: int = LIMIT) -> None:
        self.name = name
        self.limit = limit
        # (handle, record); (handle, None): say how many were dropped; (Event, None): a flush
        self._queue: queue.SimpleQueue[tuple[Handle | threading.Event, logging.LogRecord | None]] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._drop_lock = threading.Lock()  # += from many threads at once must not lose a count
        self._thread: threading.Thread | None = None
        self.dropped = 0  #: records dropped so far (the queue was full: the stream took nothing)
        self._said = 0  # of those, how many the log already says were dropped
        self._gap_queued = False  # a notice of dropped records waits in the queue (one at a time)
        self._handled = 0  # records handled so far (the stream moves while it grows)
        self._stuck_at = -1  # _handled when the stream was last found stuck (-1: never)

    def start(self) -> None:
        """Start the thread now (``Thread.start`` waits for it to run: better in a thread that may
        wait than in a loop's first log line)."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    thread = own_threads.thread(self._run, self.name)
                    thread.start()
                    self._thread = thread

    def submit(self, handle: Handle, record: logging.LogRecord) -> None:
        """Queue ``handle(record)``.  With ``limit`` records waiting, wait for room while the
        stream takes data, as a write of one's own would; once it has taken nothing for ``STALL``
        seconds, drop the record and count it instead."""
        if self._queue.qsize() >= self.limit and not self._room():
            with self._drop_lock:
                self.dropped += 1
                if not self._gap_queued:  # where the loss begins, the log will say how much it was
                    self._gap_queued = True
                    self._queue.put((handle, None))
            return
        if self._thread is None:
            try:
                self.start()
            except RuntimeError:
                # no thread to be had (a pids limit): written here, waiting on the stream as
                # logging's own handlers do.  Raised, it reached whoever logged: in a process
                # agent, the thread that reads its worker's pipe (no stop reached the agent)
                handle(record)
                return
        _freeze(record)
        self._queue.put((handle, record))

    def _room(self) -> bool:
        # a burst of the coordinator's lines to a file outran this thread (9,521 of 26,000 dropped
        # while the loop held the GIL): a stream that moves slows the logger down instead.  Judged
        # by records handled during this wait (an idle spell before a burst says nothing), and a
        # stream found stuck stays stuck until it takes a record: one wait a stall, not one a record
        seen, since = self._handled, time.monotonic()
        if seen == self._stuck_at:
            return False
        while self._queue.qsize() >= self.limit:
            if self._handled != seen:
                seen, since = self._handled, time.monotonic()
            elif time.monotonic() - since > STALL:
                self._stuck_at = seen
                return False
            time.sleep(0.0005)  # lets this thread have the GIL
        return True

    def is_current(self) -> bool:
        """Is the calling thread this log thread?"""
        return self._thread is threading.current_thread()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until what was queued before this call is handled; False if the
        stream still took nothing by then."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put((done, None))
        return done.wait(timeout)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            handle, record = get()
            if isinstance(handle, threading.Event):
                handle.set()
                continue
            if record is None:  # the notice of a loss, where it began: what was dropped until now
                with self._drop_lock:
                    missed, self._said, self._gap_queued = self.dropped - self._said, self.dropped, False
                record = _dropped_record(missed)
            try:
                handle(record)
            except Exception:  # noqa: BLE001 - handlers report their own errors (handleError); this thread must live
                pass
            self._handled += 1

    def _forked(self) -> None:
        # a fork of this process has none of our threads: it starts its own on its first record
        self._queue = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._gap_queued = False
        self._thread = None


def _freeze(record: logging.LogRecord) -> None:
    """Format the message now: the arguments may have changed by the time the record is written."""
    if record.args:
        try:
            record.msg, record.args = record.getMessage(), None
        except Exception:  # noqa: BLE001 - left as is: the handler reports the bad format, as it would have
            pass


def _dropped_record(count: int) -> logging.LogRecord:
    return logging.LogRecord(
        "pyorchestrate.log", logging.WARNING, __file__, 0,
        "%d log record(s) dropped: the log stream took no data for a while (a paused terminal, a pipe nobody "
        "reads); agents' lines also went on the bus", (count,), None)


#: the process's log thread: the coordinator's loop and a worker's stderr write through it
LOG_THREAD = LogThread()
os.register_at_fork(after_in_child=LOG_THREAD._forked)
# LIFO: this runs before logging's own exit hook (registered when logging was imported), which
# flushes every handler
atexit.register(LOG_THREAD.flush, EXIT_WAIT)

_here = threading.local()


class _Deferrable(logging.Logger):
    """A logger whose records, in a thread marked by :func:`defer_in_this_thread`, are handled on
    that thread's :class:`LogThread` instead (filters, handlers and propagation as usual)."""

    def handle(self, record: logging.LogRecord) -> None:
        writer = getattr(_here, "writer", None)
        if writer is None:
            logging.Logger.handle(self, record)
        else:
            writer.submit(self._handle_now, record)

    def _handle_now(self, record: logging.LogRecord) -> None:
        logging.Logger.handle(self, record)


def deferrable(logger: logging.Logger) -> logging.Logger:
    """``logger``, made to hand its records to the log thread when logged by a marked thread.  A
    logger of a class of the application's own (``logging.setLoggerClass``) is left as it is."""
    if type(logger) is logging.Logger:
        logger.__class__ = _Deferrable
    return logger


def defer_in_this_thread(writer: LogThread = LOG_THREAD) -> None:
    """From now on, deferrable loggers used by the calling thread never make it wait on a stream."""
    writer.start()
    _here.writer = writer


class QueuedHandler(logging.Handler):
    """Hands each record ``target`` would write to the log thread, which writes it (``target``'s
    level and filters are looked at here too: a record it would skip takes no place in the queue)."""

    def __init__(self, target: logging.Handler, writer: LogThread = LOG_THREAD) -> None:
        super().__init__(target.level)
        self.target = target
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        # no lock of our own: submit never waits, and emit has no state to guard
        if record.levelno < self.target.level or not self.target.filter(record):
            return False
        if self.writer.is_current():  # a deferred record handled on the log thread: write it now
            self.target.handle(record)
        else:
            self.writer.submit(self.target.handle, record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def flush(self) -> None:
        # logging.shutdown() calls this at exit: a bounded wait, not the target's flush, which
        # waits for ever on a stream that takes nothing
        self.writer.flush(EXIT_WAIT)
