"""An agent whose making takes seconds (its class's imports, its ``__init__``) holds up nothing but
itself (worker/handoff.py).

A worker made each thread agent in its loop, and an agent host in the thread that reads the
worker's messages.  A 3 s ``__init__`` there silenced the worker for 3 s: with a 0.5 s liveness
window its coordinator took it for lost, failed the agent running beside it and restarted that
agent once the worker's lease had stopped it.  Now the agent's own thread makes it, and what it is
sent meanwhile reaches it, in order, once it exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DETECT, wait_for

from pyorchestrate import OrchestratorEvent


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("where", ["worker", "agent host"])
def test_a_slow_init_loses_no_worker_stops_no_neighbour_and_gets_what_it_was_sent(cluster, tmp_path, where):
    from agents import QuietTracer, SlowToMake

    trace, victim_trace = tmp_path / "trace.txt", tmp_path / "victim.txt"
    orch = cluster.orchestrator(min_workers=2, **DETECT)
    lost: list[str] = []
    orch.register_event(OrchestratorEvent.WORKER_LOST, lambda worker: lost.append(worker))
    orch.start()
    # in the agent host variant the victim and a filler take the worker's own two thread slots: the
    # neighbour and the slow agent go to an agent host (of two)
    cluster.worker(orch.address, "w1", *(["--threads-per-process", "2"] if where == "agent host" else []))
    cluster.worker(orch.address, "w2")
    orch.register_agent(QuietTracer, "victim", QuietTracer.Config(trace=str(victim_trace)), worker="w1",
                        restart="always")
    assert orch.agent("victim").wait_ready(30)
    if where == "agent host":
        for name in ("filler", "neighbour"):
            orch.register_agent(SlowToMake, name, SlowToMake.Config(seconds=0.0, trace=str(trace)), worker="w1")
            assert orch.agent(name).wait_ready(30)
    orch.register_agent(SlowToMake, "slow", SlowToMake.Config(seconds=3.0, trace=str(trace)), worker="w1")
    wait_for(lambda: "making slow" in lines(trace), 30, "slow being made")
    orch.send("slow", "early-1")
    orch.send("slow", "early-2")
    if where == "agent host":
        orch.send("neighbour", "meanwhile")
    assert orch.agent("slow").wait_ready(30)
    wait_for(lambda: "message early-2" in lines(trace), 10, "the messages sent while it was being made")
    seen = lines(trace)
    assert seen.index("made slow") < seen.index("message early-1") < seen.index("message early-2"), seen
    if where == "agent host":  # the host read the worker's messages for its other agents meanwhile
        assert "message meanwhile" in seen and seen.index("message meanwhile") < seen.index("made slow"), seen
    assert not lost
    victims = [line.split()[1] for line in lines(victim_trace) if not line.startswith("alive")]
    assert victims == [victims[0]] and orch.agent("victim").state == "READY", (victims, lost)


def test_a_stop_sent_while_an_agent_is_made_ends_it_once_made(cluster, tmp_path):
    from agents import SlowToMake

    trace = tmp_path / "trace.txt"
    orch = cluster.orchestrator(min_workers=1, **DETECT)
    orch.start()
    cluster.worker(orch.address, "w1")
    orch.register_agent(SlowToMake, "slow", SlowToMake.Config(seconds=2.0, trace=str(trace)))
    wait_for(lambda: "making slow" in lines(trace), 30, "slow being made")
    orch.stop_agent("slow", timeout=5)
    # an event-driven agent runs until stopped: a stop lost on its way would leave it running
    wait_for(lambda: orch.agent("slow").state == "TERMINATED", 30, "slow ended")
    assert "made slow" in lines(trace)
    assert not orch.status()["agents"]["slow"]["failed"]


def test_a_handoff_keeps_what_comes_before_the_agent_and_hands_it_over_in_order():
    """The pure part: messages and a stop given before the agent exists reach it when it is made,
    in order and before anything given later; nothing is kept for an agent that failed."""
    from pyorchestrate_worker.handoff import Handoff

    class Agent:
        def __init__(self):
            self.got: list = []

        def deliver(self, kind, payload):
            self.got.append((kind, payload))

        def stop(self):
            self.got.append("stop")

    handoff, agent = Handoff(), Agent()
    handoff.give("message", 1)
    handoff.give("stop")
    handoff.give("trigger", 2)
    assert agent.got == []
    handoff.made(agent)
    assert agent.got == [("message", 1), ("trigger", 2), "stop"]
    handoff.give("message", 3)
    assert agent.got[-1] == ("message", 3) and handoff.agent is agent

    failed = Handoff()
    failed.give("message", 1)
    failed.failed()
    failed.give("stop")
    assert failed.agent is None


def test_a_handoff_keeps_at_most_its_bound_before_the_agent_and_counts_the_rest_as_the_agents_drops(monkeypatch):
    """An ``__init__`` that never returns beside a script that keeps sending grew the worker without
    end: now the first EARLY_MAX messages wait, the rest are dropped and counted in the agent's
    inbox once it is made (a real agent, unbounded inbox: only the handoff's bound drops)."""
    from agents import Inboxed
    from pyorchestrate_worker import handoff as handoff_module

    monkeypatch.setattr(handoff_module, "EARLY_MAX", 5)
    handoff = handoff_module.Handoff()
    for i in range(8):
        handoff.give("message", i)
    handoff.give("execute")  # a flag, never refused
    handoff.give("stop")
    assert handoff.dropped == 3
    agent = Inboxed("inboxed", Inboxed.Config(inbox_max=-1))
    handoff.made(agent)
    assert [agent._next_delivery(0)[1] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert agent._next_delivery(0) is None
    assert agent._inbox.dropped == 3 and agent.control_events.execute_event.is_set() and agent.stopping


def test_messages_sent_to_an_agent_that_is_never_made_wait_up_to_a_bound_and_the_rest_are_counted(cluster, tmp_path):
    """A thread agent whose ``__init__`` waits (for a connection, say) is sent 10,050 messages: 10,000
    wait for it (before, all of them, without end), 50 are dropped; once made it handles the 10,000
    (its own inbox is unbounded), and its end and the coordinator's counts say 50 dropped."""
    from agents import MadeOnCue
    from conftest import start_daemon

    orch, events = start_daemon(cluster, ("w1",))
    trace, cue = tmp_path / "trace", tmp_path / "cue"
    orch.register_agent(MadeOnCue, "slow", MadeOnCue.Config(trace=str(trace), cue=str(cue), inbox_max=-1))
    wait_for(lambda: lines(trace) == ["making slow"], 30, "its __init__ to start")
    for i in range(10_050):
        orch.send("slow", i)
    # the worker reads the coordinator's frames in order: once an agent started after them has
    # ended, it has handed every message to the handoff (the agent is still being made)
    from agents import Quick

    orch.register_agent(Quick, "after", worker="w1")
    events.wait("AGENT_TERMINATED", "after", timeout=60)
    assert lines(trace) == ["making slow"]
    cue.touch()
    wait_for(lambda: len(lines(trace)) >= 10_001, 60, "the messages kept for it to be handled")
    orch.stop_agent("slow")
    end = events.wait("AGENT_TERMINATED", "slow")[0]
    assert lines(trace)[1:] == [f"message {i}" for i in range(10_000)]
    assert end["messages_dropped"] == 50 and "messages_unhandled" not in end, end
    assert orch.status()["dropped"] == {"agent_inbox_full": 50}
