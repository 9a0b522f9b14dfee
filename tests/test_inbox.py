"""An agent's inbox is bounded (``Config.inbox_max``): a script that sends faster than its agent
handles loses the excess, counted, instead of growing the worker without end (agents/inbox.py);
and the worker's own queues towards a process that does not read (a stopped process agent or
agent host) hold a bounded amount of deliveries (worker/child_link.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal

import msgpack
import pytest
from conftest import start_daemon, wait_for

from pyorchestrate import BaseThreadAgent, ConfigValidationError
from pyorchestrate.agents.inbox import SAY_EVERY, Inbox


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_inbox_refuses_the_newest_and_counts_it():
    inbox = Inbox(clock=_Clock())
    assert [inbox.put(("message", i), 3) for i in range(5)] == [True, True, True, False, False]
    assert (inbox.waiting(), inbox.dropped) == (3, 2)
    assert inbox.get(0) == ("message", 0)  # room for one more, taken in the order sent
    assert inbox.put(("message", 5), 3) and not inbox.put(("message", 6), 3)
    assert [inbox.get(0)[1] for _ in range(3)] == [1, 2, 5] and inbox.get(0) is None
    assert inbox.dropped == 3
    unbounded = Inbox()
    assert all(unbounded.put(("trigger", i), -1) for i in range(50_000)) and unbounded.dropped == 0


def test_a_tallied_inbox_keeps_what_it_took_and_dropped_in_its_tally():
    """(A process agent's tally is memory shared with its worker: read there if it is killed.)"""
    inbox = Inbox(clock=_Clock())
    inbox.tally = multiprocessing.get_context("forkserver").RawArray("q", 2)
    for i in range(5):
        inbox.put(("message", i), 3)
    inbox.get(0)
    inbox.get(0)
    inbox.get(0)
    assert inbox.get(0) is None  # (nothing taken: not counted)
    assert list(inbox.tally) == [3, 2]


def test_drops_are_said_at_the_first_then_once_per_interval():
    clock = _Clock()
    inbox = Inbox(clock=clock)
    assert inbox.due_to_say() and not inbox.due_to_say()
    clock.now += SAY_EVERY - 0.01
    assert not inbox.due_to_say()
    clock.now += 0.01
    assert inbox.due_to_say() and not inbox.due_to_say()


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "10", None, float("inf")])
def test_a_bad_inbox_max_is_refused_naming_it(value):
    with pytest.raises(ConfigValidationError, match="inbox_max"):
        BaseThreadAgent.Config(inbox_max=value).check("agent 'a'")
    BaseThreadAgent.Config(inbox_max=-1).check("agent 'a'")
    BaseThreadAgent.Config(inbox_max=1).check("agent 'a'")


@pytest.mark.parametrize("mode", ["thread", "process", "hosted"])
def test_messages_past_the_inbox_bound_are_dropped_and_every_one_is_counted(cluster, tmp_path, mode):
    """100 messages to an agent stuck on the first: 20 wait (its bound), the rest are dropped. At
    its stop, what it took, what waited and what was dropped add up to what was sent, in its end
    and in the coordinator's counts; an unbounded one keeps all 99.  ``hosted``: the second of
    two thread agents runs in an agent host (``--threads-per-process 1``)."""
    from agents import FirstOnly, FirstOnlyProcess

    cls = FirstOnlyProcess if mode == "process" else FirstOnly
    orch, events = start_daemon(cluster, ("w1", *(["--threads-per-process", "1"] if mode == "hosted" else [])))
    traces = {name: tmp_path / name for name in ("bounded", "unbounded")}
    orch.register_agent(cls, "bounded", cls.Config(trace=str(traces["bounded"]), inbox_max=20))
    orch.register_agent(cls, "unbounded", cls.Config(trace=str(traces["unbounded"]), inbox_max=-1))
    for name in traces:
        events.wait("AGENT_READY", name)
        for i in range(100):
            orch.send(name, i)
        wait_for(lambda: traces[name].exists(), 30, f"{name} took a message")
        orch.stop_agent(name)
    ends = {name: events.wait("AGENT_TERMINATED", name)[0] for name in traces}
    if mode == "hosted":
        assert "agent host 1: started" in cluster.log_of("w1")
    for name, end in ends.items():
        took = traces[name].read_text().split()
        assert took == ["took", "0"], took  # the first message sent, and no other
    bounded, unbounded = ends["bounded"], ends["unbounded"]
    # 20 waited, or 19 if it took the first only once the inbox was full
    waited, dropped = bounded["messages_unhandled"], bounded["messages_dropped"]
    assert waited in (19, 20) and 1 + waited + dropped == 100, bounded
    assert unbounded["messages_unhandled"] == 99 and "messages_dropped" not in unbounded, unbounded
    assert orch.status()["dropped"] == {"agent_inbox_full": dropped, "agent_ended_with_messages": waited + 99}


