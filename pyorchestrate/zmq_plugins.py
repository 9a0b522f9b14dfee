"""Communication plugins for agent-to-agent messaging across hosts over ZeroMQ (msgpack payloads)."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from . import curve, protocol, sockets
from .keys import KeyDir
from .plugins import PluginBase
from .timeouts import until_done_if_past_max


def _poll(sock: zmq.Socket, timeout: float | None) -> int:
    """Wait up to ``timeout`` seconds (None, or any length past threading's: until) for input."""
    timeout = until_done_if_past_max(timeout)
    return sock.poll(None if timeout is None else int(timeout * 1000))


def _pack(data: Any) -> bytes:
    return protocol.pack_plain(data, f"cannot send {type(data).__name__}")


class _ZmqPlugin(PluginBase):
    def __init__(self, address: str, *, bind: bool, keys: str | None = None) -> None:
        sockets.parse_tcp(address)
        self.address = address
        self.bind = bind
        #: a key directory holding the agent-link pair (None: $PYORCHESTRATE_KEYS, which a worker
        #: started with --keys sets for its agents); with one, both ends speak CurveZMQ and only
        #: holders of that pair can connect
        self.keys = keys
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._gate: curve.LinkGate | None = None

    def _open(self, kind: int) -> zmq.Socket:
        self._ctx = zmq.Context()
        sock = sockets.make_socket(self._ctx, kind, linger_ms=0)
        keydir = KeyDir.from_option(self.keys)
        if keydir is not None:
            pair = keydir.links()
            if self.bind:
                self._gate = curve.LinkGate(self._ctx, pair[0])
                self._gate.start()
            curve.link(sock, pair, server=self.bind)
        if self.bind:
            sockets.bind(sock, self.address)
        else:
            sockets.connect(sock, self.address)
        return sock

    def finalize(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._gate is not None:
            self._gate.stop()
            self._gate = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __getstate__(self) -> dict[str, Any]:
        # a plugin travels to its worker before it opens anything
        return {k: (None if k in ("_ctx", "_sock", "_gate") else v) for k, v in self.__dict__.items()}


class ZmqPubSub(_ZmqPlugin):
    """Publish or subscribe.  ``role="pub"`` binds ``address`` (by default) and :meth:`send`s;
    ``role="sub"`` connects and :meth:`recv`s messages whose topic starts with one of ``topics``.
    PUB/SUB drops what a slow or late subscriber misses."""

    def __init__(self, address: str, role: str = "pub", topics: list[str] | None = None, bind: bool | None = None,
                 keys: str | None = None) -> None:
        if role not in ("pub", "sub"):
            raise ValueError(f"ZmqPubSub role={role!r}: use 'pub' or 'sub'")
        super().__init__(address, bind=(role == "pub") if bind is None else bind, keys=keys)
        self.role = role
        self.topics = topics if topics is not None else [""]

    def initialize(self) -> None:
        """Open the socket (bind or connect)."""
        self._sock = self._open(zmq.PUB if self.role == "pub" else zmq.SUB)
        if self.role == "sub":
            for topic in self.topics:
                self._sock.setsockopt_string(zmq.SUBSCRIBE, topic)

    def send(self, topic: str, data: Any) -> None:
        """Publish ``data`` under ``topic`` (never blocks)."""
        assert self._sock is not None, "plugin not initialized"
        try:
            self._sock.send_multipart([topic.encode(), _pack(data)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB drops at the high-water mark: that is its contract

    def recv(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """The next ``(topic, data)``, or None after ``timeout`` seconds."""
        assert self._sock is not None, "plugin not initialized"
        if not _poll(self._sock, timeout):
            return None
        topic, body = self._sock.recv_multipart()
        return topic.decode(errors="replace"), msgpack.unpackb(body, raw=False)


class ZmqReqRep(_ZmqPlugin):
    """Request/reply.  ``role="rep"`` binds and answers with :meth:`recv` then :meth:`reply`;
    ``role="req"`` connects and calls :meth:`request`, which raises TimeoutError after ``timeout``
    seconds and resets its socket, so one lost reply never wedges it."""

    def __init__(self, address: str, role: str = "req", timeout: float = 5.0, bind: bool | None = None,
                 keys: str | None = None) -> None:
        if role not in ("req", "rep"):
            raise ValueError(f"ZmqReqRep role={role!r}: use 'req' or 'rep'")
        super().__init__(address, bind=(role == "rep") if bind is None else bind, keys=keys)
        self.role = role
        self.timeout = timeout

    def initialize(self) -> None:
        """Open the socket (bind or connect)."""
        self._sock = self._open(zmq.REQ if self.role == "req" else zmq.REP)

    def request(self, data: Any, timeout: float | None = None) -> Any:
        """Send ``data``, wait for the reply."""
        assert self._sock is not None and self.role == "req", "request() needs an initialized role='req' plugin"
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        # bounded like the reply: a send can find no pipe (a handshake refused for good) and wait forever
        unsent = sockets.send_by(self._sock, _pack(data), deadline, time.monotonic) is not None
        if unsent or not self._sock.poll(sockets.wait_ms(deadline - time.monotonic())):
            self.finalize()  # a REQ socket that missed its reply can send nothing more: start over
            self.initialize()
            raise TimeoutError(f"no reply from {self.address} within {wait} s")
        return msgpack.unpackb(self._sock.recv(), raw=False)

    def recv(self, timeout: float | None = None) -> Any:
        """The next request (then call :meth:`reply`), or None after ``timeout`` seconds."""
        assert self._sock is not None and self.role == "rep", "recv() needs an initialized role='rep' plugin"
        if not _poll(self._sock, timeout):
            return None
        return msgpack.unpackb(self._sock.recv(), raw=False)

    def reply(self, data: Any) -> None:
        """Answer the request just received."""
        assert self._sock is not None
        self._sock.send(_pack(data))
