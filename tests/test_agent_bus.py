"""Agents on the bus: self.publish (AGENT_EVENT), remote logs (AGENT_LOG), late-subscriber history."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
from agents import Quick
from behaviours import CHATTY, EVENTDRIVEN, SENSOR
from conftest import start_daemon, wait_for

from pyorchestrate import BaseThreadAgent, ControlClient, EventSubscriber

MODES = ["thread", "process"]


@pytest.fixture
def two(cluster):
    return start_daemon(cluster, ("w1",), ("w2",), min_workers=2)


@pytest.mark.parametrize("mode", MODES)
def test_publish_reaches_another_process_and_an_event_driven_agent_on_another_worker(two, tmp_path, mode):
    orch, events = two
    cli_out, cli_err = tmp_path / "cli.out", tmp_path / "cli.err"
    with open(cli_out, "w") as out, open(cli_err, "w") as err:
        cli = subprocess.Popen([sys.executable, "-m", "pyorchestrate.cli", "events", "--address", orch.events_address,
                                "--topic", "AGENT_EVENT.temperature", "--json", "--count", "5", "--timeout", "30"],
                               stdout=out, stderr=err)
    try:
        # a filtered subscriber cannot recover what it missed before its subscription was in place
        # (on a loaded machine the CLI's start alone took longer than any fixed sleep)
        wait_for(lambda: "connected to" in cli_err.read_text(), 30, "the CLI to subscribe")
        listener_out = tmp_path / "listener"
        cls = EVENTDRIVEN[mode]
        orch.register_agent(cls, "listener", cls.Config(out=str(listener_out), subscribe=["AGENT_EVENT.temperature"]),
                            worker="w2")
        events.wait("AGENT_READY", "listener")
        time.sleep(0.5)  # the listener's and the CLI's subscriptions reach the coordinator
        orch.register_agent(SENSOR[mode], "sensor", worker="w1")
        assert cli.wait(30) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    received = [json.loads(line) for line in cli_out.read_text().splitlines()]
    assert [r["data"]["celsius"] for r in received] == [20, 21, 22, 23, 24]
    first = received[0]
    assert (first["event"], first["topic"], first["agent_name"], first["worker"]) == \
        ("AGENT_EVENT", "temperature", "sensor", "w1")
    assert [r["seq"] for r in received] == sorted(r["seq"] for r in received)
    wait_for(lambda: listener_out.exists() and listener_out.read_text().count("AGENT_EVENT") == 5, 10,
             "the listener on w2 to get all five")


@pytest.mark.parametrize("mode", MODES)
def test_an_event_driven_agent_is_subscribed_once_it_is_ready(cluster, tmp_path, mode):
    """READY means subscribed.  Agents are held after READY (hold_after_ready): the listener is
    READY but does not run yet; the sensor, which depends on it, then publishes everything
    before the listener is let go.  The listener must get all of it.  (Its subscription used to
    be made only once it ran, after READY: the README's sensors script lost its first reading
    about 1 run in 20 on a busy machine; here it would lose all five, every run.)"""
    orch, events = start_daemon(cluster, ("w1",), hold_after_ready=True)
    listener, sensor = EVENTDRIVEN[mode], SENSOR[mode]
    out = tmp_path / "listener"
    orch.register_agent(listener, "listener", listener.Config(out=str(out), subscribe=["AGENT_EVENT.t"], limit=5))
    orch.register_agent(sensor, "sensor", sensor.Config(topic="t"), depends_on=["listener"])
    events.wait("AGENT_READY", "sensor", timeout=30)
    orch.execute("sensor")
    events.wait("AGENT_TERMINATED", "sensor", timeout=30)  # published after its five events
    assert not out.exists()  # the listener has not run: what it gets, it got while held
    orch.execute("listener")
    events.wait("AGENT_TERMINATED", "listener", timeout=30)  # it ends after five events, or waits for ever
    assert len(out.read_text().splitlines()) == 5


def test_publish_refuses_data_that_cannot_travel():
    class Bad(BaseThreadAgent):
        def execute(self):
            pass

    agent = Bad()
    with pytest.raises(TypeError, match="field 'when'"):
        agent.publish("reading", when=object())
    with pytest.raises(TypeError, match="topic"):
        agent.publish("two words", x=1)
    agent.publish("fine", x=1)  # standalone: nowhere to go, no error


@pytest.mark.parametrize("mode", MODES)
def test_remote_log_lines_reach_the_coordinator_and_the_cli(two, mode, caplog):
    orch, events = two
    with caplog.at_level(logging.INFO, logger="pyorchestrate.agent"):
        orch.register_agent(SENSOR[mode], "logger-agent")
        events.wait("AGENT_TERMINATED", "logger-agent")
        wait_for(lambda: "published 5 readings" in caplog.text, 10, "the log line at the coordinator")
    record = next(r for r in caplog.records if "published 5 readings" in r.getMessage())
    assert record.name == "pyorchestrate.agent.logger-agent"
    assert "[w1@" in record.getMessage() or "[w2@" in record.getMessage()
    # the CLI, run afterwards, gets it from the coordinator's history
    result = subprocess.run([sys.executable, "-m", "pyorchestrate.cli", "logs", "logger-agent", "--address",
                             orch.events_address], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "INFO" in result.stdout and "logger-agent@w" in result.stdout and "published 5 readings" in result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_heavy_logging_is_batched_and_never_stalls_the_agent(cluster, mode):
    # callbacks may fall 20,000 lines behind: past the default backlog (10,000) an AGENT_LOG
    # callback is dropped and counted, by design, which a CI run on a busy machine saw once
    orch, events = start_daemon(cluster, ("w1",), ("w2",), min_workers=2, callback_backlog=40_000)
    logs = []
    orch.register_event("AGENT_LOG", lambda message: logs.append(message))
    started = time.monotonic()
    orch.register_agent(CHATTY[mode], "chatty")
    terminated = events.wait("AGENT_TERMINATED", "chatty", timeout=60)[0]
    took = time.monotonic() - started
    assert terminated["ok"] is True
    wait_for(lambda: len(logs) >= 20000, 30, "every line to arrive")
    assert logs[0] == "line 0" and logs[-1] == "line 19999"
    assert orch.status()["lost_events"] == 0
    assert took < 30, took


def test_late_subscriber_gets_recent_history(two):
    orch, events = two
    orch.register_agent(Quick, "early")
    events.wait("AGENT_TERMINATED", "early")
    with EventSubscriber(orch.events_address, topics=["AGENT_"], timeout=1.0, history=True) as late:
        got = [(ev.event, ev.agent_name) for ev in late]
    assert ("AGENT_STARTED", "early") in got and ("AGENT_TERMINATED", "early") in got
    assert got.index(("AGENT_STARTED", "early")) < got.index(("AGENT_TERMINATED", "early"))
    with EventSubscriber(orch.events_address, topics=["AGENT_"], timeout=0.5) as plain:
        assert not [ev for ev in plain if ev.agent_name == "early"], "without history= nothing old comes"


class LongLines(BaseThreadAgent):
    def execute(self):
        for i in range(1100):
            self.logger.info("%d %s", i, "z" * 64_000)


def test_a_late_subscriber_gets_the_recent_history_that_fits_its_socket(cluster):
    """1,100 log lines of 64 KB: the answer to a history request was one 70 MB frame, over a
    subscriber's 64 MiB limit.  Its connection went, it asked again on reconnecting, was sent the
    same frame (the coordinator's loop stalled 1.9 s), and never got a line.  The answer now holds
    the newest lines that fit in 16 MiB, in order."""
    orch, events = start_daemon(cluster, ("w1",), history_max_bytes=256 * 2**20)
    logs: list[str] = []
    orch.register_event("AGENT_LOG", lambda message, **_: logs.append(message))
    orch.register_agent(LongLines, "long")
    events.wait("AGENT_TERMINATED", "long", timeout=60)
    wait_for(lambda: len(logs) == 1100, 30, "every line in the coordinator's history")
    with EventSubscriber(orch.events_address, topics=["AGENT_LOG.long"], timeout=3.0, history=True) as late:
        got = [int(ev.message.split()[0]) for ev in late]
    assert 100 < len(got) < 1100, len(got)  # as many as fit
    assert got == list(range(1100 - len(got), 1100))  # the newest, in order
    assert orch.status()["lost_events"] == 0
    # the same for `pyorchestrate history`: its reply was as large, and the client waited in vain
    with ControlClient(orch.address, timeout=10.0) as client:
        rows = [int(row["message"].split()[0]) for row in client.history(agent="long", limit=1100)
                if row["event"] == "AGENT_LOG"]
    assert 100 < len(rows) < 1100 and rows == list(range(1100 - len(rows), 1100)), len(rows)


def test_recent_history_is_bounded_by_items_and_bytes_newest_first():
    from pyorchestrate.history import History

    h = History(100, 10**9)
    for seq in range(1, 11):
        h.add(seq, "AGENT_LOG.a" if seq % 2 else "AGENT_LOG.b", bytes(seq * 10))
    assert [len(b) for _, b in h.recent(["AGENT_LOG.a"])] == [10, 30, 50, 70, 90]
    assert [len(b) for _, b in h.recent(["AGENT_LOG.a"], max_items=2)] == [70, 90]
    assert [len(b) for _, b in h.recent(["AGENT_LOG.a"], max_bytes=170)] == [70, 90]
    assert [len(b) for _, b in h.recent(["AGENT_LOG.a"], max_bytes=5)] == [90]  # at least one
    assert [t for t, _ in h.recent(["AGENT_LOG."], max_items=3)] == ["AGENT_LOG.b", "AGENT_LOG.a", "AGENT_LOG.b"]
    assert h.recent(["AGENT_EVENT."]) == []


@pytest.mark.parametrize("seed", range(200))
def test_a_history_answer_built_a_slice_at_a_time_is_the_answer_at_its_start(seed):
    """The loop builds an answer between its other work (history.RecentScan), while events are
    published: the answer is what history held at the scan's start, minus only what left history
    before the scan reached it, and in order."""
    import random

    from pyorchestrate.history import History, RecentScan

    rng = random.Random(seed)
    topics = ["AGENT_LOG.a", "AGENT_LOG.b", "AGENT_EVENT.a", "WORKER_JOINED.w", "AGENT_LOG.ab"]
    held = rng.choice([5, 50, 400, 10**6])
    h = History(held, 10**9)
    seq = 0

    def publish(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            h.add(seq, rng.choice(topics), seq.to_bytes(4, "big") * rng.randint(1, 3))

    publish(rng.randint(0, 500))
    prefixes = rng.sample(["AGENT_LOG.a", "AGENT_LOG.", "AGENT_", "WORKER", "", "X"], rng.randint(0, 3))
    max_items, max_bytes = rng.choice([(3, 10**9), (2000, 40), (2000, 10**9)])
    at_start = History(10**6, 10**9)
    for item in h.items():
        at_start.add(*item)
    expected = at_start.recent(prefixes, max_items, max_bytes)
    scan = RecentScan(h, prefixes, max_items, max_bytes)
    oldest = h.oldest
    steps = 0
    while not scan.step(rng.randint(1, 30)):
        publish(rng.choice([0, 0, 1, 7, 60]))  # between slices: events come, old ones go
        steps += 1
        assert steps < 10_000
    answer = scan.answer()
    # what left history before the scan reached it is all that may be missing, from the oldest side
    assert answer == expected[len(expected) - len(answer):], (answer, expected)
    if h.oldest == oldest:  # nothing left meanwhile: all of it
        assert answer == expected


def test_an_oversized_event_raises_in_the_agent_and_numbers_nothing():
    from pyorchestrate.publisher import MAX_EVENT_BYTES, AgentBus

    sent = []
    bus = AgentBus(sent.append, "w1/a", "run.1", {"agent_name": "a"})
    bus.publish("AGENT_EVENT", "t", {"data": {"n": 1}})
    with pytest.raises(ValueError, match=f"over the bus limit of {MAX_EVENT_BYTES:,} bytes"):
        bus.publish("AGENT_EVENT", "t", {"data": {"blob": b"x" * (MAX_EVENT_BYTES + 1)}})
    bus.publish("AGENT_EVENT", "t", {"data": {"n": 2}})
    assert [item[3] for item in sent] == [1, 2]  # the refused one left no gap
    assert bus.flush() == {"bus_publisher": "w1/a", "bus_incarnation": "run.1", "bus_seq": 2}


def test_a_query_goes_ahead_of_other_threads_commands_but_never_its_own():
    import threading

    from pyorchestrate.mailbox import Mailbox

    box = Mailbox()
    try:
        other = threading.Thread(target=lambda: [box.put(f"add{i}") for i in range(3)])
        other.start()
        other.join()
        box.put("status", query=True)  # this thread queued nothing: it goes first
        box.put("status2", query=True)  # queries among themselves: first come, first served
        assert box.queries() == ["status", "status2"]
        box.put("mine")
        box.put("my-status", query=True)  # behind this thread's own command
        assert box.queries() == []
        assert box.drain(2) == ["add0", "add1"]
        assert box.drain() == ["add2", "mine", "my-status"]
    finally:
        box.close()