def test_what_a_killed_process_agent_was_sent_and_never_handled_is_counted(cluster, tmp_path):
    """A process agent killed at its stop timeout (as by the out-of-memory killer, or a segfault)
    reports no end of its own, and the messages in its inbox and its pipe were lost uncounted.
    Its inbox keeps its counts in memory shared with the worker, which says them in the end it
    reports for it: what it took, what waited and what was dropped add up to what was sent."""
    from agents import FirstOnlyDeafProcess

    orch, events = start_daemon(cluster, ("w1",))
    trace = tmp_path / "trace"
    orch.register_agent(FirstOnlyDeafProcess, "deaf", FirstOnlyDeafProcess.Config(trace=str(trace), inbox_max=20,
                                                                                    stop_timeout=0.5))
    events.wait("AGENT_READY", "deaf")
    for i in range(100):
        orch.send("deaf", i)
    wait_for(lambda: trace.exists(), 30, "deaf took a message")
    orch.stop_agent("deaf")
    end = events.wait("AGENT_TERMINATED", "deaf", timeout=30)[0]
    assert end["ok"] is False and "terminated" in events.of("AGENT_ERROR", "deaf")[-1]["error_message"], end
    assert trace.read_text().split() == ["took", "0"]
    waited, dropped = end.get("messages_unhandled", 0), end.get("messages_dropped", 0)
    assert waited in (19, 20) and 1 + waited + dropped == 100, end
    assert orch.status()["dropped"] == {"agent_inbox_full": dropped, "agent_ended_with_messages": waited}


@pytest.mark.parametrize("mode", ["thread", "process", "hosted"])
def test_messages_that_reach_an_agent_after_its_end_are_counted(cluster, tmp_path, mode):
    """An agent ends (here it stops itself after 200 messages) while the script goes on sending
    until ``send`` says it is not running.  Its end counted only what waited in its inbox: those
    sent meanwhile and still in a process agent's pipe, on the wire, or reaching its worker after
    the end were lost uncounted (up to 908 of about 1,200 in a probe).  The coordinator knows what
    it sent: what it sent, what the agent handled and what was counted add up."""
    from agents import EndsAfter, EndsAfterProcess, FirstOnly

    cls = EndsAfterProcess if mode == "process" else EndsAfter
    orch, events = start_daemon(cluster, ("w1", *(["--threads-per-process", "1"] if mode == "hosted" else [])))
    if mode == "hosted":  # the worker's own place for a thread agent: the next one is hosted
        orch.register_agent(FirstOnly, "first", FirstOnly.Config(trace=str(tmp_path / "first")))
        events.wait("AGENT_READY", "first")
    trace = tmp_path / "handled"
    orch.register_agent(cls, "ender", cls.Config(trace=str(trace), count=200, inbox_max=-1))
    events.wait("AGENT_READY", "ender")
    sent = 0
    with pytest.raises(ValueError, match="not running"):
        for i in range(100_000):  # (bounded: it ends after 200)
            orch.send("ender", i)
            sent += 1
    end = events.wait("AGENT_TERMINATED", "ender")[0]
    if mode == "hosted":
        assert "agent host 1: started" in cluster.log_of("w1")
    assert trace.read_text() == "200" and end["messages_taken"] == 200, end
    assert 200 + end.get("messages_unhandled", 0) + end.get("messages_dropped", 0) == sent, (sent, end)
    # (none sent past the 200th only if the script's thread slept through the end's whole way back)
    assert orch.status()["dropped"] == ({"agent_ended_with_messages": sent - 200} if sent > 200 else {})


