"""A worker that is its PID namespace's init (PID 1: a container's only process, as Kubernetes and
``docker run`` without ``--init`` start it) runs as the child of a small reaper instead.

Every process whose parent ends is handed to PID 1: a shell's background job (``sh -c "job &"``),
what a daemonising tool leaves, the helpers of a process agent that ended.  Nothing else waits for
them, so the worker as PID 1 left each one a zombie for good (measured: 20 orphans, 20 zombies),
each holding a pid of the pod's limit until starting an agent failed.  The worker cannot reap them
itself: a wait for any child would also take the exit statuses that its thread agents'
``subprocess`` calls wait for.

So PID 1 forks at once, before any thread or socket exists: the child runs the worker, in a session
of its own (it leads its process group, see group_guard.py); the parent reaps every child it is
handed, passes the signals an operator sends to the worker on to it, and ends with the worker's
exit status (128 + the signal's number when a signal ended it, as a shell says).  This is what
``tini`` and ``docker run --init`` do; with either, the worker is not PID 1 and nothing changes.
"""

from __future__ import annotations

import os
import signal

#: what an operator or a container runtime sends PID 1 meaning the worker (stop, stop now, stacks)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def reap_if_init() -> None:
    """If this process is PID 1, become the reaper and run the worker in a child (this returns in
    the child); otherwise return at once."""
    if os.getpid() != 1:
        return
    # blocked across the fork: PID 1 ignores a signal it has no handler for, so one sent before the
    # handlers below would be lost; pending, it reaches them (in the child, its own handlers)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    worker = os.fork()
    if worker == 0:
        os.setsid()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return
    for signum in FORWARDED:
        signal.signal(signum, lambda number, _frame: _forward(worker, number))
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    os._exit(_reap(worker))


def _forward(worker: int, signum: int) -> None:
    try:
        os.kill(worker, signum)
    except ProcessLookupError:  # it has ended: its status is on its way
        pass


def _reap(worker: int) -> int:
    """Wait for every child, orphans handed to us included, until the worker ends: its exit code."""
    while True:
        try:
            pid, status = os.wait()  # a signal interrupts it, its handler runs, and it waits again
        except ChildProcessError:  # the worker was our child: not reached
            return 1
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
