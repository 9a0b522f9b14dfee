"""A worker that must end threads it cannot kill starts again in its own place.

A thread agent stopped at the worker's lease that ignores its stop past its stop timeout would run
beside its replacement, due elsewhere at that moment (node.py: ``_end_threads_past_lease``).  No
thread can be killed, but a process can replace its own image: ``exec`` of the same command ends
every thread, keeps the pid (so whatever started the worker still knows it), the arguments and the
environment, and the new worker registers as a new incarnation.  The pipes to its process agents,
agent hosts, pulse and forkserver are not inherited (Python opens them close-on-exec): those see
their worker gone and end, with what they started.
"""

from __future__ import annotations

import os
import sys

from pyorchestrate.log_thread import EXIT_WAIT, LOG_THREAD


def exec_again() -> None:
    """Replace this process with a fresh run of the command that started it; never returns."""
    if LOG_THREAD.flush(EXIT_WAIT):  # else stderr takes nothing: flushing it would wait for ever
        sys.stdout.flush()
        sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