def test_what_a_thread_agent_in_an_agent_host_that_died_had_been_sent_is_counted(cluster, tmp_path):
    """An agent host killed (as by the out-of-memory killer, or a segfault) reports nothing for its
    agents: the worker reports their ends, and what they had been sent and never taken was lost
    uncounted.  Each one's inbox counts in memory its host shares with the worker: its end says
    what it took and dropped, and the coordinator counts the rest, wherever it was."""
    from agents import FirstOnly

    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    orch.register_agent(FirstOnly, "first", FirstOnly.Config(trace=str(tmp_path / "first")))
    events.wait("AGENT_READY", "first")  # the worker's own place for a thread agent: the next are hosted
    traces = {name: tmp_path / name for name in ("ended", "hosted")}
    pid_file = tmp_path / "pid"
    # one ends first, so that "hosted" counts in a place of the tally used before (zeroed at its start)
    orch.register_agent(FirstOnly, "ended", FirstOnly.Config(trace=str(traces["ended"]), inbox_max=5))
    events.wait("AGENT_READY", "ended")
    for i in range(10):
        orch.send("ended", i)
    wait_for(traces["ended"].exists, 30, "ended took a message")
    orch.stop_agent("ended")
    assert events.wait("AGENT_TERMINATED", "ended")[0]["messages_taken"] == 1
    orch.register_agent(FirstOnly, "hosted", FirstOnly.Config(trace=str(traces["hosted"]), pid_file=str(pid_file),
                                                              inbox_max=20))
    events.wait("AGENT_READY", "hosted")
    for i in range(50):
        orch.send("hosted", i)
    wait_for(traces["hosted"].exists, 30, "hosted took a message")
    assert "agent host 1: started" in cluster.log_of("w1")
    before = orch.status()["dropped"]
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    end = events.wait("AGENT_TERMINATED", "hosted")[0]
    assert end["ok"] is False and end["messages_taken"] == 1, end
    dropped = end.get("messages_dropped", 0)
    assert end["messages_unhandled"] + dropped == 49 and dropped <= 30, end  # (20 waited at most)
    after = orch.status()["dropped"]
    assert after.get("agent_inbox_full", 0) - before.get("agent_inbox_full", 0) == dropped
    assert after["agent_ended_with_messages"] - before["agent_ended_with_messages"] == end["messages_unhandled"]


def test_what_a_worker_drops_is_in_the_coordinators_status_and_in_the_runs_end(cluster, tmp_path):
    """A process agent that reads nothing (SIGSTOPped) is sent 24 messages of 1 MiB: its worker
    holds 16 MiB of them for it and drops the rest (``deliver_backlog_full``), which only the
    worker's log said.  Its heartbeats carry what it dropped: ``status()`` shows it for that
    worker, and the run's end counts every message it never took among its unhandled."""
    from agents import FirstOnlyProcess

    orch, events = start_daemon(cluster, ("w1",))
    pid_file, trace = tmp_path / "pid", tmp_path / "trace"
    orch.register_agent(FirstOnlyProcess, "p", FirstOnlyProcess.Config(pid_file=str(pid_file), trace=str(trace),
                                                                      inbox_max=-1))
    events.wait("AGENT_READY", "p")
    orch.send("p", "first")  # taken: it writes its pid, then handles that one until stopped
    wait_for(trace.exists, 30, "the agent's pid")
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(24):
            orch.send("p", "x" * (1 << 20))
        wait_for(lambda: orch.status()["workers"]["w1"]["dropped"].get("deliver_backlog_full"), 30,
                 "the worker's drops in the coordinator's status")
    finally:
        os.kill(pid, signal.SIGCONT)
    orch.stop_agent("p")
    end = events.wait("AGENT_TERMINATED", "p")[0]
    refused = orch.status()["workers"]["w1"]["dropped"]["deliver_backlog_full"]
    assert 0 < refused < 24
    assert end["messages_taken"] == 1 and end["messages_unhandled"] == 24, end
    assert orch.status()["dropped"] == {"agent_ended_with_messages": 24}


