"""A worker's end of the coordinator's pulse (``pyorchestrate/coordinator_pulse.py``).

When the coordinator's echoes of our heartbeats are late (a call of its script may hold the GIL
for seconds), we ask its pulse process, on the port the welcome named, whether its loop is
stalled.  Its answer echoes our stamp, and our lease runs from that stamp, as from a heartbeat's
echo: the coordinator counts a stall of its own against nobody.  Two rules keep that safe:

* we ask only while our lease still runs: a worker whose lease ran out may have been declared
  lost (the coordinator may already be replacing its agents), and no answer brings it back;
* we take an answer only if it came within ``Limits.stall`` of our asking: a late one (a link
  that delays or buffers) says nothing about the coordinator's loop now;
* and only from the coordinator whose welcome we read (its session): a coordinator started anew on
  the same ports knows nothing of the lease its predecessor gave us.

Owned by the worker's loop thread.
"""

from __future__ import annotations

from typing import Any, Callable

import zmq

from pyorchestrate import curve, protocol, sockets
from pyorchestrate.limits import Limits


def should_ask(now: float, lease_from: float, limits: Limits) -> bool:
    """Are the loop's echoes late (more than a stall), while our lease still runs?"""
    return limits.stall < now - lease_from <= limits.lease


def takes(echo: float, now: float, limits: Limits) -> bool:
    """Does an answer echoing our stamp ``echo``, read at ``now``, renew the lease?"""
    return 0.0 <= now - echo < limits.stall


class CoordinatorVouch:
    """A DEALER to the coordinator's pulse process, aimed anew at each welcome."""

    def __init__(self, ctx: zmq.Context, key: Any, drop: Callable[[str, Any], None]) -> None:
        """``drop``: counts a frame that is no valid answer (the worker's DropCounter)."""
        self._ctx = ctx
        self._key = key
        self._drop = drop
        self._sock: zmq.Socket | None = None
        self._address: str | None = None
        self._next_ask = 0.0
        #: the latest ask whose answer may still come in time (0.0: none): answers are read only
        #: then, so a worker whose coordinator answers its heartbeats pays a comparison a turn
        self.asked_at = 0.0

    def aim(self, address: str | None) -> None:
        """Ask the pulse at ``address`` from now on (None: this coordinator has none)."""
        if address == self._address:
            return
        self.close()
        self._address = address
        if address is not None:
            self._sock = sockets.make_socket(self._ctx, zmq.DEALER, linger_ms=0, max_message_size=4096)
            self._sock.setsockopt(zmq.SNDHWM, 4)  # a pulse that does not read gets a few asks, not a backlog
            if self._key is not None:
                curve.connect_as(self._sock, self._key)
            sockets.connect(self._sock, address)

    def ask(self, now: float, lease_from: float, limits: Limits) -> None:
        """Ask if the loop's echoes are late and our lease still runs, at most every quarter interval
        (called every turn of the worker's loop: at heartbeats only, every other one asked, and a
        short lease ran out between two asks)."""
        if self._sock is not None and now >= self._next_ask and should_ask(now, lease_from, limits):
            self._next_ask = now + limits.interval / 4
            self.asked_at = now
            try:
                self._sock.send(protocol.encode("coordinator_pulse", t=now), zmq.NOBLOCK)
            except zmq.Again:
                pass

    def vouched(self, now: float, limits: Limits, session: str) -> float | None:
        """The latest stamp of ours the pulse of the coordinator ``session`` (whose welcome we
        read) answered in time, if any (answers read here)."""
        latest = None
        if now - self.asked_at >= limits.stall:
            self.asked_at = 0.0  # whatever answers now comes too late to count
        while self._sock is not None:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                message = protocol.decode(frame)
            except protocol.ProtocolError as exc:
                self._drop("bad_frame", exc)
                continue
            if (message["type"] == "coordinator_pulse_reply" and message["session"] == session
                    and takes(message["echo"], now, limits)):
                latest = max(latest or 0.0, message["echo"])
        return latest

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        self._sock = None
        self._address = None
