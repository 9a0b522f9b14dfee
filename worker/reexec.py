"""A worker that must end threads it cannot kill starts again in its own place.

A thread agent stopped at the worker's lease that ignores its stop past its stop timeout would run
beside its replacement, due elsewhere at that moment (node.py: ``_end_threads_past_lease``); so
would a thread that a thread agent started and left running as it stopped
(``_end_left_threads``).  No thread can be killed, but a process can replace its own image: ``exec`` of the same command ends
every thread, keeps the pid (so whatever started the worker still knows it), the arguments and the
environment, and the new worker registers as a new incarnation.  The pipes to its process agents,
agent hosts, pulse and forkserver are not inherited (Python opens them close-on-exec): those see
their worker gone and end, with what they started.

"The same command" means the same arguments *from the same directory, with the same environment*:
the working directory and ``os.environ`` are the process's, and a thread agent may have changed
them (``os.chdir`` into a job's folder is common).  A worker started with ``--keys ../keys`` and
started again from an agent's directory found no keys and ended, its agents never back.  Both are
taken when this module is first imported, which the worker's command does before it runs anything
of an agent's.
"""

from __future__ import annotations

import json
import os
import sys

from pyorchestrate.log_thread import EXIT_WAIT, LOG_THREAD

from . import group_guard

#: what the process before an exec dropped, and what the exec itself lost (reports not yet
#: delivered, bus items not yet sent), as JSON counts by kind: the new process says them in its
#: heartbeats, as it would have (before, an exec lost them uncounted)
CARRIED = "PYORCHESTRATE_DROPPED_BEFORE_EXEC"

_START_DIR = os.getcwd()
_CARRIED = os.environ.pop(CARRIED, "")  # (not in the environment the next exec starts with)
_START_ENV = dict(os.environ)


def carried_drops() -> dict[str, int]:
    """The drop counts the process before this one's exec carried over (empty if there was none)."""
    try:
        counts = json.loads(_CARRIED) if _CARRIED else {}
    except ValueError:
        return {}
    if not isinstance(counts, dict):
        return {}
    return {str(kind): n for kind, n in counts.items() if isinstance(n, int) and n > 0}


def exec_again(dropped: dict[str, int] | None = None) -> None:
    """Replace this process with a fresh run of the command that started it, from the directory
    and with the environment it started with; never returns.  What thread agents started ends
    first: an exec ends threads, not processes (group_guard.py).  ``dropped``: counts by kind
    the new process starts with (:func:`carried_drops`)."""
    group_guard.before_exec()
    if LOG_THREAD.flush(EXIT_WAIT):  # else stderr takes nothing: flushing it would wait for ever
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        os.chdir(_START_DIR)
    except OSError as exc:  # removed since: relative paths in the command cannot mean what they did
        print(f"pyorchestrate-worker: cannot return to {_START_DIR} ({exc.strerror}) before starting again; "
              f"starting again from {os.getcwd()}", file=sys.stderr, flush=True)
    env = dict(_START_ENV)
    if dropped:
        env[CARRIED] = json.dumps(dropped)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
