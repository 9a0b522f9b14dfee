"""Watching a process the worker runs agents in (a process agent's, an agent host): when it has
ended, and what it leaves behind in its process group.

Its pipe alone does not say when it ended: any process it forks (``os.fork``, a fork-started
``multiprocessing`` child) holds its end of the pipe too, and while one of those lives the pipe
never closes.  A process agent SIGKILLed beside its forked helpers was never reported, and counted
as running for ever.  The process's sentinel (the forkserver's word that it reaped it) says it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
from typing import Any

from . import child
from .pulse import worker_state

from pyorchestrate.log_thread import deferrable

log = deferrable(logging.getLogger("pyorchestrate.worker.supervisor"))


class ChildWatch:
    """Waits on one child's pipe and on its process (its sentinel), for the thread that reads the
    pipe.  One ``select.poll`` for the child's life: every message of the child (each of its bus
    events) passes here, and ``multiprocessing.connection.wait`` cost 7.5 µs a call, this 0.8."""

    def __init__(self, conn: Any, process: Any) -> None:
        self.conn, self.process = conn, process
        self._conn_fd, self._sentinel = conn.fileno(), process.sentinel
        self._poller = select.poll()
        self._poller.register(self._conn_fd, select.POLLIN)
        self._poller.register(self._sentinel, select.POLLIN)
        self._ended = False

    def readable(self) -> bool:
        """Wait until the pipe has something to read (True), or the process has ended and its
        pipe holds nothing more (False)."""
        if self._ended:
            return bool(self.conn.poll(0))  # what it wrote before it ended, then nothing more
        while True:
            if any(fd == self._conn_fd for fd, _ in self._poller.poll()):
                return True
            # the sentinel: the forkserver has reaped the process and says how it ended, or the
            # forkserver itself is gone (a SIGTERM to the worker's group ends it), and its word
            # with it (exit code 255): then only the process's own number tells whether it runs
            self._poller.unregister(self._sentinel)
            if self.process.exitcode is not None and not still_running(self.process.pid):
                self._ended = True
                return bool(self.conn.poll(0))


def release(process: Any) -> None:
    """Close what ``multiprocessing`` keeps open for a process agent that has ended: two pipe ends
    (its sentinel and a copy of the pipe its definition went down).  It closes them only when its
    ``Popen`` object is collected, and an ended agent's objects are cyclic garbage, which the
    worker's collector reaches seldom (crowd.YOUNG_THRESHOLD): four process agents restarting
    every half second held 450 descriptors after 20 s here, and up to 722 restarting as fast as
    they could, two per ended run.  Its pid and exit code stay
    readable (``Process.close()`` would make them raise), so a late ``is_alive()`` still answers."""
    popen = getattr(process, "_popen", None)
    if popen is not None and popen.returncode is not None:
        popen.close()


def still_running(pid: int | None) -> bool:
    """Does process ``pid`` run (a zombie does not)?  Where /proc cannot tell, a signal 0 does."""
    if not pid:
        return False
    state = worker_state(pid)
    if state is not None:
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def kill_group_left_by(pid: int | None) -> None:
    """SIGKILL what is left of the group the process ``pid`` (ended without saying so: it could
    not end them itself, see child.end_strays) led, before its end is reported: they must not run
    on beside the copy the coordinator starts next.  A group lives on, under its leader's number,
    while any process is in it, and that number is not given to another process meanwhile; once
    the group is empty the call finds none (a new process would need that very number, after the
    whole range of pids went round, and to lead a group of its own, within these moments)."""
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:  # none left (ESRCH), the usual case
        return
    log.warning("process %d ended and left processes running in its group: killed them", pid)
    child.wait_group_gone(pid, child.STRAY_GRACE, reap=False)  # a SIGKILLed process runs until scheduled
