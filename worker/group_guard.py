"""What a worker's thread agents start ends with the worker: the worker command's process group.

A thread agent runs in its worker's process, so the processes it starts (``subprocess.Popen``,
``sh -c "job &"``, ``os.fork``) are in the worker's process group.  A process agent's are ended with
it (child.py: it has a group of its own); a thread agent's cannot be told from another's, and
nothing ended them.  When the worker died (SIGKILL, the OOM killer), its coordinator saw the
connection close and started its agents elsewhere at once, and each thread agent's job ran on
beside the new copy's, for ever.  So did they when the worker started again in its own place to end
thread agents stuck past the lease (reexec.py: an exec ends threads, not processes), and when it
stopped.

So a worker command that leads its process group (``setsid``: local workers, systemd, a
container's entrypoint, a shell's job) ends the group's other processes whenever it ends:

- dying: through a guard started at once, a shell in a session of its own that waits on a pipe only
  the worker holds.  When the pipe closes without a "bye" (the worker is gone, however it ended),
  it SIGKILLs the group.  A shell, not Python: 0.7 MB resident and 4 ms to start (measured, on
  a busy machine), not ~10 MB and 30 ms.  A copy of the worker forked by an agent closes its end (:func:`_forked`): it is in the
  group, and holding the pipe it would keep the guard from ever seeing the worker die;
- starting again (exec): it SIGKILLs them itself, says "bye", then execs;
- stopping: once its agents have stopped, SIGTERM, up to a second, then SIGKILL.

A worker that does not lead its group (started by a program that gave it none) leaves the group
alone: the group is someone else's.  A process that left the group on purpose
(``start_new_session=True``, ``setsid``, a daemon) is not followed, as for process agents.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from pyorchestrate.log_thread import deferrable
from pyorchestrate.proc_state import process_ids

log = deferrable(logging.getLogger("pyorchestrate.worker"))

#: the guard: reads one line from the worker's pipe (fd 3: a background job's stdin is /dev/null)
#: in a job the shell leaves behind, so that it is nobody's child to reap; no "bye": the group dies.
#: SIGUSR1 ignored: sent to every process of the worker for its stacks (``systemctl kill``), it
#: ended the guard, and with it the worker's guarantee
_GUARD = ("trap '' USR1; "
          'exec 3<&0; (IFS= read -r word <&3; [ "$word" = bye ] || kill -s KILL -- "-$1") >/dev/null 2>&1 &')
#: how long a SIGKILLed process may take to be gone (it runs until it is scheduled)
_KILL_WAIT = 1.0

_pipe: int | None = None  # our end of the guard's pipe: the guard runs while we hold it


def start() -> bool:
    """Start the guard if this process leads its process group (once); True if it runs."""
    global _pipe
    if _pipe is not None:
        return True
    if os.getpgrp() != os.getpid():
        log.info("this worker does not lead its process group: processes its thread agents start are not ended "
                 "with it (start it with setsid, or in a session of its own, for that)")
        return False
    try:
        shell = subprocess.Popen(["/bin/sh", "-c", _GUARD, "guard", str(os.getpid())], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                                 start_new_session=True)
    except OSError as exc:
        log.warning("could not start the guard that ends processes of thread agents with this worker: %s", exc)
        return False
    assert shell.stdin is not None
    # a bare descriptor (os.dup's is close-on-exec, as the pipe's): no file object whose collection
    # would close it, and nothing to flush in a forked copy
    _pipe = os.dup(shell.stdin.fileno())
    shell.stdin.close()
    try:
        shell.wait(5)  # the shell leaves its job and exits at once
    except subprocess.TimeoutExpired:
        pass
    return True


def _helpers_of_ours() -> set[int]:
    """multiprocessing's forkserver (process agents are forked from it) and resource tracker: in
    our group, but ours, and they end by themselves when we do (their pipes close)."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    return {pid for pid in (getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_forkserver_pid", None),
                            getattr(getattr(multiprocessing.resource_tracker, "_resource_tracker", None), "_pid", None))
            if pid}


def members() -> dict[int, int]:
    """The other running processes of our group (a zombie does not run), but for our own helpers:
    pid -> parent pid."""
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    ours = _helpers_of_ours()
    return {pid: ids[1] for pid in pids if pid != me and pid not in ours and (ids := process_ids(pid))
            and ids[2] == me and ids[0] not in ("Z", "X")}


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:  # gone meanwhile
            pass


def _of(targets: set[int] | None) -> list[int]:
    """What of our group runs: all of it (``targets`` None), or ``targets`` and their descendants
    (added to ``targets`` as they are found: one may fork as we look)."""
    now = members()
    if targets is None:
        return list(now)
    grew = True
    while grew:
        grew = False
        for pid, parent in now.items():
            if pid not in targets and parent in targets:
                targets.add(pid)
                grew = True
    return [pid for pid in now if pid in targets]


def _until_none(targets: set[int] | None, timeout: float, sig: int | None = None) -> list[int]:
    """Wait up to ``timeout`` for none of ``targets`` (see :func:`_of`) to run, sending ``sig`` to
    each found meanwhile; what still runs."""
    deadline = time.monotonic() + timeout
    while True:
        left = _of(targets)
        if not left or time.monotonic() >= deadline:
            return left
        if sig is not None:
            _signal(left, sig)
        time.sleep(0.01)


def end_members(grace: float, why: str, everything: bool = True) -> int:
    """End the other processes of our group (only with the guard: we lead it): SIGTERM and up to
    ``grace`` seconds, then SIGKILL (at once if ``grace`` is 0).  ``everything=False``: only those
    running now and what they start meanwhile, not what an agent started after this call (one
    started as this worker serves again).  Returns how many were found at first."""
    if _pipe is None:
        return 0
    found = list(members())
    if not found:
        return 0
    targets = None if everything else set(found)
    log.warning("%d process(es) that thread agents started still run as this worker %s: ending them (%s)",
                len(found), why, ", ".join(map(str, found[:10])))
    if grace > 0:
        _signal(found, signal.SIGTERM)
        left = _until_none(targets, grace)
    else:
        left = found
    _signal(left, signal.SIGKILL)
    _until_none(targets, _KILL_WAIT, signal.SIGKILL)
    for pid in found:  # our own children among them: not left as zombies to the next image
        try:
            os.waitpid(pid, os.WNOHANG)
        except OSError:  # not our child (a shell's job), or reaped already
            pass
    return len(found)


def before_exec() -> None:
    """This process is about to exec itself (reexec.py): end the group's other processes, then
    tell the guard it is not a death (the exec closes the pipe)."""
    global _pipe
    if _pipe is None:
        return
    end_members(0, "starts again")
    try:
        os.write(_pipe, b"bye\n")
        os.close(_pipe)
    except OSError:
        pass
    _pipe = None  # an exec that fails leaves us without a guard: start() may run again


def _forked() -> None:
    """In a copy of the worker that an agent forked: let go of the guard's pipe (only the worker
    holds it, so that it closes when the worker dies).  The copy stays in the group."""
    global _pipe
    if _pipe is not None:
        try:
            os.close(_pipe)
        except OSError:
            pass
        _pipe = None


os.register_at_fork(after_in_child=_forked)
