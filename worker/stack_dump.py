"""SIGUSR1: every thread's stack to the worker's stderr, never holding the worker up.

``faulthandler`` writes the stacks from its C signal handler, in whichever thread the signal
interrupts, with plain ``write()`` calls: that is what makes it work while a thread holds the GIL
for good, and what made it dangerous.  With stderr a pipe nobody read (a log shipper that hung, a
paused pager) or a terminal stopped with Ctrl-S, the handler blocked in ``write()`` in the worker's
loop: measured, the coordinator took the worker for lost 0.8 s after the SIGUSR1, and its agents
were started elsewhere.  An operator's "what is it doing?" made the very false death it was asked
about.

So the stacks go to stderr opened again (``/proc/self/fd/2``: a new open file of the same pipe,
terminal or file, so that ``O_NONBLOCK`` is ours alone, and the other writers to stderr still
wait as they did), where a full pipe cuts the dump short instead.  A socket (journald's) cannot be
opened again: there the stacks are written as before, and a reader that stalls can still hold the
worker.  (A ``cat`` carrying a pipe of ours to it was tried and not kept: in two clean-clone CI
runs a socket's stacks never arrived, through the ``cat`` and written directly alike, for a reason
not found.)

The same signal reaches every process of a worker when it is sent to all of them, as ``systemctl
kill -s USR1 UNIT`` does by default (the whole cgroup).  A process agent, an agent host and
multiprocessing's forkserver and resource tracker died of it (SIGUSR1's default action): the
diagnosis ended agents, as failures.  So agent hosts and process agents print their own stacks too
(:func:`register`), and the forkserver and resource tracker are started with SIGUSR1 blocked
(:func:`start_forkserver`), which the children forked from the forkserver inherit until they
register.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal

from pyorchestrate.log_thread import deferrable

log = deferrable(logging.getLogger("pyorchestrate.worker"))


def _unblocking_stderr() -> int | None:
    """A descriptor writing where stderr does, that never blocks (None where there is none)."""
    try:
        return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # a socket (ENXIO), or no /proc
        return None


def register() -> None:
    """SIGUSR1 prints every thread's stack (to a descriptor that never blocks where there is one,
    see above)."""
    fd = _unblocking_stderr()
    if fd is None:
        log.debug("stderr cannot be opened again: SIGUSR1's stacks are written to it, waiting if it is full")
        fd = 2
    faulthandler.register(signal.SIGUSR1, file=fd, all_threads=True, chain=False)
    # blocked since the fork, in a child of the forkserver (see start_forkserver): from here on
    # a SIGUSR1 prints stacks, and the processes this one starts get it unblocked, as is usual
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def start_forkserver() -> None:
    """Start multiprocessing's forkserver (and resource tracker) unless they run, with SIGUSR1
    blocked: a blocked signal stays blocked through fork and exec, so it stays pending in them for
    good instead of ending them, and in the children forked from the forkserver until they call
    :func:`register`.  Only the calling thread blocks it, for as long as this takes."""
    from multiprocessing import forkserver

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
