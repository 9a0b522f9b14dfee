"""The one place sockets are made: transport options are set here for every socket we open.

Every socket gets a bounded linger (so closing never hangs), a maximum message size (libzmq
drops a peer that sends more, before Python sees it), and high-water marks sized for bursts of
lifecycle events.  Address helpers live here too, because binding is where security starts.
"""

from __future__ import annotations

import ipaddress
import socket as _socket
import struct
from typing import Any, Callable

import zmq

from .protocol import DEFAULT_MAX_MESSAGE_SIZE

LINGER_MS = 1000
HWM = 100_000


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    linger_ms: int = LINGER_MS,
) -> zmq.Socket:
    """Create a socket with the project's transport options."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if kind == zmq.ROUTER:
        # a send to a vanished peer raises EHOSTUNREACH instead of vanishing silently
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind == zmq.XPUB:
        # deliver every (un)subscription so garbage can be told from a real subscribe
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    return sock


class AddressError(ValueError):
    """An address the user gave that we cannot or will not use."""


def parse_tcp(address: str) -> tuple[str, str]:
    """Split ``tcp://HOST:PORT`` into ``(host, port)``; port may be ``*`` or ``0`` (any)."""
    if not isinstance(address, str) or not address.startswith("tcp://"):
        raise AddressError(
            f"address {address!r} is not of the form tcp://HOST:PORT "
            "(for example tcp://127.0.0.1:5555, or tcp://127.0.0.1:* for any free port)"
        )
    rest = address[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port:
        raise AddressError(f"address {address!r} needs a host and a port, as tcp://HOST:PORT")
    if port not in ("*", "0") and not (port.isdigit() and 0 < int(port) < 65536):
        raise AddressError(f"address {address!r}: port {port!r} is not a number from 1 to 65535 or *")
    return host.strip("[]"), port


def is_loopback(host: str) -> bool:
    """True if binding ``host`` exposes nothing beyond this machine."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in _socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_bind_allowed(address: str, *, insecure: bool, keyed: bool = False) -> None:
    """Refuse to expose a code-executing port beyond loopback without keys, unless the user says so."""
    host, _ = parse_tcp(address)
    if not is_loopback(host) and not insecure and not keyed:
        raise AddressError(
            f"refusing to bind {address}: workers run any code the coordinator sends, so anyone who "
            "can reach this port without keys could run code on your workers. Use keys "
            "(`pyorchestrate keys init DIR`, then Config(keys=DIR) here and --keys DIR on workers), bind "
            "127.0.0.1 for a single host, or pass insecure=True (trusted network only)."
        )


def is_ipv6(address: str) -> bool:
    """Does ``tcp://HOST:PORT`` name an IPv6 address (``tcp://[::1]:5555``)?"""
    host = address[len("tcp://"):].rpartition(":")[0] if isinstance(address, str) else ""
    return ":" in host


def use_family(sock: zmq.Socket, address: str) -> None:
    """Let ``sock`` speak IPv6 if ``address`` is an IPv6 literal.  libzmq's sockets are IPv4 only
    unless told (they refused ``tcp://[::1]:5555`` with "No such device"); turning IPv6 on for
    every socket would make a name like ``localhost`` resolve to ``::1`` first, where a coordinator
    bound to 127.0.0.1 does not listen.  So only a literal IPv6 address turns it on: host names
    stay IPv4, as before."""
    if is_ipv6(address):
        sock.setsockopt(zmq.IPV6, 1)


def connect(sock: zmq.Socket, address: str) -> None:
    """Connect ``sock`` to ``address`` (IPv4, or IPv6 if the address is an IPv6 literal)."""
    use_family(sock, address)
    sock.connect(address)


def bind(sock: zmq.Socket, address: str) -> str:
    """Bind ``address`` (port ``*``/``0`` = OS-chosen) and return the address actually bound."""
    host, port = parse_tcp(address)
    use_family(sock, address)
    host_part = f"[{host}]" if ":" in host else host
    if port in ("*", "0"):
        sock.bind(f"tcp://{host_part}:*")
    else:
        try:
            sock.bind(f"tcp://{host_part}:{port}")
        except zmq.ZMQError as exc:
            raise AddressError(f"cannot bind {address}: {exc.strerror} (is another coordinator using it?)") from None
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return endpoint


def port_of(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def with_port(address: str, port: int) -> str:
    """``address`` with its port replaced: how a worker reaches the bus on the coordinator's host."""
    host, _ = parse_tcp(address)
    host_part = f"[{host}]" if ":" in host else host
    return f"tcp://{host_part}:{port}"


def connectable(endpoint: str) -> str:
    """Turn a bound endpoint into one a client can connect to (0.0.0.0 -> this host's name)."""
    host, port = parse_tcp(endpoint)
    if host in ("0.0.0.0", "::", "*"):
        host = _socket.gethostname()
    host_part = f"[{host}]" if ":" in host else host
    return f"tcp://{host_part}:{port}"


def send_by(sock: zmq.Socket, frame: bytes, deadline: float, clock: Callable[[], float],
            stop: Callable[[], Any] = lambda: None) -> Any:
    """Send ``frame`` on a connecting DEALER or REQ socket by ``deadline`` (on ``clock``); never block
    past it.  Returns None once sent, else ``stop()``'s answer (truthy: give up at once) or False
    at the deadline.

    A plain ``send`` on such a socket blocks while it has no pipe to its peer, and libzmq takes
    the pipe away for good when a handshake fails on a protocol error (a client without keys at a
    keyed coordinator: mechanism mismatch) and does not reconnect. The failure can land between
    ``connect`` and ``send`` on a busy machine, and the send then waited forever (seen in CI:
    ``pyorchestrate status --timeout 3`` still hung after 60 s)."""
    while True:
        try:
            sock.send(frame, zmq.NOBLOCK)
            return None
        except zmq.Again:
            pass
        why = stop()
        if why:
            return why
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        sock.poll(wait_ms(min(remaining, 0.2)), zmq.POLLOUT)


def wait_ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds until a deadline ``seconds`` away, rounded *up*:
    rounded down, the last millisecond before every deadline was polled with 0 again and again
    (a busy loop: ~140 empty polls a second on an idle coordinator)."""
    return max(0, -int(-seconds * 1000 // 1))


# plain ints: pyzmq's constants are enum members, and ``int & IntFlag`` goes through enum's
# Python-level __and__ and a member lookup (3.2 against 1.75 us a call here, twice a loop turn)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def readable(sock: zmq.Socket) -> bool:
    """Is a message waiting on ``sock``?  A drain asks once, after its first message (the poll
    said that one was there): most drains read one message, and reading on until ``zmq.Again``
    cost them that exception, twice this question (6.5 vs 3.1 us here).  A drain that finds more
    reads on until ``zmq.Again`` (asking before each read would cost more over many)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def unacked_bytes(fd: int) -> int:
    """Bytes a TCP connection's kernel queue holds that its peer has not acknowledged (Linux's
    SIOCOUTQ on libzmq's descriptor ``fd`` of the connection, from a frame's ``SRCFD``): a peer
    that does not read holds the rest of what we send in libzmq, where nothing tells how much.
    0 when not known (no descriptor, another kind of file, another system)."""
    if fd < 0:
        return 0
    try:
        import fcntl  # (here: neither exists on Windows, and TIOCOUTQ not everywhere)
        import termios

        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, AttributeError, OSError):
        return 0


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """``sock.recv_multipart(flags, copy=False)``, with each frame's ``more`` telling whether
    another follows instead of a ``getsockopt(RCVMORE)`` per frame, which builds pyzmq's
    SocketOption enum each time (a two-frame message: 2.0-2.5 against 4.2-5.7 us here)."""
    recv = sock.recv
    frames = [recv(flags, copy=False)]
    while frames[-1].more:
        frames.append(recv(flags, copy=False))
    return frames


def plain_send(sock: zmq.Socket) -> Callable[[bytes, int], Any]:
    """``sock.send`` without pyzmq's Python layer: ``send(data, flags)`` for bytes only.

    pyzmq's ``Socket.send`` (zmq/sugar) looks at routing ids, groups and Frames before it calls
    the compiled send underneath; for three small frames an event that was two thirds of the
    time (1.36 against 0.46 us for the three, no subscriber).  The compiled send still lets the
    GIL go around ``zmq_msg_send``, as before.  Falls back to ``sock.send`` where the backend
    is not a compiled base class of the socket (PyPy's cffi backend)."""
    for klass in type(sock).__mro__[1:]:
        if klass.__module__.startswith("zmq.backend") and "send" in vars(klass):
            return vars(klass)["send"].__get__(sock)
    return sock.send
