"""``pyorchestrate-worker --nice N``: a worker that yields the CPU to its coordinator on the same
machine.

Why: with many workers on the coordinator's own machine (S9: 100 worker processes on 2 cores),
the coordinator's threads wait for a CPU behind all of them.  A ``status()`` of 10,000 agents
took up to 95-206 ms at the peak of S9, and so did the least any ``status()`` could do there
(unpickling a ready-made 10,000-row answer in the caller: one C call, no loop involved: up to
142-210 ms); a thread of the coordinator that only sleeps 50 ms woke up to 103-130 ms late.  What
helps is the scheduler serving the coordinator first: with the workers at nice 19, S9's
``status()`` maximum was 47-74 ms and S9 itself ran 25 % faster (figures: README, S9).  The cost:
the workers yield to all other load too (beside 4 CPU burners S9 was slower, and more workers'
leases ran out), so it is for machines where the workers are the load, and off by default.

How (Linux): ``os.nice(N)`` for this process and everything it starts later (agent threads,
processes, hosts, the forkserver); and where the kernel groups processes by session for fairness
(autogroup, ``/proc/self/autogroup``), a niced process only ranks lower *within its session*, so
a worker that leads its own session (``setsid``, as local workers and most service managers start
it) also sets its session's autogroup nice.  A worker that shares its session (started from a
shell) leaves the session alone: it is the user's terminal's.  The pulse process (``--pulse``),
when it runs, starts in a session of its own, so with autogroup it keeps the normal priority.

Only ever lowers the priority (raising it needs privileges, and is not ours to take).
"""

from __future__ import annotations

import os

from pyorchestrate.local_workers import MAX_NICE, check_nice as check  # noqa: F401 - one rule for both sides

AUTOGROUP = "/proc/self/autogroup"


def lower(nice: int) -> list[str]:
    """Lower this process's priority by ``nice`` (and its session's, if it leads one and the
    kernel has autogroup).  Returns what was done, for the log; an OSError is said, not raised
    (a worker at normal priority still works)."""
    check(nice)
    done: list[str] = []
    if nice == 0:
        return done
    try:
        done.append(f"process nice {os.nice(nice)}")
    except OSError as exc:
        done.append(f"process nice not changed ({exc})")
    if os.getsid(0) == os.getpid() and os.path.exists(AUTOGROUP):
        try:
            with open(AUTOGROUP, "w") as f:
                f.write(str(nice))
            done.append(f"session autogroup nice {nice}")
        except OSError as exc:
            done.append(f"session autogroup nice not changed ({exc})")
    return done

