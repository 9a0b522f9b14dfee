"""The event bus from other processes: the CLI, the example, EventSubscriber, and gap detection."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
from agents import BigEvents, Forever, Quick, QuickProcess, Talker
from conftest import LIFECYCLE, REPO, EventLog, probe_on_w1, start_daemon, wait_for

from pyorchestrate import EventSubscriber, RunMode, protocol


def _start_reader(args, tmp_path, name):
    out = open(tmp_path / f"{name}.out", "w")
    err = open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True, cwd=tmp_path)
    out.close()
    err.close()
    return proc


def test_cli_subscriber_in_another_process_sees_every_agent_lifecycle(cluster, tmp_path):
    orch = cluster.orchestrator(min_workers=2, run_mode=RunMode.DAEMON)
    orch.start()
    cli = _start_reader(["-m", "pyorchestrate.cli", "events", "--address", orch.events_address, "--json",
                         "--exit-on-shutdown", "--timeout", "60"], tmp_path, "cli")
    try:
        wait_for(lambda: "connected to" in (tmp_path / "cli.err").read_text(), 15, "the CLI to connect")
        cluster.worker(orch.address, "w1")
        cluster.worker(orch.address, "w2")
        events = EventLog(orch)
        names = [f"agent-{i}" for i in range(6)]
        for i, name in enumerate(names):
            orch.register_agent(Quick if i % 2 else QuickProcess, name)
        for name in names:
            events.wait("AGENT_TERMINATED", name)
        orch.stop()
        assert cli.wait(15) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    lines = [json.loads(line) for line in (tmp_path / "cli.out").read_text().splitlines()]
    for line in lines:
        assert {"event", "seq", "event_date", "event_time"} <= set(line)
        assert line.get("agent_name") or line.get("worker") or line["event"] in ("ALL_AGENTS_TERMINATED", "SHUTDOWN")
    for name in names:
        mine = [line["event"] for line in lines if line.get("agent_name") == name and line["event"] in LIFECYCLE]
        assert mine == ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"], (name, mine)
    assert lines[-1]["event"] == "SHUTDOWN"
    assert not [line for line in lines if line["event"] == "EVENTS_LOST"]


def test_remote_subscriber_example(cluster, tmp_path):
    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON)
    orch.start()
    reader = _start_reader([str(REPO / "examples" / "remote_subscriber.py"), orch.events_address,
                            "--topic", "AGENT_", "--count", "4", "--timeout", "30"], tmp_path, "example")
    try:
        wait_for(lambda: "connected" in (tmp_path / "example.out").read_text(), 15, "the example to connect")
        cluster.worker(orch.address, "w1")
        orch.register_agent(Quick, "watched")
        assert reader.wait(30) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(5)
    out = (tmp_path / "example.out").read_text()
    for kind in ("AGENT_STARTED watched on w1@", "AGENT_READY watched", "AGENT_LOG watched",
                 "AGENT_TERMINATED watched"):
        assert kind in out
    assert "lost: 0" in out


def test_event_subscriber_filters_by_topic_and_times_out(cluster):
    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON)
    orch.start()
    with EventSubscriber(orch.events_address, topics=["AGENT_TERMINATED."], timeout=1.0) as sub:
        assert sub.wait_connected(10)
        cluster.worker(orch.address, "w1")
        orch.register_agent(Quick, "one")
        orch.register_agent(Forever, "two")
        got = list(sub)  # ends after 1 s without events
        assert [ev.event for ev in got] == ["AGENT_TERMINATED"] and got[0].agent_name == "one"
        assert sub.recv(timeout=0.1) is None
    sub.close()  # closing twice is fine


def _topics_for_a_history_request_of(size: int) -> list[str]:
    """Topics whose history request (protocol.history_request, a 32-character nonce) is ``size``
    bytes, the last of them "AGENT_TERMINATED.one"; the others fill, 40 characters and a newline each."""
    last = "AGENT_TERMINATED.one"
    remaining = size - len(protocol.history_request("n" * 32, [last]))
    full = (remaining - 14) // 41
    rest = remaining - 41 * full  # (14 to 54: one more topic of 13 to 53 characters and its newline)
    topics = ["AGENT_EVENT." + "x" * 28] * full + ["AGENT_EVENT." + "x" * (rest - 13), last]
    assert len(protocol.history_request("n" * 32, topics)) == size
    return topics


def test_a_history_request_as_long_as_the_events_port_takes_is_answered_and_a_longer_one_refused(cluster):
    """libzmq closes the connection of a subscriber whose subscription is over the events port's
    limit, and it connects and subscribes again, for ever: an EventSubscriber of 90 topics with
    history=True never connected, and said nothing.  It now raises, saying what to do; at the
    limit, history is answered."""
    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON)
    orch.start()
    cluster.worker(orch.address, "w1")
    orch.register_agent(Quick, "one")
    wait_for(lambda: orch.status()["agents"]["one"]["state"] == "TERMINATED", 30, "one to end")
    most = protocol.TOPIC_MAX
    topics = _topics_for_a_history_request_of(most)
    with EventSubscriber(orch.events_address, topics=topics, history=True) as sub:
        assert sub.wait_connected(10)
        ev = sub.recv(timeout=10)
        assert ev is not None and ev.event == "AGENT_TERMINATED" and ev.agent_name == "one"
    with pytest.raises(ValueError, match="history=True asks for the history of all .* at most 4,086"):
        EventSubscriber(orch.events_address, topics=_topics_for_a_history_request_of(most + 1), history=True)
    with pytest.raises(ValueError, match="subscribe to a shorter prefix"):
        EventSubscriber(orch.events_address, topics=["AGENT_LOG." + "x" * most])
    with pytest.raises(TypeError, match=r"topics must be a list of prefixes, e.g. \['AGENT_'\]"):
        EventSubscriber(orch.events_address, topics="AGENT_")


def _bus_input(ctx, orch):
    """An XPUB connected to ``orch``'s bus input, once the coordinator's XSUB has subscribed."""
    pub = ctx.socket(zmq.XPUB)
    pub.connect(orch.status()["addresses"]["bus"])
    assert pub.poll(5000)
    pub.recv()
    return pub


def _fake_events_port(ctx):
    """A coordinator's events port played by hand: an XPUB that sees every subscription, and its
    address."""
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    return pub, f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"


def _history_request(pub) -> bytes:
    """The topic a subscriber asked history under (its subscription, read from ``pub``)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pub.poll(100):
            subscription = pub.recv()
            if protocol.parse_history_request(subscription[1:]) is not None:
                return subscription[1:]
    raise AssertionError("the subscriber never asked for history")


