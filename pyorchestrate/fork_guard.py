"""What a fork of a coordinator's process lets go of: the coordinator's ports and connections.

A script that runs a coordinator may fork (``os.fork``, a ``multiprocessing`` child of the
``fork`` kind, Linux's default before Python 3.14, a pre-forking server).  The copy holds every
descriptor the script had open, the coordinator's listening sockets and its workers' connections
among them, though it has none of the threads that use them.  While such a copy lived on:

- a coordinator started again in place of a crashed one could not bind its address ("Address
  already in use"), so its workers' leases ran out and they stopped the agents it would have
  adopted;
- a coordinator that died or stopped left its workers' connections open, so they did not hear
  that it had gone.

So the copy closes them as it starts, before any code of the user's runs in it.  Which descriptors
they are is read from ``/proc``: the sockets whose local port is one the coordinator bound.  Only
this process's descriptors are closed; the coordinator's own are untouched.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_ports: dict[int, int] = {}  #: port -> how many live coordinators of this process bound it


def hold(ports: list[int]) -> None:
    """The calling coordinator bound ``ports``: a fork of this process closes their sockets."""
    with _lock:
        for port in ports:
            _ports[port] = _ports.get(port, 0) + 1


def release(ports: list[int]) -> None:
    """The coordinator that bound ``ports`` closed them."""
    with _lock:
        for port in ports:
            left = _ports.get(port, 0) - 1
            if left > 0:
                _ports[port] = left
            else:
                _ports.pop(port, None)


def socket_inodes(ports: set[int]) -> set[str]:
    """The inodes (as ``/proc`` names them) of this network namespace's TCP sockets whose local
    port is in ``ports``: listening ones and the connections they accepted."""
    found: set[str] = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and int(fields[1].rpartition(":")[2], 16) in ports and fields[9] != "0":
                        found.add(fields[9])
        except (OSError, ValueError):
            continue  # no such table (no IPv6), or no /proc: nothing to close from it
    return found


def close_sockets(ports: set[int]) -> int:
    """Close this process's descriptors of the TCP sockets on ``ports``; how many were closed."""
    names = {f"socket:[{inode}]" for inode in socket_inodes(ports)}
    closed = 0
    if not names:
        return 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in names:
                os.close(int(fd))
                closed += 1
        except (OSError, ValueError):
            continue  # closed meanwhile (the listing's own descriptor among them)
    return closed


def _forked() -> None:
    # only the forking thread runs here: no lock (its holder may be a thread that is not copied)
    ports = set(_ports)
    if ports:
        close_sockets(ports)


os.register_at_fork(after_in_child=_forked)
