"""CurveZMQ on our sockets: the coordinator serves, workers and subscribers are clients.

Clients know the coordinator's public key, so they never talk to an impostor (no code is run from
whoever binds the address first).  The coordinator admits a client only if its public key is in
the key directory's ``allowed/ROLE`` and the role may use that port (the ZAP domain of the socket):

- ``control`` (workers register; clients query and act, see :mod:`pyorchestrate.control`): worker,
  admin and reader keys (a register needs a worker key, an action an admin key: the coordinator
  checks the role per message)
- ``bus`` (workers publish their agents' events): worker keys
- ``events`` (subscribers): reader, worker and admin keys

The ZAP handler is pyzmq's ``ThreadAuthenticator`` (a thread that owns the ZAP socket), with our
roles as its credentials callback; the decision (:meth:`Gatekeeper.decide`) is plain logic.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .keys import ClientKey, KeyDir, log
from .log_thread import deferrable, defer_in_this_thread

#: what pyzmq's authenticator logs (its thread's own lines), deferrable as ours
_ZAP_LOG = deferrable(logging.getLogger("pyorchestrate.zap"))

DOMAINS: dict[str, tuple[str, ...]] = {
    "control": ("worker", "admin", "reader"),
    "bus": ("worker",),
    "pulse": ("worker",),  # the coordinator's pulse process (coordinator_pulse.py)
    "events": ("reader", "worker", "admin"),
}
_LOG_EVERY = 10.0  # seconds between log lines about refused keys (each counted anyway)


def client_key(keys: "str | os.PathLike | KeyDir | ClientKey | None", roles: tuple[str, ...],
               name: str | None = None) -> tuple[KeyDir | None, ClientKey | None]:
    """The key a client connects with: a :class:`ClientKey` as it is, or this host's key for the
    first of ``roles`` held in a key directory (given, or ``$PYORCHESTRATE_KEYS``); (None, None): no keys."""
    if isinstance(keys, ClientKey):
        return None, keys
    keydir = keys if isinstance(keys, KeyDir) else KeyDir.from_option(keys)
    if keydir is None:
        return None, None
    return keydir, keydir.client_any(roles, name)


def serve(sock: zmq.Socket, pair: tuple[bytes, bytes], domain: str) -> None:
    """Make ``sock`` a CURVE server whose clients are judged in ZAP ``domain`` (before bind)."""
    assert domain in DOMAINS
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = pair
    sock.zap_domain = domain.encode()


def connect_as(sock: zmq.Socket, key: ClientKey) -> None:
    """Make ``sock`` a CURVE client that talks only to the coordinator whose key it holds (before connect)."""
    sock.curve_serverkey = key.server
    sock.curve_publickey = key.public
    sock.curve_secretkey = key.secret


class LinkGate(ThreadAuthenticator):
    """ZAP for an agent-link endpoint (ZmqPubSub/ZmqReqRep binding with keys): only holders of
    the agent-link pair get in."""

    def __init__(self, ctx: zmq.Context, public: bytes) -> None:
        super().__init__(ctx, log=_ZAP_LOG)
        self.public = public
        self.refused = 0

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("links", self)

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.public:
            return True
        self.refused += 1
        return False


def link(sock: zmq.Socket, pair: tuple[bytes, bytes], *, server: bool) -> None:
    """An agent-link socket: both ends hold the same pair; the binding end serves (before bind/connect)."""
    if server:
        sock.curve_server = True
        sock.zap_domain = b"links"
    else:
        sock.curve_serverkey = pair[0]
    sock.curve_publickey, sock.curve_secretkey = pair


class Gatekeeper(ThreadAuthenticator):
    """Admits a connection if its key is admitted in a role that may use the port; counts and logs
    (at a rate limit) everything refused."""

    def __init__(self, ctx: zmq.Context, keydir: KeyDir, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ctx, log=_ZAP_LOG)
        self.keydir = keydir
        self.clock = clock
        self.refused: Counter[str] = Counter()  # "domain: reason" -> count (read by status())
        self._logged: dict[str, tuple[float, int]] = {}

    def start(self) -> None:
        super().start()
        for domain in DOMAINS:
            self.configure_curve_callback(domain, self)

    def decide(self, domain: str, role_name: tuple[str, str] | None) -> str | None:
        """None to admit; else why not."""
        if role_name is None:
            return "unknown or revoked key"
        role, name = role_name
        if role not in DOMAINS.get(domain, ()):
            return f"{role} key {name!r} may not use the {domain} port"
        return None

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials callback (ZAP thread): ``key`` is the client's public key, z85."""
        # every handshake waits for this thread: it must never wait on a log stream (with stderr
        # full, its first refusal held it in that line, and no worker got in after it)
        defer_in_this_thread()
        reason = self.decide(domain, self.keydir.latest().get(key))  # read by the coordinator's KeyWatch
        if reason is None:
            return True
        what = f"{domain}: {reason}"
        self.refused[what] += 1
        now = self.clock()
        last, count = self._logged.get(what, (-_LOG_EVERY, self.refused[what] - 1))
        if now - last >= _LOG_EVERY:
            log.warning("refused a connection to the %s port (%s; key %s...), %d refused so far",
                        domain, reason, key[:8].decode(errors="replace"), self.refused[what])
            self._logged[what] = (now, self.refused[what])
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The User-Id each admitted connection's frames carry: ``role:name``."""
        role_name = self.keydir.latest().get(z85.encode(client_public_key))
        return "{}:{}".format(*role_name) if role_name else ""


HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def server_side(event: int, value: int) -> str:
    """A handshake that failed on a coordinator socket, as a counter name for ``status()``."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "control: a client without keys"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "control: a client holding another coordinator's public key"
    return "control: a handshake that failed"


def explain(event: int, value: int, address: str, key: ClientKey | None, keydir: KeyDir | None,
            expect: str = "") -> str:
    """A client's failed handshake in words: what is wrong and what to do."""
    if (event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_INVALID_METADATA
            and expect):
        return f"{address} is not a coordinator's {expect}: its socket cannot talk to ours (the wrong port?)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the coordinator at {address} refused {key.role} key {key.name!r}: it is unknown there or "
                "was revoked (see `pyorchestrate keys list` on the coordinator's host)" if key else
                f"the coordinator at {address} refused this connection (status {value})")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if key is None:
            return f"{address} requires keys: pass --keys DIR (or set PYORCHESTRATE_KEYS)"
        return f"{address} does not use keys, but this client does: start the coordinator with keys, or drop --keys"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and key is None:
        # a keyed coordinator often closes before our side reads its greeting (no mismatch seen)
        return (f"{address} closes every handshake: it most likely requires keys: pass --keys DIR "
                "(or set PYORCHESTRATE_KEYS)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        where = keydir.path / "coordinator.key" if keydir else "the key directory"
        return (f"the handshake with {address} failed: it does not hold the secret of the coordinator key in "
                f"{where} (another coordinator, or the wrong key directory)")
    return f"the handshake with {address} failed (event {event}, value {value})"


class HandshakeWatch:
    """Watches one client socket's handshakes (a socket monitor) and says what went wrong.

    A handshake that fails without detail (the peer closed during it) is what a client holding
    another coordinator's key sees, but also what any client sees once when the coordinator shuts
    down mid-handshake: it is named only when it happens twice in a row (``streak``, which a
    client that opens a new socket per attempt carries over)."""

    def __init__(self, sock: zmq.Socket, address: str, key: ClientKey | None, keydir: KeyDir | None,
                 streak: list[int] | None = None, expect: str = "") -> None:
        self.address, self.key, self.keydir = address, key, keydir
        # ``expect``: the port the client means ("control port", "events port"): a peer that closes
        # every connection before any handshake (a ZeroMQ socket of a type ours cannot talk to) is
        # the wrong port of the coordinator, and is said so
        self.expect = expect
        self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sock = sock
        self.succeeded = False
        #: a connection is made (TCP) and neither closed nor failed its handshake: it is on its way
        self.connected = False
        self.streak = streak if streak is not None else [0]
        #: connections closed after their handshake succeeded (what was sent on them and not read
        #: yet is lost: a DEALER drops it, even as it connects again)
        self.drops = 0
        self._this_connection_failed = False
        #: the latest failure said (None once a handshake succeeded): still the reason when the
        #: connection it ended is not remade (libzmq gives up after a protocol error)
        self.last: str | None = None

    def failure(self) -> str | None:
        """The latest handshake failure worth saying since the last call (None if none, or a
        handshake succeeded since)."""
        from zmq.utils.monitor import recv_monitor_message

        found = None
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            kind, value = event["event"], int(event["value"])
            if kind == zmq.EVENT_CONNECTED:
                self._this_connection_failed = False
                self.connected = True
            elif kind == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.drops += self.succeeded
                if not self.succeeded and not self._this_connection_failed:
                    # libzmq does not reconnect after such a close: once is all we will see
                    if self.expect:
                        found = (f"{self.address} closes every connection before a ZeroMQ handshake: it is not a "
                                 f"coordinator's {self.expect} (the wrong port, or not pyorchestrate)")
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded, found, self.streak[0] = True, None, 0
                self.last = None
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._this_connection_failed, self.connected = True, False
                self.streak[0] += 1
                if self.streak[0] >= 2:
                    found = explain(kind, value, self.address, self.key, self.keydir)
            else:
                self._this_connection_failed, self.connected = True, False
                self.streak[0] = 0
                found = explain(kind, value, self.address, self.key, self.keydir, self.expect)
        if found:
            self.last = found
        return found

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the socket's next connection or handshake event (read
        it with :meth:`failure`)."""
        if self._monitor is not None:
            self._monitor.poll(int(timeout * 1000))

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