def _event(seq, publisher="fake", event="AGENT_READY", agent="x", session="run1", numbered=True):
    return [*protocol.encode_event(protocol.event_topic(event, agent), {
        "event": event, "seq": seq, "publisher": publisher, "incarnation": "i1", "agent_name": agent,
        "event_date": "2026-01-01", "event_time": "00:00:00.0"}), protocol.encode_stamp(session, seq, numbered, 0.0)]


def _answer_ranges(pub, held: dict[int, list[bytes]], answers: int) -> threading.Thread:
    """Play the coordinator's history on a thread (the socket is its own until joined): answer
    ``answers`` range requests from ``held`` (seq -> frames)."""
    thread = threading.Thread(target=_answer, args=(pub, held, answers, time.monotonic() + 10))
    thread.start()
    return thread


def _answer(pub, held, answers, until) -> int:
    answered = 0
    while time.monotonic() < until and answered < answers:
        if not pub.poll(50):
            continue
        sub = pub.recv()
        wanted = protocol.parse_range_request(sub[1:]) if sub[:1] == b"\x01" else None
        if wanted is None:
            continue
        session, first, last = wanted
        items = [[s, held[s][0].decode(), held[s][1]] for s in range(first, last + 1) if s in held]
        pub.send_multipart([sub[1:], protocol.encode_range_reply(session, first, last, items)])
        answered += 1
    return answered


