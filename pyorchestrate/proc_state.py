"""What ``/proc`` says about a process: is it alive and running, stopped, or gone?  (A pulse, the
worker's or the coordinator's, vouches only for a process that is alive and not stopped.)"""

from __future__ import annotations


def process_stat(pid: int) -> tuple[str, int] | None:
    """The state letter (R, S, D, T, Z, ...) and process group of ``pid``, None if it is gone
    (or there is no /proc)."""
    ids = process_ids(pid)
    return None if ids is None else (ids[0], ids[2])


def process_ids(pid: int) -> tuple[str, int, int] | None:
    """The state letter, parent and process group of ``pid``, None if it is gone (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the name (field 2) is in parentheses and may hold spaces: state, ppid, pgrp follow the last ")"
    fields = stat[stat.rindex(b")") + 2:].split(maxsplit=3)
    return fields[0].decode(), int(fields[1]), int(fields[2])


def worker_state(pid: int) -> str | None:
    """The process state letter of ``pid`` (R, S, D, T, Z, ...), None if it is gone."""
    stat = process_stat(pid)
    return None if stat is None else stat[0]


def alive_and_running(state: str | None) -> bool:
    """Would a pulse tell the truth?  Not for a stopped (T, t), dead (Z, X) or vanished process."""
    return state is not None and state not in ("T", "t", "Z", "X", "x")
