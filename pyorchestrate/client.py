"""A client of a running coordinator's control port: what ``pyorchestrate status/ps/stop/...`` and
the dashboard use.  Request/reply over a DEALER socket (the port workers use; the coordinator tells
clients from workers by the message), CurveZMQ with an admin or reader key when keys are in use.

    from pyorchestrate import ControlClient
    with ControlClient("tcp://127.0.0.1:5555") as client:
        print(client.status()["agents"]["by_state"])
        client.stop("sampler")
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import zmq

from . import curve, protocol, sockets
from .control import OPS

#: where the CLI and the dashboard find the coordinator when no --address is given
ADDRESS_ENV = "PYORCHESTRATE_ADDRESS"


class ControlError(Exception):
    """The coordinator refused a request (the text says why and what to do), or did not answer."""


class NoAnswer(ControlError):
    """Nothing answered in time (nothing listens there, the wrong port, or keys do not match)."""


def resolve_address(address: str | None) -> str:
    """``address``, else ``$PYORCHESTRATE_ADDRESS``; raise :class:`ControlError` saying what to pass."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ControlError(f"which coordinator? pass --address tcp://HOST:PORT (its control address, the one "
                           f"workers use) or set {ADDRESS_ENV}")
    try:
        sockets.parse_tcp(address)
    except sockets.AddressError as exc:
        raise ControlError(str(exc)) from None
    return address


#: what a request that went out unanswered may have done: an action may have been taken, and
#: asked again it is taken again (a second restart, say); a query did nothing
_MAYBE_DONE = {op: f"; the {op} request went out and may have been carried out: look (pyorchestrate ps) "
                   "before asking again" for op, spec in OPS.items() if spec.role == "admin"}


class ControlClient:
    """Requests to one coordinator, one at a time (not thread-safe: one client per thread).

    ``keys``: a key directory (default ``$PYORCHESTRATE_KEYS``); the client connects with its
    admin key if it holds one, else its reader key (queries only)."""

    def __init__(self, address: str | None = None, *, keys: Any = None, key_name: str | None = None,
                 timeout: float = 5.0, roles: tuple[str, ...] = ("admin", "reader")) -> None:
        self.address = resolve_address(address)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:  # NaN too
            # (nan raised "cannot convert float NaN to integer" at the first request; 0 and -1 said
            # no coordinator answered "within -1 s")
            raise ValueError(f"timeout={timeout!r}: use a number of seconds > 0 (inf: wait for ever)")
        self.timeout = timeout
        self._keydir, self.key = curve.client_key(keys, roles, key_name)
        self._ctx = zmq.Context()
        self._sock = sockets.make_socket(self._ctx, zmq.DEALER, max_message_size=protocol.DEFAULT_MAX_MESSAGE_SIZE)
        if self.key is not None:
            curve.connect_as(self._sock, self.key)
        self._watch = curve.HandshakeWatch(self._sock, self.address, self.key, self._keydir, expect="control port")
        sockets.connect(self._sock, self.address)

    def request(self, op: str, **args: Any) -> Any:
        """Send one request and wait for its answer; raise :class:`ControlError` if refused,
        :class:`NoAnswer` if nothing answers within ``timeout``."""
        rid = uuid.uuid4().hex
        deadline = time.monotonic() + self.timeout
        frame = protocol.encode("request", id=rid, op=op, args={k: v for k, v in args.items() if v is not None})
        unsent = sockets.send_by(self._sock, frame, deadline, time.monotonic, self._watch.failure)
        if unsent is not None:
            raise NoAnswer(unsent or self._watch.last or f"could not even send to {self.address} within {self.timeout:g} s: no "
                                     "connection to it was made (is it running, and is this its control address?)")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = self._watch.failure() or self._watch.last
                raise NoAnswer((why or f"no coordinator answered at {self.address} within {self.timeout:g} s "
                                       "(is it running, and is this its control address, the one workers use?)")
                               + _MAYBE_DONE.get(op, ""))
            if not self._sock.poll(min(remaining, 0.2) * 1000):
                why = self._watch.failure()
                if why:
                    raise NoAnswer(why)
                continue
            try:
                reply = protocol.decode(self._sock.recv())
            except protocol.ProtocolError:
                continue  # not for us (another version's frame): keep waiting for ours
            if reply["type"] != "reply" or reply["id"] != rid:
                continue  # a late answer to a request that timed out, or a worker message
            if not reply["ok"]:
                raise ControlError(reply["error"])
            return reply["result"]

    # one method per request (see pyorchestrate.control.OPS)
    def status(self) -> dict[str, Any]:
        """The cluster summary: agents and workers by state, events, drops, loop lag."""
        return self.request("status")

    def agents(self, state: str | None = None, worker: str | None = None, limit: int = 0) -> list[dict[str, Any]]:
        """One row per agent (name, state, worker, restarts, uptime, last_error, ...); with
        ``limit``, at most so many (those with an error first)."""
        return self.request("agents", state=state, worker=worker, limit=limit or None)

    def workers(self) -> list[dict[str, Any]]:
        """One row per worker (name, host, labels, capacity, running, since_heartbeat, state)."""
        return self.request("workers")

    def history(self, agent: str | None = None, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Recent events the coordinator still holds (of ``agent``; since wall time ``since``)."""
        return self.request("history", agent=agent, since=since, limit=limit)

    def start(self, agent: str) -> dict[str, Any]:
        return self.request("start", agent=agent)

    def stop(self, agent: str, timeout: float | None = None) -> dict[str, Any]:
        return self.request("stop", agent=agent, timeout=timeout)

    def restart(self, agent: str, timeout: float | None = None) -> dict[str, Any]:
        return self.request("restart", agent=agent, timeout=timeout)

    def drain(self, worker: str) -> dict[str, Any]:
        return self.request("drain", worker=worker)

    def shutdown(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request("shutdown", timeout=timeout)

    def close(self) -> None:
        self._watch.close()
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