def test_subscriber_recovers_gaps_from_history_and_reports_only_what_history_lacks():
    ctx = zmq.Context()
    try:
        pub, address = _fake_events_port(ctx)
        with EventSubscriber(address, timeout=2, history=False) as sub:
            assert pub.poll(5000)
            pub.recv()  # the subscription arrived
            # a run already under way when we joined: it is taken from the first event seen
            for seq in (10, 11, 14, 15):
                pub.send_multipart(_event(seq, agent=f"a{seq}"))
            pub.send_multipart([b"AGENT_READY.x", b"\xc1 not msgpack"])
            # the history still holds 12, no longer 13
            answering = _answer_ranges(pub, {12: _event(12, agent="a12")}, 1)
            got = [ev for _, ev in zip(range(6), sub)]
            answering.join()
            assert [ev.get("agent_name") or ev.event for ev in got] == ["a10", "a11", "a12", "EVENTS_LOST", "a14", "a15"]
            assert got[3]["lost"] == 1 and sub.lost == 1 and sub.recovered == 1
            wait_for(lambda: sub.recv(0.05) is None and sub.dropped == 1, 5, "garbage to be dropped")
            # a lost tail: the heartbeat says 17 was sent; history holds 16 and 17
            pub.send_multipart(_event(17, event="_HEARTBEAT", agent="c", numbered=False))
            answering = _answer_ranges(pub, {16: _event(16, agent="a16"), 17: _event(17, agent="a17")}, 1)
            assert [ev.agent_name for ev in (sub.recv(5), sub.recv(5))] == ["a16", "a17"]
            answering.join()
            assert sub.lost == 1 and sub.recovered == 3
    finally:
        ctx.destroy(linger=0)


def current_run(orch, agent: str) -> tuple[str, str]:
    """The bus identity of ``agent``'s current run: (publisher, incarnation)."""
    info = orch.status()["agents"][agent]
    return f"{info['worker']}/{agent}", f"{info['run']}.{info['epoch']}"


def test_coordinator_reports_gaps_from_worker_publishers(cluster):
    orch, events = probe_on_w1(cluster)
    publisher, run = current_run(orch, "probe")
    ctx = zmq.Context()
    try:
        pub = _bus_input(ctx, orch)

        frame_n = iter(range(1, 1000))
        token = orch._coordinator.core.workers["w1"].token  # posing as the worker itself (white box)

        def batch(incarnation, *seqs):
            return protocol.encode_batch("w1", token, next(frame_n), [
                (publisher, incarnation, "AGENT_EVENT.probe", seq, msgpack.packb({
                    "event": "AGENT_EVENT", "seq": seq, "publisher": publisher, "incarnation": incarnation,
                    "agent_name": "probe", "topic": "t", "data": {}, "event_date": "d", "event_time": "t"}))
                for seq in seqs])

        # posing as the agent's current run: a gap in its numbers is reported
        for seqs in ((1, 2, 3), (7,)):
            pub.send_multipart(batch(run, *seqs))
            time.sleep(0.01)
        lost = events.wait("EVENTS_LOST")[0]
        assert lost["lost"] == 3 and lost["source"] == publisher
        assert orch.status()["lost_events"] == 3
        assert len(events.wait("AGENT_EVENT", count=4)) == 4
        # a lost tail: the worker's beats frame says the run sent 9; 8 and 9 never came
        pub.send_multipart(protocol.encode_beats("w1", token, next(frame_n), [["probe", run, 9]]))
        tail = events.wait("EVENTS_LOST", count=2)[1]
        assert tail["lost"] == 2 and orch.status()["lost_events"] == 5
        # a copy of an older run (or of another coordinator's) is not the agent: dropped, counted
        pub.send_multipart(batch("oldcoordinator.1", 1, 2))
        wait_for(lambda: orch.status()["dropped"].get("stale_bus_event", 0) >= 1, 10, "the stale batch to be counted")
        assert len(events.of("AGENT_EVENT")) == 4
    finally:
        ctx.destroy(linger=0)


