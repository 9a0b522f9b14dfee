"""The open-files limit a coordinator or a worker runs with: its soft limit raised to its hard one.

Every connection costs a file descriptor: a worker's, a subscriber's, a command's, and a stranger's
who opens TCP connections and never completes a handshake (libzmq keeps each for its handshake
interval, 30 s).  Most Linux systems start processes with a soft limit of 1,024 under a hard limit
hundreds of times higher.  At the soft limit libzmq's listener fails every ``accept`` with EMFILE
and retries at once: measured here with a soft limit of 200 and 300 idle connections from a
stranger, the coordinator's I/O thread spun at 107 % CPU and no command, subscriber or worker
could connect until the stranger let go.  A worker at its limit fails process agents' starts
(each takes about four descriptors: pipes to it and its sentinel).

So both raise their soft limit to the hard limit at start, as many servers do: an unprivileged
process may, and it only moves the point where this happens as far as the machine's
administrator allows.  Only the soft limit: the hard one is the administrator's (``ulimit -Hn``,
systemd's ``LimitNOFILE``).
"""

from __future__ import annotations

import logging
import os

from .log_thread import deferrable

log = deferrable(logging.getLogger("pyorchestrate.fd_limit"))

#: what an unlimited hard limit becomes: Linux refuses a soft limit above ``fs.nr_open``
#: (1,048,576 by default) and macOS one above ``kern.maxfilesperproc``
_TRIES_BELOW_UNLIMITED = (1 << 20, 1 << 16, 10_240)


def raise_open_files_limit(who: str) -> tuple[int, int] | None:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (or the most the system
    takes below an unlimited one).  Returns ``(before, after)`` when it rose, else None; never
    lowers it and never raises an error (``who`` names the process in the log line)."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None  # nothing is higher
    tries = _TRIES_BELOW_UNLIMITED if hard == resource.RLIM_INFINITY else (hard, 10_240)
    for target in tries:
        if soft >= target:
            return None  # already as high
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # above what this system takes: try lower
            continue
        log.info("%s: open files limit raised from %d to %d (hard limit %s)", who, soft, target, hard)
        return soft, target
    log.debug("%s: open files limit stays at %s (hard %s)", who, soft, hard)
    return None


def open_files() -> dict[str, int] | None:
    """This process's open descriptors and its soft limit (``ControlClient.status()["open_files"]``,
    ``pyorchestrate status``), or None where the system does not tell (no ``/proc/self/fd``):
    near the limit, no one else gets in."""
    try:
        import resource

        count = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself held
    except (ImportError, OSError):
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return {"open": count, "limit": -1 if soft == resource.RLIM_INFINITY else soft}
