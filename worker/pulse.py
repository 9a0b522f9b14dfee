"""A worker's pulse: a small process of its own that tells the coordinator "the worker's process is
alive and not stopped", when the worker's loop cannot say it in time.

Every Python thread needs the GIL, the worker's heartbeat included.  With thousands of agent
threads (the GIL herd) or an agent in C code that holds the GIL for seconds, the loop can be silent
past the liveness window while the process and its agents are perfectly alive: a false death, and
the agents would be started a second time elsewhere.  This process has a GIL of its own.  Once per
heartbeat interval it reads the worker's state from ``/proc`` and, unless the worker is stopped
(SIGSTOP: state T) or gone, sends ``pulse`` (the worker's name and secret) on a connection of its
own.  The coordinator then holds the worker busy, not lost (up to ``Limits.busy_cap``), and echoes
the pulse; the echo goes to the worker through a pipe and renews its lease, so neither side acts on
a silence the other does not see.  What a pulse cannot cross (a partition, a stopped or dead
process) still ends in WORKER_LOST at the usual window.

Started by the worker (``--pulse``), configured through its stdin (one JSON line: the secret is
never in argv), it exits when the worker's pipe closes.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import zmq

from pyorchestrate import curve, protocol, sockets

from . import clock
from pyorchestrate.proc_state import alive_and_running, process_stat, worker_state  # noqa: F401  (imported from here)

ECHO = struct.Struct("d")  # one echoed stamp (clock.now(): the worker's lease clock, see clock.py)


#: written once booted, before the configuration is read: a stamp no lease counts from
BOOTED = ECHO.pack(0.0)


def main() -> int:
    # started ahead of the worker's first registration, it says when it is booted and waits here
    # (see node.py, _pulse_spare)
    os.write(sys.stdout.fileno(), BOOTED)
    line = sys.stdin.readline()
    if not line:
        return 0  # the worker ended before it needed us
    config = json.loads(line)
    parent, interval = int(config["pid"]), float(config["interval"])
    _, key = curve.client_key(config.get("keys"), ("worker",), config.get("key_name"))
    ctx = zmq.Context()
    dealer = sockets.make_socket(ctx, zmq.DEALER, linger_ms=0)
    if key is not None:
        curve.connect_as(dealer, key)
    sockets.connect(dealer, config["coordinator"])
    out = sys.stdout.fileno()
    os.set_blocking(out, False)  # a worker too busy to read loses echoes, never blocks us
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)  # closed (EOF) when the worker ends
    try:
        next_pulse = clock.now()
        while True:
            now = clock.now()
            if now >= next_pulse:
                state = worker_state(parent)
                if state is None:
                    return 0  # the worker is gone
                if alive_and_running(state):
                    try:
                        dealer.send(protocol.encode("pulse", name=config["name"], token=config["token"], t=now),
                                    zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                next_pulse = now + interval
            for sock, _ in poller.poll(sockets.wait_ms(next_pulse - clock.now())):
                if sock is dealer:
                    try:
                        reply = protocol.decode(dealer.recv())
                    except protocol.ProtocolError:
                        continue
                    if reply["type"] == "pulse_reply":
                        try:
                            os.write(out, ECHO.pack(float(reply["echo"])))
                        except (BlockingIOError, BrokenPipeError):
                            pass
                elif not sys.stdin.buffer.read1(1):
                    return 0  # the worker closed our stdin: it is ending
    finally:
        dealer.close(0)
        ctx.term()


if __name__ == "__main__":
    raise SystemExit(main())