def test_an_event_over_the_coordinators_limit_is_counted_lost_not_lost_unsaid(cluster):
    """max_message_size=4 MiB: 5 MB events pass the publisher's own check (16 MiB) but made a bus
    frame the coordinator's socket refused, costing the bus connection; and as they were the run's
    first, no gap was ever seen.  They were lost without a word.  The worker now drops an event
    over a quarter of the coordinator's limit (saying so), and the coordinator counts a run that
    begins past seq 1 as a gap."""
    orch, events = start_daemon(cluster, ("w1",), max_message_size=4 * 2**20)
    orch.register_agent(BigEvents, "big")
    # in one count, or two when the worker's beats frame (announcing seq 1, the first one dropped)
    # goes between them: beside 4 CPU burners, 1 and then 2
    wait_for(lambda: sum(e["lost"] for e in events.of("EVENTS_LOST")) >= 3, 20, "the 3 events counted lost")
    lost = events.of("EVENTS_LOST")
    assert sum(e["lost"] for e in lost) == 3 and {e["source"] for e in lost} == {"w1/big"}, lost
    events.wait("AGENT_TERMINATED", "big")
    assert [(e["topic"], e["data"]["i"]) for e in events.of("AGENT_EVENT", "big")] == [("small", 3)]
    assert orch.status()["lost_events"] == 3
    # printed by the worker's log thread: it may follow the agent's end by a moment
    wait_for(lambda: "over the coordinator's limit of 1048576 per event" in cluster.log_of("w1"), 10, "the worker to say so")
    # an event under the limit travels (a quarter of 4 MiB), with others of the same run
    orch.register_agent(BigEvents, "fits", BigEvents.Config(size=900_000, before=1))
    events.wait("AGENT_TERMINATED", "fits")
    wait_for(lambda: len(events.of("AGENT_EVENT", "fits")) == 5, 10, "all five events of 'fits'")
    assert orch.status()["lost_events"] == 3


def test_a_tail_that_never_comes_is_counted_lost(cluster, monkeypatch):
    """An ended run's last events that never arrive (here: dropped as too large) were awaited for
    ever, uncounted; the end is said after tailhold.WAIT and the tail counted lost after
    TAIL_GIVE_UP."""
    from pyorchestrate import coordinator

    monkeypatch.setattr(coordinator, "TAIL_GIVE_UP", 3.0)
    orch, events = start_daemon(cluster, ("w1",), max_message_size=4 * 2**20)
    orch.register_agent(BigEvents, "tail", BigEvents.Config(before=2, big=2, after=0))
    events.wait("AGENT_TERMINATED", "tail")
    lost = events.wait("EVENTS_LOST", timeout=20)[0]
    assert lost["lost"] == 2 and lost["source"] == "w1/tail" and orch.status()["lost_events"] == 2
    assert len(events.of("AGENT_EVENT", "tail")) == 2
    assert not orch._coordinator._awaited_bus  # nothing kept for it


def test_a_run_whose_beats_say_it_sent_what_never_came_counts_it_lost(cluster):
    """The first word of a run this coordinator started is a beats frame saying it sent 4 events:
    none came, so 4 were lost (it was taken as the starting point, for runs adopted from a
    predecessor, whose head went there)."""
    orch, events = probe_on_w1(cluster)  # Forever publishes nothing
    publisher, run = current_run(orch, "probe")
    ctx = zmq.Context()
    try:
        pub = _bus_input(ctx, orch)
        token = orch._coordinator.core.workers["w1"].token  # posing as the worker itself (white box)
        pub.send_multipart(protocol.encode_beats("w1", token, 10_000, [["probe", run, 4]]))
        lost = events.wait("EVENTS_LOST")[0]
        assert lost["lost"] == 4 and lost["source"] == publisher and orch.status()["lost_events"] == 4
    finally:
        ctx.destroy(linger=0)


