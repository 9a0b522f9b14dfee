"""Small socket helpers (pyorchestrate/sockets.py): poll timeouts and the readiness question."""

from __future__ import annotations

import zmq

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
