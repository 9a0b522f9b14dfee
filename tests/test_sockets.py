"""Small socket helpers (pyorchestrate/sockets.py): poll timeouts, the readiness question, and what
a TCP peer has not acknowledged."""

from __future__ import annotations

import zmq
from conftest import wait_for

from pyorchestrate import sockets


def test_poll_timeouts_round_up_so_a_loop_never_spins_before_its_deadline():
    assert [sockets.wait_ms(s) for s in (-1.0, 0.0, 1e-7, 0.0001, 0.001, 0.0010001, 0.25, 2.0)] == \
        [0, 0, 1, 1, 1, 2, 250, 2000]


def test_readable_says_whether_a_message_waits_without_taking_it():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://readable")
        b.connect("inproc://readable")
        assert not sockets.readable(b)
        a.send(b"one")
        assert b.poll(5000) and sockets.readable(b)
        assert sockets.readable(b)  # asking does not consume it
        assert b.recv() == b"one" and not sockets.readable(b)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_plain_send_delivers_multipart_messages_and_says_when_a_peer_is_full():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.setsockopt(zmq.SNDHWM, 2)
        b.setsockopt(zmq.RCVHWM, 2)
        a.bind("inproc://plain-send")
        b.connect("inproc://plain-send")
        send = sockets.plain_send(a)
        assert send.__func__ is not zmq.Socket.send  # the compiled send, not pyzmq's Python layer
        send(b"topic", zmq.SNDMORE | zmq.NOBLOCK)
        send(b"body", zmq.SNDMORE | zmq.NOBLOCK)
        send(b"stamp", zmq.NOBLOCK)
        assert b.poll(5000) and b.recv_multipart() == [b"topic", b"body", b"stamp"]
        sent = 0
        try:
            for _ in range(1000):  # bounded: a full pipe must raise, not block
                send(b"x", zmq.NOBLOCK)
                sent += 1
        except zmq.Again:
            pass
        assert 0 < sent < 1000
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_unacked_bytes_tells_what_a_peer_that_does_not_read_holds_back():
    """What the coordinator asks before answering a client (sockets.unacked_bytes): bytes sent on
    a TCP connection that its peer has not acknowledged.  0 for what it cannot ask."""
    import os
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    opened = [listener]
    try:
        # a peer that does not read: what its buffer does not take waits, unacknowledged
        deaf = socket.create_connection(listener.getsockname())
        deaf_end, _ = listener.accept()
        opened += [deaf, deaf_end]
        deaf_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.setblocking(False)
        sent = 0
        try:
            while sent < 64 * 2**20:
                sent += deaf.send(b"x" * 65536)
        except BlockingIOError:
            pass  # the kernel holds all it will
        assert sockets.unacked_bytes(deaf.fileno()) > 2**16, sent
        # a peer that reads: nothing waits once it has
        reader = socket.create_connection(listener.getsockname())
        reader_end, _ = listener.accept()
        opened += [reader, reader_end]
        reader.sendall(b"y" * 1000)
        reader_end.settimeout(10)
        got = 0
        while got < 1000:
            chunk = reader_end.recv(1000)
            assert chunk, "the connection closed"
            got += len(chunk)
        wait_for(lambda: sockets.unacked_bytes(reader.fileno()) == 0, 10, "all 1,000 bytes acknowledged")
    finally:
        for sock in opened:
            sock.close()
    r, w = os.pipe()
    try:
        assert sockets.unacked_bytes(-1) == 0 and sockets.unacked_bytes(r) == 0  # not a socket: unknown
    finally:
        os.close(r)
        os.close(w)