def test_a_tail_still_on_its_way_is_not_given_up(cluster, monkeypatch):
    """An agent that logs 100,000 lines at once ends long before its worker's outbox has drained
    (200,000 lines arrived 26 s after the end on a busy VM): while its worker's events keep
    coming, its tail is awaited, not counted lost and dropped."""
    from pyorchestrate import coordinator

    monkeypatch.setattr(coordinator, "TAIL_GIVE_UP", 0.2)
    orch, events = start_daemon(cluster, ("w1",), callback_backlog=200_000)
    lines = []
    orch.register_event("AGENT_LOG", lambda message: lines.append(message))
    orch.register_agent(Talker, "chatty", Talker.Config(lines=100_000))
    wait_for(lambda: len(lines) == 100_000, 90, "every line")  # (how long after its end varies)
    assert lines[-1] == "line 99999" and orch.status()["lost_events"] == 0
    assert "stale_bus_event" not in orch.status()["dropped"]


def test_a_late_tail_is_given_up_only_once_its_worker_has_gone_quiet():
    """The rule itself, on the coordinator's bookkeeping alone: due (TAIL_GIVE_UP after the end),
    a tail waits on while its worker sent events within TAIL_QUIET, then counts as lost what was
    announced and never came; one that arrived is forgotten."""
    from types import SimpleNamespace

    from pyorchestrate import coordinator

    gaps = []
    late, done = ("w1/late", "r.1"), ("w1/done", "r.1")
    book = SimpleNamespace(
        _awaited_order=collections.deque([(10.0, late), (10.0, done)]), _awaited_bus={late: 9},
        _bus_seqs={late: 4}, _last_batch={"w1": 8.0}, _report_gap=lambda publisher, n: gaps.append((publisher, n)))
    give_up = coordinator.Coordinator._give_up_tails
    give_up(book, 9.0)
    assert not gaps and len(book._awaited_order) == 2  # not due
    give_up(book, 10.0)  # due, but w1 sent events 2 s ago: waits TAIL_QUIET more
    assert not gaps and list(book._awaited_order) == [(10.0 + coordinator.TAIL_QUIET, late)]
    book._last_batch["w1"] = 12.0
    give_up(book, 15.0)  # still sending
    assert not gaps and book._awaited_order[0][1] == late
    give_up(book, 20.0 + coordinator.TAIL_QUIET)  # quiet: 5..9 never came
    assert gaps == [("w1/late", 5)] and not book._awaited_bus and late not in book._bus_seqs


@pytest.mark.parametrize("overflow", [False, True])
def test_events_held_for_a_runs_start_survive_a_heartbeat_read_first(cluster, overflow):
    """A run's events that come before its STARTED wait for it (EarlyHold).  A beats frame read
    meanwhile (the control connection behind, under load) marked the run's seq as arrived, so when
    the STARTED came, the held events were all dropped as duplicates: lost, and not counted.
    ``overflow``: more than the hold keeps (10,000): the first event past it went on alone, and
    those held were dropped as duplicates in the same way."""
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_liveness=100, callback_backlog=50_000)
    events = EventLog(orch)
    orch.start()
    w1 = cluster.worker(orch.address, "w1")
    events.wait("WORKER_JOINED", "w1")
    ctx = zmq.Context()
    try:
        pub = _bus_input(ctx, orch)
        os.kill(w1.pid, signal.SIGSTOP)  # it reads nothing: the start stays unanswered
        try:
            orch.register_agent(Forever, "late")
            wait_for(lambda: orch.status()["agents"]["late"]["state"] == "ASSIGNED", 10, "late to be sent to w1")
            publisher, run = current_run(orch, "late")
            token = orch._coordinator.core.workers["w1"].token  # posing as the worker itself (white box)
            sent = 10_050 if overflow else 2
            items = [(publisher, run, "AGENT_EVENT.late", seq, msgpack.packb({
                "event": "AGENT_EVENT", "seq": seq, "publisher": publisher, "incarnation": run, "agent_name": "late",
                "topic": "t", "data": {}, "event_date": "d", "event_time": "t"})) for seq in range(1, sent + 1)]
            for n, i in enumerate(range(0, sent, 500)):
                pub.send_multipart(protocol.encode_batch("w1", token, 10_000 + n, items[i:i + 500]))
            pub.send_multipart(protocol.encode_beats("w1", token, 20_000, [["late", run, sent]]))
            time.sleep(0.5)
            if not overflow:
                assert not events.of("AGENT_EVENT", "late")  # held: the run has not started
        finally:
            os.kill(w1.pid, signal.SIGCONT)
        events.wait("AGENT_STARTED", "late")
        wait_for(lambda: len(events.of("AGENT_EVENT", "late")) == sent, 20, f"the {sent} held events")
        assert [e["seq"] for e in events.of("AGENT_EVENT", "late")] == list(range(1, sent + 1))  # in order
        assert orch.status()["lost_events"] == 0 and "duplicate_bus_event" not in orch.status()["dropped"]
    finally:
        ctx.destroy(linger=0)


