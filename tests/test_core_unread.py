"""The cluster core and the reports a worker sent that it never said it read: a register carries
them again (``unread``), and the core takes exactly those it never read, once each, in order.
Pure: no sockets, no threads (the real-process case: test_unread_reports.py)."""

from __future__ import annotations

from test_core import Harness

from pyorchestrate import protocol


def _item(record, event: str, **fields) -> dict:
    return protocol.agent_event(record.name, record.run, record.epoch, event, fields)


def _failed(record) -> list[dict]:
    """An agent's error and its end, as a worker reports them."""
    return [_item(record, "AGENT_ERROR", error_message="boom"),
            _item(record, "AGENT_TERMINATED", ok=False, reached="READY")]


def _hiccup(record) -> list[dict]:
    """A recoverable error: the run goes on, so a second one taken would be said twice."""
    return [_item(record, "AGENT_ERROR", error_message="hiccup", recoverable=True)]


def _lifecycle(h: Harness, agent: str) -> list[str]:
    return [p.event.value for p in h.published if p.subject == agent and p.event.value in
            ("AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED")]


def _ready(h: Harness):
    """w1 on its connection 1 (register n=1), agent a STARTED and READY in its frame 2."""
    w1 = h.register("w1")
    record = h.add("a")
    h.step()
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY", n=2)
    return w1, record


def test_reports_still_on_the_old_connection_come_with_the_register_on_a_new_one_once():
    """The case seen beside 4 burners: the worker's lease ran out behind its reports, it
    registered on a new connection, and what was on the old one came after the register."""
    h = Harness()
    w1, record = _ready(h)
    failed = _failed(record)
    h.register("w1", identity=b"w1/2", conn=2, events=[failed[1]],  # (its latest ends, repeated)
               unread=[{"n": 3, "events": failed}], unread_conn=1)
    assert _lifecycle(h, "a") == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"]
    h.report(w1, record, "AGENT_ERROR", "AGENT_TERMINATED", n=3, error_message="boom")  # (the old one, late)
    assert _lifecycle(h, "a") == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"]


def test_reports_read_before_the_register_are_not_taken_again():
    h = Harness()
    w1, record = _ready(h)
    hiccup = _hiccup(record)
    h.core.control(w1, protocol.decode(protocol.encode("agent_events", n=3, events=hiccup)), h.now)
    h.flush()
    h.register("w1", identity=b"w1/2", conn=2, agents=[h.running_report(record)], unread=[{"n": 3, "events": hiccup}],
               unread_conn=1)
    assert _lifecycle(h, "a") == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR"]


def test_frames_lost_on_the_way_are_not_said_read_and_come_again_with_the_register():
    """Frame 3 lost (a reset connection), frame 4 read: the echo says read up to 2 only (said up
    to 4, the worker forgot frame 3's reports), and the register on the same connection (its
    answer to "register again") brings frame 3's, not frame 4's again."""
    h = Harness()
    w1, record = _ready(h)
    other = h.add("b")
    h.step()
    failed = _failed(record)
    h.report(w1, other, "AGENT_STARTED", n=4)
    assert h.to(w1, "reregister")
    h.sent.clear()
    h.beat(w1)
    h.step(h.core.limits.interval)
    said = [m["read"] for m in h.to(w1, "heartbeat_reply")]  # (the beat's own echo, and the tick's)
    assert said and set(said) == {2}
    h.register("w1", identity=w1, conn=1, n=5, events=[], agents=[h.running_report(other, "STARTED")],
               unread=[{"n": 3, "events": failed}, {"n": 4, "events": [_item(other, "AGENT_STARTED")]}],
               unread_conn=1, seen_session="inc1")
    assert _lifecycle(h, "a") == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"]
    assert _lifecycle(h, "b") == ["AGENT_STARTED"]
    h.sent.clear()
    h.beat(w1)
    h.step(h.core.limits.interval)
    said = [m["read"] for m in h.to(w1, "heartbeat_reply")]
    assert said and set(said) == {5}  # (all of it taken: said read)


def test_a_second_register_carrying_the_same_reports_takes_none_again():
    """Its first register's welcome lost, the worker registers once more (a third connection)
    with the same unread frames of its first: taken once."""
    h = Harness()
    _, record = _ready(h)
    hiccup = _hiccup(record)
    for conn in (2, 3):
        h.register("w1", identity=f"w1/{conn}".encode(), conn=conn, agents=[h.running_report(record)],
                   unread=[{"n": 3, "events": hiccup}], unread_conn=1)
    assert _lifecycle(h, "a") == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR"]


def test_a_refused_register_takes_an_end_with_the_error_before_it():
    """A register on a connection that closed is refused, but the ends in it are taken (an end is
    taken from anywhere its worker speaks): each now with what its run reported before it.  Taken
    alone, the end made the error in the next register a stale report, lost (10 of 10 errors)."""
    h = Harness()
    w1, record = _ready(h)
    failed = _failed(record)
    h.core.closed_connections[w1] = None  # (as the coordinator's monitor notes a closed connection)
    h.register("w1", identity=w1, conn=1, n=5, events=[failed[1]], unread=[{"n": 3, "events": failed}],
               unread_conn=1, seen_session="inc1")
    assert _lifecycle(h, "a") == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"]
    stops = len(h.to(b"w1/2", "stop"))
    h.register("w1", identity=b"w1/2", conn=2, events=[failed[1]], unread=[{"n": 3, "events": failed}],
               unread_conn=1)
    assert _lifecycle(h, "a") == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"]
    assert len(h.to(b"w1/2", "stop")) == stops  # (a report of a run that ended: nothing to stop)


def test_reports_a_coordinator_cannot_tell_it_read_are_counted_as_maybe_lost():
    """A coordinator started since (it never knew the connection they went on): not taken (the
    one before may have published them), and counted, ends aside (every register repeats those)."""
    h = Harness()
    drops: list[tuple[str, int]] = []
    h.core.drop = lambda kind, detail="", count=1, what="frame": drops.append((kind, count))
    record = h.add("a")
    failed = _failed(record)
    h.register("w1", conn=4, unread=[{"n": 7, "events": failed}], unread_conn=3)
    assert ("report_maybe_lost", 1) in drops
    assert not [p for p in h.published if p.event.value == "AGENT_ERROR"]


def test_a_report_of_a_run_given_up_without_its_end_still_stops_that_copy():
    """Only a run whose end its worker reported has stopped: a report of one we failed for want
    of its end (its worker registered without it) may come from a copy that runs, and is stopped."""
    h = Harness()
    _, record = _ready(h)
    w1 = h.register("w1", identity=b"w1/2", conn=2)  # lists no copy, and reports no end
    assert _lifecycle(h, "a")[-1] == "AGENT_TERMINATED"
    h.report(w1, record, "AGENT_ERROR", n=2, error_message="still here", recoverable=True)
    assert [(m["agent"], m["run"], m["epoch"]) for m in h.to(w1, "stop")] == [("a", record.run, record.epoch)]
