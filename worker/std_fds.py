"""Descriptors 0, 1 and 2 always open in a worker: /dev/null where its starter closed them.

A program that starts the worker with stdin, stdout or stderr closed (``<&- >&- 2>&-``, a daemon
helper, an init script) leaves those numbers free, and the next descriptors the worker opens take
them.  Measured: libzmq's eventfd took 0, and the pipe that carries SIGTERM to the stop thread
(stop_signals.py) took 1 and 2.  Every line written to "stderr" then went into that pipe, where
the stop thread read it as signal numbers; SIGUSR1's stacks went there too; and Python, finding
fd 1 closed at start, had set ``sys.stdout`` to None, so the worker's last flush raised and a clean
SIGTERM stop ended with exit status 1.  A process agent ended with the same error.  So the worker
opens /dev/null on each closed one first (the lowest free number is the one taken), and gives
Python's streams a file there: what was to be written there is dropped, as its starter chose.
"""

from __future__ import annotations

import os
import sys


def ensure_open() -> list[int]:
    """Open /dev/null on each of 0, 1 and 2 that is closed (and the matching ``sys`` stream when
    Python set it to None); the descriptors opened."""
    opened = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # the lowest free number: this one, since those below it are open by now
            got = os.open(os.devnull, os.O_RDWR)
            if got != fd:  # not reached: kept open all the same, it is ours from now on
                os.dup2(got, fd)
                os.close(got)
            # inherited, as a standard descriptor is: closed at exec (os.open's default), it left
            # the forkserver the same holes, and its children a ``sys.stdout`` of None
            os.set_inheritable(fd, True)
            opened.append(fd)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))
    return opened