def test_a_stopped_childs_backlog_refuses_deliveries_past_its_bound_but_never_a_stop(monkeypatch):
    from pyorchestrate_worker import child_link

    monkeypatch.setattr(child_link, "BACKLOG_DELIVERIES_MAX", 1024 * 1024)
    ours, theirs = multiprocessing.Pipe()
    writers: list = []
    # its writer is held back (started below), as one waiting on a pipe its child does not read: a
    # running writer could take deliveries out of the backlog while the test puts them in
    link = child_link.ChildLink(ours, start=writers.append)
    message = ["deliver", "message", "x" * 100_000]  # longer than DIRECT_MAX: always the backlog's
    handed = [link.send(message) for _ in range(30)]
    assert handed == [True] * 10 + [False] * 20 and link.refused == 20  # 10 x ~100 kB fill 1 MiB
    assert link.send(["stop", 1.0]) and link.send(["lease", 9999.0, 5.0])
    assert len(writers) == 1
    writers[0].start()
    got = []
    while not got or got[-1] != ["lease", 9999.0, 5.0]:
        assert theirs.poll(10), [m[0] for m in got[-5:]]
        got.append(msgpack.unpackb(theirs.recv_bytes(), raw=False))
    assert [m[0] for m in got] == ["deliver"] * 10 + ["stop", "lease"]
    # read, the backlog has room again
    wait_for(lambda: link.send(message), 10, "a delivery taken once the backlog was read")
    ours.close()
    theirs.close()


def test_an_agent_hosts_tally_gives_each_live_agent_a_place_of_its_own_and_takes_it_back_at_its_end():
    from pyorchestrate.agents.inbox import TallyPlace
    from pyorchestrate_worker import hosts

    host = hosts.AgentHost(multiprocessing.get_context("forkserver"), 1, "w1", "vm", None, None, False, 20, capacity=2)
    try:
        assert host.add(7, object()) and host.add(8, object()) and host.add(9, object())
        assert host.place == {7: 0, 8: 1}  # a third at once has none (never, as the worker keeps 2 at most)
        first = TallyPlace(host.tally, host.place[7])
        first[0], first[1] = 3, 4  # as its inbox writes them, in the host
        host._heard.add(7)  # (its STARTED was read)
        assert host._counts(7) == {"messages_taken": 3, "messages_dropped": 4} and host._counts(9) == {}
        host.forget(7)
        assert host.add(10, object()) and host.place[10] == 0
        # the host died before it started the next agent there: the counts left are not its own
        assert host._counts(10) == {"messages_taken": 0}
        again = TallyPlace(host.tally, host.place[10])
        again.clear()  # as the host does when it starts its agent
        host._heard.add(10)
        assert (again[0], again[1]) == (0, 0) and host._counts(10) == {"messages_taken": 0}
    finally:
        host.conn.close()
        host._child_conn.close()


def test_a_stopped_agent_hosts_outbox_refuses_deliveries_past_its_bound_but_never_a_stop(monkeypatch):
    from pyorchestrate_worker import hosts

    monkeypatch.setattr(hosts, "BACKLOG_DELIVERIES_MAX", 1024 * 1024)
    host = hosts.AgentHost(multiprocessing.get_context("spawn"), 1, "w1", "vm", None, None, False, 20)
    try:
        message = ["deliver", 1, "message", "x" * 100_000]
        handed = [host.send(message) for _ in range(30)]  # no writer yet: a host that reads nothing
        assert handed == [True] * 10 + [False] * 20 and host.refused == 20
        assert host.send(["stop", 1]) and host.send(["exit"])
    finally:
        host.conn.close()
        host._child_conn.close()
