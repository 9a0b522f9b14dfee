"""Flow control on a worker's control connection (pyorchestrate/flow.py), pure: frames, numbers
and a clock passed in."""

from __future__ import annotations

import pytest

from pyorchestrate import flow
from pyorchestrate.flow import SendWindow


def frames(first: int, count: int, size: int) -> list[tuple[int, bytes]]:
    return [(n, bytes([n % 256]) * size) for n in range(first, first + count)]


def test_frames_past_the_credit_wait_in_order_and_go_as_the_worker_reads():
    window = SendWindow(lease=2.0, floor=1000)
    went = [n for n, frame in frames(1, 10, 300) if window.admit(n, frame)]
    assert went == [1, 2, 3, 4]  # 1200 bytes in flight: the fourth went while 900 < 1000
    assert [n for n, _ in window.held] == [5, 6, 7, 8, 9, 10] and window.last == 4
    assert window.in_flight == 1200
    assert window.read(2, now=0.0) == [bytes([5]) * 300, bytes([6]) * 300]  # 600 read: room for two
    assert window.last == 6 and window.in_flight == 1200
    # a frame that comes now waits behind the held ones, whatever the room
    assert not window.admit(11, b"x")
    # (a read covers what was sent before it: the four it lets go fill the credit again)
    assert [len(f) for f in window.read(11, now=0.01)] == [300, 300, 300, 300]
    assert window.read(10, now=0.02) == [b"x"]
    assert not window.held and window.in_flight == 1 and window.last == 11


def test_the_credit_follows_the_rate_the_worker_reads_at_while_frames_wait():
    """A link of 1 MB/s and a 2 s lease: the credit settles at what it carries in a quarter of
    the lease (500 kB); a fast one reaches the ceiling, a slow one stays at the floor."""
    for rate, expected in ((1_000_000, 500_000), (10**10, flow.CEILING), (20_000, flow.FLOOR)):
        window = SendWindow(lease=2.0)
        n, now, read, carried = 0, 0.0, 0, 0.0
        for _ in range(200):  # the link carries `rate` bytes a second of 10 kB frames, read in 0.05 s steps
            while len(window.held) < 50:
                n += 1
                window.admit(n, bytes(10_000))
            now += 0.05
            carried += rate * 0.05
            while carried >= 10_000 and read < window.last:
                read, carried = read + 1, carried - 10_000
            window.read(read, now)
        assert window.credit == pytest.approx(expected, rel=0.05), rate


def test_acks_read_in_one_turn_measure_nothing():
    window = SendWindow(lease=2.0, floor=1000)
    for n, frame in frames(1, 20, 500):
        window.admit(n, frame)
    window.read(2, now=10.0)  # the sampling starts
    window.read(4, now=10.001)  # 1000 bytes in a millisecond: no rate from that
    assert window.credit == 1000


def test_an_opening_window_holds_nothing():
    """A register on a new connection is answered at once: its welcome never waits."""
    window = SendWindow(lease=2.0, floor=100)
    window.opening = True
    assert all(window.admit(n, frame) for n, frame in frames(1, 5, 300))
    window.opening = False
    assert not window.admit(6, b"x") and window.in_flight == 1500 and window.last == 5


def test_a_read_of_another_numbering_loses_no_frame():
    """A heartbeat written before the worker read our welcome counts frames of its old
    connection: at worst frames count as read early (the credit overdrawn once)."""
    window = SendWindow(lease=2.0, floor=1000)
    for n, frame in frames(1, 6, 400):
        window.admit(n, frame)
    assert window.read(40, now=1.0) == [bytes([n]) * 400 for n in (4, 5, 6)]
    assert window.read(2, now=1.1) == [] and not window.held and window.in_flight == 1200
    assert not window.admit(7, b"y") and window.read(6, now=1.2) == [b"y"]


def test_a_frame_in_parts_is_whole_again_in_order():
    frame = bytes(range(256)) * 1000  # 256 kB: four parts
    pieces = flow.parts(frame)
    assert [len(p) for p in pieces] == [flow.PART_BYTES] * 3 + [len(frame) - 3 * flow.PART_BYTES]
    whole = flow.Reassembly()
    assert [whole.add(p, i == len(pieces) - 1, 10**6) for i, p in enumerate(pieces)][:-1] == [None] * 3
    assert whole.add(b"ab", False, 10) is None and whole.add(b"c", True, 10) == b"abc"  # (and it starts afresh)
    with pytest.raises(ValueError):
        whole.add(bytes(11), False, 10)
    assert whole.add(b"z", True, 10) == b"z"  # nothing of the refused one was kept


def test_frames_waiting_outside_the_window_count_for_the_rate():
    """A worker holds its reports unframed while there is no room: it says so, and its credit
    follows the rate the coordinator reads at as the coordinator's does."""
    window = SendWindow(lease=2.0)
    for n in range(1, 8):
        window.count(n, 10_000)
    window.read(1, now=0.0, waiting=True)
    window.read(7, now=0.1, waiting=True)  # 60 kB in 0.1 s: 600 kB/s, 300 kB in a quarter of 2 s
    assert window.credit == 300_000
    without = SendWindow(lease=2.0)
    for n in range(1, 8):
        without.count(n, 10_000)
    without.read(1, now=0.0)
    without.read(7, now=0.1)  # nothing waited: the link was not the limit, nothing measured
    assert without.credit == flow.FLOOR


def _burst(window: SendWindow, n: int, now: float, size: int = 100_000, count: int = 10) -> int:
    """``count`` frames of ``size`` sent, then read within 0.1 s (a backlog read at once, after a
    stall: 10 MB/s where the link carries 1): the number of the last."""
    for i in range(count):
        window.count(n + i, size)
    window.read(n - 1, now=now, waiting=True)
    window.read(n + count - 1, now=now + 0.1, waiting=True)
    return n + count


def test_a_late_echo_halves_the_credit_and_keeps_the_rate_from_raising_it_until_one_is_quick():
    """A coordinator starved of the CPU read in bursts: the rate it read at looked 2.6 times the
    link's, and the credit grew until the worker's heartbeats waited past its lease."""
    window = SendWindow(lease=2.0)
    n = _burst(window, 1, now=0.0)
    assert window.credit == pytest.approx(5_000_000, abs=1)  # 1 MB in 0.1 s, a quarter of 2 s of it
    window.echoed(1.0, cadence=0.4)  # 0.6 s later than its cadence: over a fifth of the lease
    assert window.credit == 2_500_000
    n = _burst(window, n, now=1.0)
    assert window.credit == 2_500_000  # (the bursts' rate no longer raises it)
    window.echoed(0.9, cadence=0.4)
    window.echoed(0.9, cadence=0.4)
    assert window.credit == 625_000
    window.echoed(0.7, cadence=0.4)  # late by less than a fifth and more than a tenth: no change
    _burst(window, n, now=2.0)
    assert window.credit == 625_000
    window.echoed(0.55, cadence=0.4)  # late by 0.15 s, under a tenth of the lease: quick again
    n = _burst(window, n + 10, now=3.0)
    assert window.credit == pytest.approx(5_000_000, abs=1)
    for _ in range(30):
        window.echoed(2.0, cadence=0.4)
    assert window.credit == flow.FLOOR
