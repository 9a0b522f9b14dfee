"""Bookkeeping of the bus across coordinator runs, without traffic: the frames a restarted
coordinator holds for a worker not registered yet (prejoin.py), and a subscriber's count of what an
adopted agent copy sent that no coordinator run delivered (EventSubscriber._deliver)."""

from __future__ import annotations

from conftest import free_port

from pyorchestrate import EventSubscriber, subscriber
from pyorchestrate.prejoin import PreJoinHold


def test_frames_of_a_worker_not_registered_wait_in_order_within_their_bounds():
    hold = PreJoinHold(wait=5.0, max_bytes=100)
    assert not hold
    assert hold.add("w1", [b"a" * 10, b"b" * 10], now=0.0)
    assert hold.add("w2", [b"c" * 30], now=1.0)
    assert hold.add("w1", [b"d" * 20], now=2.0)
    assert hold and hold.names() == ["w1", "w2"] and hold.size == 70
    assert not hold.add("w3", [b"e" * 31], now=2.0), "past max_bytes: the caller drops it"
    assert "w3" not in hold.names() and hold.size == 70
    assert hold.take("w1") == [[b"a" * 10, b"b" * 10], [b"d" * 20]]
    assert hold.take("w1") == [] and hold.size == 30
    assert hold.add("w3", [b"e" * 31], now=3.0), "room again once taken"
    # each worker waits from its first frame
    assert hold.expired(5.9) == []
    assert hold.expired(6.0) == [("w2", 1)]
    assert hold.expired(100.0) == [("w3", 1)]
    assert not hold and hold.size == 0


def _event(session: str, publisher: str, run: str, seq: int, event: str = "AGENT_EVENT") -> tuple:
    agent = publisher.partition("/")[2]
    return (session, 0, False, 0.0, subscriber.Event({"event": event, "publisher": publisher, "incarnation": run,
                                                     "seq": seq, "agent_name": agent, "worker": "w1"}))


def _deliver(sub: EventSubscriber, *events: tuple) -> list:
    for session, _, _, _, event in events:
        sub._deliver(session, event)
    return sub.drain()


def test_a_subscriber_counts_what_an_adopted_copy_sent_between_coordinator_runs_and_nothing_else():
    with EventSubscriber(f"tcp://127.0.0.1:{free_port()}") as sub:
        got = _deliver(sub, _event("S1", "w1/a", "r1", 1), _event("S1", "w1/a", "r1", 2),
                       _event("S1", "w1/a", "r1", 5),  # a gap within one coordinator run: the coordinator counts it
                       _event("S1", "w1/b", "r2", 1), _event("S1", "w1/b", "r2", 2, "AGENT_LOG"),
                       _event("S2", "w1/a", "r1", 9),  # 6-8 went to neither run
                       _event("S2", "w1/a", "r1", 10),
                       _event("S2", "w1/b", "r2", 3, "AGENT_LOG"),  # nothing missing: nothing counted
                       _event("S2", "w1/c", "r3", 40))  # first seen in this run: from then on
        lost = [(e.source, e.lost) for e in got if e.event == "EVENTS_LOST"]
        assert lost == [("w1/a", 3)] and sub.lost == 3
        assert [e.seq for e in got if e.event != "EVENTS_LOST"] == [1, 2, 5, 1, 2, 9, 10, 3, 40]
        # a new run of a copy, and a run that ended, start over
        got = _deliver(sub, _event("S3", "w1/a", "r4", 7),
                       _event("S2", "w1/c", "r3", 41, "AGENT_TERMINATED"), _event("S3", "w1/c", "r3", 90))
        assert not [e for e in got if e.event == "EVENTS_LOST"] and sub.lost == 3


def test_a_subscriber_follows_a_bounded_number_of_copies():
    with EventSubscriber(f"tcp://127.0.0.1:{free_port()}") as sub:
        limit = subscriber.MAX_COPIES
        subscriber.MAX_COPIES = 3
        try:
            _deliver(sub, *[_event("S1", f"w1/a{i}", "r", 1) for i in range(5)])
            assert list(sub._copies) == ["w1/a2", "w1/a3", "w1/a4"]
        finally:
            subscriber.MAX_COPIES = limit