def test_the_bus_input_takes_nothing_that_does_not_show_the_workers_token(cluster):
    """Anyone who reaches the bus input can send frames naming a real worker, its agent's current
    run and the worker's incarnation (all of them on the bus): without the secret the worker's
    process showed in its register, nothing is forwarded, no callback fires, nothing is kept; with it, a bus
    frame still cannot carry lifecycle events (those come from the control connection only)."""
    orch, events = probe_on_w1(cluster)
    publisher, run = current_run(orch, "probe")
    incarnation = orch._coordinator.core.workers["w1"].incarnation
    ctx = zmq.Context()
    try:
        pub = _bus_input(ctx, orch)

        def item(event, seq):
            return (publisher, run, protocol.event_topic(event, "probe"), seq, msgpack.packb({
                "event": event, "seq": seq, "publisher": publisher, "incarnation": run, "agent_name": "probe",
                "ok": False, "error_message": "forged", "topic": "t", "data": {}, "event_date": "d", "event_time": "t"}))

        forged = [item("AGENT_EVENT", 1000), item("AGENT_ERROR", 1001), item("AGENT_TERMINATED", 1002)]
        for i, token in enumerate(("", incarnation, "0" * 32, "sécret")):
            pub.send_multipart(protocol.encode_batch("w1", token, 10_000 + i, forged))
            pub.send_multipart(protocol.encode_beats("w1", token, 20_000 + i, [["probe", run, 10**15]]))
        for i in range(300):  # made-up publishers: kept only until no register of theirs can come
            pub.send_multipart(protocol.encode_batch(f"nobody{i}", "t", 1, forged[:1]))
        # (two liveness windows and 2 s: a restarted coordinator's workers register within that, prejoin.py)
        wait_for(lambda: orch.status()["dropped"].get("bus_frame_not_from_worker", 0) >= 308, 20,
                 "the forged frames to be counted")
        assert not orch._coordinator._prejoin and orch._coordinator._prejoin.size == 0
        # with the real token, lifecycle topics are still refused (the worker's own agents cannot forge them)
        token = orch._coordinator.core.workers["w1"].token
        pub.send_multipart(protocol.encode_batch("w1", token, 30_000, forged[1:]))
        wait_for(lambda: orch.status()["dropped"].get("bus_topic_not_allowed", 0) >= 2, 10,
                 "the lifecycle topics to be refused")
        time.sleep(0.5)
        assert not events.of("AGENT_EVENT") and not events.of("AGENT_ERROR") and not events.of("AGENT_TERMINATED")
        assert not events.of("EVENTS_LOST") and orch.status()["lost_events"] == 0
        assert orch.status()["agents"]["probe"]["state"] == "READY"
        assert set(orch._coordinator.worker_bus) <= {"w1"}
        assert "handler_error" not in orch.status()["dropped"]  # refused for what they are, not by accident
    finally:
        ctx.destroy(linger=0)


