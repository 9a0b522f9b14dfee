"""SIGUSR1: every thread's stack to the worker's stderr, never holding the worker up.

``faulthandler`` writes the stacks from its C signal handler, in whichever thread the signal
interrupts, with plain ``write()`` calls: that is what makes it work while a thread holds the GIL
for good, and what made it dangerous.  With stderr a pipe nobody read (a log shipper that hung, a
paused pager) or a terminal stopped with Ctrl-S, the handler blocked in ``write()`` in the worker's
loop: measured, the coordinator took the worker for lost 0.8 s after the SIGUSR1, and its agents
were started elsewhere.  An operator's "what is it doing?" made the very false death it was asked
about.

So the stacks go to a descriptor that never blocks: stderr opened again (``/proc/self/fd/2``: a
new open file of the same pipe, terminal or file, so that ``O_NONBLOCK`` is ours alone, and the
other writers to stderr still wait as they did), where a full pipe cuts the dump short instead.
Where stderr cannot be opened again (a socket: journald's), a ``cat`` of a session of its own
carries a pipe of ours to it: it waits for stderr, we do not.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import subprocess

from pyorchestrate.log_thread import deferrable

log = deferrable(logging.getLogger("pyorchestrate.worker"))

_PIPE_SIZE = 1 << 20  # room for the stacks of a few thousand threads in the pipe to ``cat``


def _unblocking_stderr() -> int | None:
    """A descriptor writing where stderr does, that never blocks (None if there is none)."""
    try:
        return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        pass
    try:
        read, write = os.pipe()
    except OSError:
        return None
    try:
        # a session of its own: not one of the processes thread agents start (group_guard.py); it
        # ends when our end closes, at our exit
        subprocess.Popen(["cat"], stdin=read, stdout=2, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        os.close(write)
        return None
    finally:
        os.close(read)
    try:
        import fcntl

        fcntl.fcntl(write, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_SIZE)
    except OSError:  # above /proc/sys/fs/pipe-max-size: the default 64 KiB cuts a big dump short
        pass
    os.set_blocking(write, False)
    return write


def register() -> None:
    """SIGUSR1 prints every thread's stack (to a descriptor that never blocks, see above)."""
    fd = _unblocking_stderr()
    if fd is None:  # ignored, not left to its default action (the end of the worker)
        log.warning("no way to write SIGUSR1's stacks without waiting for stderr: SIGUSR1 is ignored")
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        return
    faulthandler.register(signal.SIGUSR1, file=fd, all_threads=True, chain=False)