def test_a_worker_cannot_publish_for_an_agent_another_worker_runs(cluster):
    """A worker's bus frames, even with its own secret, carry only its own agents' events: one
    naming an agent of another worker (whose publisher and current run anyone on the bus can read)
    is dropped and counted, and no callback fires."""
    orch, events = probe_on_w1(cluster)
    publisher, run = current_run(orch, "probe")
    cluster.worker(orch.address, "w2")
    events.wait("WORKER_JOINED", "w2")
    token = orch._coordinator.core.workers["w2"].token
    ctx = zmq.Context()
    try:
        pub = _bus_input(ctx, orch)
        body = msgpack.packb({"event": "AGENT_EVENT", "seq": 1000, "publisher": publisher, "incarnation": run,
                              "agent_name": "probe", "topic": "t", "data": {"forged": True},
                              "event_date": "d", "event_time": "t"})
        before = orch.status()["dropped"].get("stale_bus_event", 0)
        pub.send_multipart(protocol.encode_batch("w2", token, 50_000, [
            (publisher, run, protocol.event_topic("AGENT_EVENT", "t"), 1000, body)]))
        wait_for(lambda: orch.status()["dropped"].get("stale_bus_event", 0) > before, 10,
                 "the other worker's frame to be dropped")
        time.sleep(0.3)
        assert not [e for e in events.of("AGENT_EVENT") if e.get("data") == {"forged": True}]
        assert not events.of("EVENTS_LOST") and orch.status()["lost_events"] == 0
    finally:
        ctx.destroy(linger=0)


def test_events_both_live_and_in_the_history_answer_are_delivered_once():
    """A subscriber joining with history subscribes live first, then asks for history: what is
    published in between comes live and in the answer.  It gets history first and each event
    once (a fake coordinator: an XPUB played by hand)."""
    ctx = zmq.Context()
    try:
        pub, address = _fake_events_port(ctx)
        with EventSubscriber(address, topics=["AGENT_READY."], history=True) as sub:
            history_topic = _history_request(pub)
            pub.send_multipart(_event(5, agent="a5"))  # live, after the live subscription took hold
            items = [[frames[0].decode(), frames[1]] for frames in (_event(4, agent="a4"), _event(5, agent="a5"))]
            pub.send_multipart([history_topic, msgpack.packb(items, use_bin_type=True)])
            pub.send_multipart(_event(6, agent="a6"))
            got = [ev.agent_name for ev in (sub.recv(5), sub.recv(5), sub.recv(5))]
            assert got == ["a4", "a5", "a6"] and sub.recv(0.3) is None
    finally:
        ctx.destroy(linger=0)


def test_a_refused_history_request_says_why_and_holds_nothing_back():
    """A coordinator with too many history requests waiting refuses one (a third frame, its
    reason): the subscriber hands out the live events at once and says why it got no history
    (a fake coordinator: an XPUB played by hand)."""
    ctx = zmq.Context()
    try:
        pub, address = _fake_events_port(ctx)
        with EventSubscriber(address, topics=["AGENT_READY."], history=True) as sub:
            history_topic = _history_request(pub)
            pub.send_multipart(_event(5, agent="a5"))
            pub.send_multipart([history_topic, msgpack.packb([]), b"8 history requests are waiting"])
            event = sub.recv(3)  # (before HISTORY_WAIT: not held for an answer that came)
            assert event is not None and event.agent_name == "a5"
            assert sub.history_refused == "8 history requests are waiting" and sub.dropped == 0
    finally:
        ctx.destroy(linger=0)


def test_live_events_wait_for_a_history_answer_that_never_comes_only_so_long(monkeypatch):
    """A coordinator that never answers the history request (gone meanwhile) holds the live
    events back for HISTORY_WAIT seconds, not for ever."""
    from pyorchestrate import subscriber

    monkeypatch.setattr(subscriber, "HISTORY_WAIT", 1.5)
    ctx = zmq.Context()
    try:
        pub, address = _fake_events_port(ctx)
        created = time.monotonic()
        with EventSubscriber(address, topics=["AGENT_READY."], history=True) as sub:
            _history_request(pub)
            pub.send_multipart(_event(5, agent="a5"))
            event = sub.recv(15)
            waited = time.monotonic() - created
            # held until HISTORY_WAIT after the subscriber was made (history goes first), then handed out
            assert event is not None and event.agent_name == "a5" and 1.5 <= waited < 10, waited
    finally:
        ctx.destroy(linger=0)
