"""Agents running on real worker processes: lifecycle, events, callbacks, spreading, stop."""

from __future__ import annotations

import threading

import pytest
from agents import (Boom, BoomProcess, Forever, ForeverProcess, PoolQuits, Quick, QuickProcess, Quits, Shout,
                    ShoutProcess, Sleeper)
from conftest import LIFECYCLE, EventLog, free_port, start_daemon, wait_for

from pyorchestrate import EventSubscriber, Orchestrator, OrchestratorEvent, RunMode


def two_workers(cluster, **settings):
    orch = cluster.orchestrator(min_workers=2, **settings)
    events = EventLog(orch)
    orch.start()
    cluster.worker(orch.address, "w1")
    cluster.worker(orch.address, "w2")
    return orch, events


def test_lifecycle_events_in_order_with_their_fields(cluster):
    orch, events = two_workers(cluster)
    orch.register_agent(Quick, "thread-agent")
    orch.register_agent(QuickProcess, "process-agent")
    assert orch.join(timeout=30)
    for agent in ("thread-agent", "process-agent"):
        mine = [e for e in events.events if e.get("agent_name") == agent and e["event"] in LIFECYCLE]
        assert [e["event"] for e in mine] == ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"]
        for e in mine:
            assert e["worker"] in ("w1", "w2") and e["host"]
            assert e["event_date"].count("-") == 2 and e["event_time"].count(":") == 2
            assert isinstance(e["seq"], int)
    seqs = [(e["publisher"], e["incarnation"], e["seq"]) for e in events.events]
    assert len(seqs) == len(set(seqs)), "sequence numbers are unique per publisher"
    assert events.of("ALL_AGENTS_TERMINATED")
    assert {e["worker"] for e in events.of("WORKER_JOINED")} == {"w1", "w2"}


def test_two_agents_spread_over_two_workers(cluster):
    orch, events = two_workers(cluster)
    orch.register_agent(Sleeper, "a")
    orch.register_agent(Sleeper, "b")
    assert orch.join(timeout=30)
    started = {e["agent_name"]: e["worker"] for e in events.of("AGENT_STARTED")}
    assert sorted(started.values()) == ["w1", "w2"]


def test_erroring_agent_reports_error_then_terminated_and_others_run(cluster):
    orch, events = two_workers(cluster)
    orch.register_agent(Boom, "boom")
    orch.register_agent(BoomProcess, "boom-process")
    orch.register_agent(Sleeper, "fine")
    assert orch.join(timeout=30)
    for agent, text in (("boom", "ValueError: boom from agent"), ("boom-process", "RuntimeError: process boom")):
        kinds = [e["event"] for e in events.events if e.get("agent_name") == agent and e["event"] in LIFECYCLE]
        assert kinds == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"]
        error = events.of("AGENT_ERROR", agent)[0]
        assert error["error_message"] == text
        assert "Traceback (most recent call last)" in error["traceback"] and "execute" in error["traceback"]
    assert not events.of("AGENT_ERROR", "fine")
    assert events.of("AGENT_TERMINATED", "fine")[0]["ok"] is True
    assert orch.status()["agents"]["boom"]["failed"] is True


def test_an_agent_that_calls_sys_exit_anywhere_still_ends_saying_so(cluster):
    """``sys.exit()`` (or a KeyboardInterrupt) in a thread agent's ``__init__``, ``on_stop``,
    ``on_close`` or a plugin's hooks ended its thread before its end was reported: the agent stayed
    ASSIGNED or READY for good (a join() waited for ever), and a pool's run that called it was lost
    without a word.  Each is now the agent's error, and its end follows."""
    orch, events = start_daemon(cluster, ("w1",))
    cases = {f"{where.replace(' ', '-')}-{how}": (where, how)
             for where in ("__init__", "on_stop", "on_close", "plugin initialize", "plugin finalize")
             for how in ("exit", "interrupt")}
    for name, (where, how) in cases.items():
        orch.register_agent(Quits, name, Quits.Config(where=where, how=how, stop_timeout=30))
    orch.register_agent(PoolQuits, "pool")
    for name, (where, _) in cases.items():
        if where != "__init__":  # a plugin's error is recoverable: that agent runs on till stopped too
            events.wait("AGENT_READY", name)
            orch.stop_agent(name)
    for name, (_, how) in [*cases.items(), ("pool", ("", "exit"))]:
        ended = events.wait("AGENT_TERMINATED", name, timeout=20)[0]
        errors = [e["error_message"] for e in events.of("AGENT_ERROR", name)]
        assert errors == ["SystemExit: 7" if how == "exit" else "KeyboardInterrupt: "], (name, errors)
        assert ended["ok"] is name.startswith("plugin"), name  # a plugin's error is recoverable
    orch.stop()


def test_an_error_too_long_for_a_frame_is_reported_cut_and_costs_no_connection(cluster):
    """An exception whose text holds a 10 MB payload, under the smallest max_message_size (4 MiB):
    its report used to exceed the coordinator's limit, which cost the worker its connection and the
    AGENT_ERROR with it (lost, counted nowhere). Now the message and traceback are cut to size."""
    orch = cluster.orchestrator(min_workers=1, max_message_size=4 * 1024 * 1024)
    events = EventLog(orch)
    orch.start()
    cluster.worker(orch.address, "w1")
    orch.register_agent(Shout, "shout")
    orch.register_agent(ShoutProcess, "shout-process")
    assert orch.join(timeout=30)
    for agent in ("shout", "shout-process"):
        error = events.of("AGENT_ERROR", agent)[0]
        assert error["error_message"].startswith("ValueError: xxx") and error["error_message"].endswith("xxx")
        assert "characters cut" in error["error_message"] and len(error["error_message"]) < 20_000
        assert "Traceback (most recent call last)" in error["traceback"] and len(error["traceback"]) < 70_000
    assert "registering again" not in cluster.log_of("w1")
    assert not orch.status()["dropped"]


def test_many_long_errors_at_once_are_sent_in_frames_of_bounded_size():
    """A worker's reports of many failures, each with a long traceback, go in several frames (not
    one over the coordinator's limit), all of them, in order (a real Worker object, not serving)."""
    from pyorchestrate import protocol
    from pyorchestrate_worker.node import Worker

    worker = Worker("tcp://127.0.0.1:9", name="w1")
    sent: list[list[dict]] = []
    worker._send_events = sent.append
    try:
        for i in range(60):
            worker._queue_event(f"a{i}", "run", 1, "AGENT_ERROR", {"error_message": "m" * 50_000,
                                                                   "traceback": "t" * 200_000})
        worker._queue_event("fine", "run", 1, "AGENT_STARTED", {})
        worker._flush_events()
        assert [item["agent"] for batch in sent for item in batch] == [f"a{i}" for i in range(60)] + ["fine"]
        assert len(sent) > 1
        for batch in sent:
            assert len(protocol.encode("agent_events", events=batch)) < 4 * 1024 * 1024
    finally:
        worker._supervisor.close()
        worker._outbox.close()
        worker._bus_signal.close()
        worker._ctx.term()


def test_a_heartbeat_says_reports_wait_while_an_ended_agents_end_is_only_queued():
    """An agent that ended since the loop last flushed has put its end in the outbox and no longer
    counts as running.  The heartbeat that leaves it out must say reports wait: else the
    coordinator, which still counts the copy, takes the difference for a lost report, and after
    three such heartbeats asks for a registration (whose error texts are cut to fit one frame).
    Seen beside 8 CPU burners, 100 agents failing at once over a narrow link (a real Worker object,
    not serving)."""
    from pyorchestrate import protocol
    from pyorchestrate_worker.node import Worker

    worker = Worker("tcp://127.0.0.1:9", name="w1")
    beats: list[dict] = []
    worker._send_plain = lambda frame: beats.append(protocol.decode(frame))
    worker._send_events = lambda batch: None
    try:
        worker._beat()
        assert beats[-1]["running"] == 0 and not beats[-1]["waiting"]
        # as the agent's thread does when it ends: its end queued, then it counts as ended
        worker._queue_event("done", "run", 1, "AGENT_TERMINATED", {"ok": True, "reached": "STARTED"})
        worker._beat()
        assert beats[-1]["running"] == 0 and beats[-1]["waiting"]
        worker._flush_events()  # sent: the coordinator reads it before the next heartbeat
        worker._beat()
        assert beats[-1]["running"] == 0 and not beats[-1]["waiting"]
    finally:
        worker._supervisor.close()
        worker._outbox.close()
        worker._bus_signal.close()
        worker._ctx.term()


def test_callbacks_get_only_accepted_kwargs_and_failures_are_isolated(cluster):
    orch = cluster.orchestrator(min_workers=1)
    got: dict[str, object] = {}
    lock = threading.Lock()

    def narrow(agent_name):
        with lock:
            got.setdefault("narrow", []).append(agent_name)

    def dated(agent_name, event_date, event_time):
        with lock:
            got.setdefault("dated", []).append((agent_name, event_date, event_time))

    def broken(**kwargs):
        raise RuntimeError("a buggy callback")

    def everything(**kwargs):
        with lock:
            got.setdefault("everything", []).append(kwargs)

    for callback in (broken, narrow, dated, everything):
        orch.register_event(OrchestratorEvent.AGENT_TERMINATED, callback)
    orch.start()
    cluster.worker(orch.address, "w1")
    orch.register_agent(Quick, "q")
    assert orch.join(timeout=30)
    assert got["narrow"] == ["q"]
    assert got["dated"][0][0] == "q"
    assert {"agent_name", "worker", "host", "seq", "event"} <= set(got["everything"][0])
    assert orch._dispatcher.failures == 1


def test_register_event_rejects_unknown_events():
    orch = Orchestrator("x")
    with pytest.raises(ValueError, match="unknown event"):
        orch.register_event("NOT_AN_EVENT", print)
    with pytest.raises(TypeError, match="callable"):
        orch.register_event(OrchestratorEvent.AGENT_READY, "print")


def test_daemon_mode_starts_agents_registered_after_start_and_stop_ends_it(cluster, tmp_path):
    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON)
    events = EventLog(orch)
    orch.start()
    cluster.worker(orch.address, "w1")
    trace = tmp_path / "trace.txt"
    orch.register_agent(Forever, "forever", Forever.Config(trace=str(trace)))
    orch.register_agent(ForeverProcess, "forever-process")
    events.wait("AGENT_READY", "forever")
    events.wait("AGENT_READY", "forever-process")
    orch.register_agent(Quick, "late")
    events.wait("AGENT_TERMINATED", "late")
    assert not orch.join(timeout=0.3), "a daemon keeps running with agents done"
    orch.stop(timeout=5)
    assert orch.join(timeout=1)
    for agent in ("forever", "forever-process"):
        assert events.of("AGENT_TERMINATED", agent)[0]["ok"] is True
    assert trace.read_text().split() == ["setup", "on_stop", "on_close"]
    assert events.of("ALL_AGENTS_TERMINATED")


def test_waits_take_an_infinite_timeout_as_until_it_happens(cluster):
    """``join(timeout=float("inf"))`` raised OverflowError ("timestamp out of range for platform
    time_t"), as did a handle's ``wait_ready`` and an EventSubscriber's ``recv`` and
    ``wait_connected`` (cannot convert float infinity to integer)."""
    inf = float("inf")
    orch = cluster.orchestrator(min_workers=1)
    orch.register_agent(Sleeper, "sleeper", Sleeper.Config(seconds=0.5))
    orch.start()
    with EventSubscriber(orch.events_address, ["AGENT_READY"]) as sub:
        assert sub.wait_connected(inf)
        cluster.worker(orch.address, "w1")
        assert orch.agent("sleeper").wait_ready(inf)
        assert sub.recv(inf).agent_name == "sleeper"
    assert orch.join(timeout=inf) and orch.agent("sleeper").wait_closed(inf)


def test_context_manager_stops_running_agents(cluster):
    with cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON) as orch:
        events = EventLog(orch)
        orch.start()
        cluster.worker(orch.address, "w1")
        orch.register_agent(Forever, "forever")
        events.wait("AGENT_READY", "forever")
    assert events.of("AGENT_TERMINATED", "forever")
    assert events.of("SHUTDOWN")


def test_a_worker_serves_one_coordinator_after_another(cluster):
    # a port below the ephemeral range: the second binds port+1 and port+2 as well, which with an
    # OS-chosen port could be taken meanwhile by a parallel test's OS-chosen socket (seen in CI)
    port = free_port()
    first = cluster.orchestrator("first", address=f"tcp://127.0.0.1:{port}", min_workers=1)
    first.start()
    cluster.worker(first.address, "w1")
    first.register_agent(Quick, "q1")
    assert first.join(timeout=30)
    second = cluster.orchestrator("second", address=f"tcp://127.0.0.1:{port}", min_workers=1)
    events = EventLog(second)
    second.start()
    second.register_agent(Quick, "q2")
    assert second.join(timeout=30)
    assert events.of("AGENT_TERMINATED", "q2")[0]["worker"] == "w1"


def test_join_raises_when_no_worker_joins(cluster):
    orch = cluster.orchestrator(min_workers=1, worker_wait_timeout=0.5)
    events = EventLog(orch)
    orch.register_agent(Quick, "q")
    orch.start()
    with pytest.raises(TimeoutError, match="pyorchestrate-worker --coordinator"):
        orch.join(timeout=20)
    assert "no worker" in events.wait("AGENT_ERROR", "q")[0]["error_message"]


def test_status_reports_labels_and_capacity(cluster):
    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON)
    orch.start()
    cluster.worker(orch.address, "gpu-box", "--labels", "gpu=1,zone=a", "--capacity", "3")
    status = wait_for(lambda: orch.status()["workers"].get("gpu-box"), 15, "worker to register")
    assert status["labels"] == {"gpu": "1", "zone": "a"}
    assert status["capacity"] == 3
    assert status["alive"] is True


def test_each_class_is_sent_once_per_worker(cluster):
    orch = cluster.orchestrator(min_workers=1)
    orch.start()
    cluster.worker(orch.address, "w1")
    for i in range(5):
        orch.register_agent(Quick, f"q{i}")
    orch.register_agent(Sleeper, "s", Sleeper.Config(seconds=0.01))
    assert orch.join(timeout=30)
    assert orch.status()["class_blobs_sent"] == 2  # Quick once, Sleeper once


def test_user_modules_ship_by_value_installed_libraries_by_reference():
    from pyorchestrate import shipping

    roots = shipping.user_module_roots()
    assert "agents" in roots and "conftest" in roots  # this test suite's own modules
    for installed in ("zmq", "msgpack", "cloudpickle", "pytest", "json", "pyorchestrate"):
        assert installed not in roots


def test_periodic_process_agent_on_a_worker(cluster, tmp_path):
    from pyorchestrate import PeriodicProcessAgent

    class Ticker(PeriodicProcessAgent):
        class Config(PeriodicProcessAgent.Config):
            execution_interval = 0.05
            limit = 4
            out = ""

        def runner(self):
            with open(self.config.out, "a") as f:
                f.write("tick\n")

    orch = cluster.orchestrator(min_workers=1)
    events = EventLog(orch)
    orch.register_agent(Ticker, "ticker", Ticker.Config(out=str(tmp_path / "ticks")))
    orch.start()
    cluster.worker(orch.address, "w1")
    assert orch.join(timeout=30)
    assert (tmp_path / "ticks").read_text().split() == ["tick"] * 4
    assert events.of("AGENT_TERMINATED", "ticker")[0]["ok"] is True


def test_sigterm_stops_a_workers_agents_gracefully_and_exits_0(cluster):
    import signal

    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON)
    events = EventLog(orch)
    orch.start()
    worker = cluster.worker(orch.address, "w1")
    orch.register_agent(Forever, "t")
    orch.register_agent(ForeverProcess, "p")
    events.wait("AGENT_READY", "t")
    events.wait("AGENT_READY", "p")
    events.wait("AGENT_HEARTBEAT", "t")  # running agents are heartbeated on the bus
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    for agent in ("t", "p"):
        assert events.wait("AGENT_TERMINATED", agent)[0]["ok"] is True
    events.wait("WORKER_LEFT", "w1")
    assert not events.of("WORKER_LOST")


def test_explicit_events_address_is_used_and_logged(cluster, caplog):
    import logging

    from conftest import free_port

    wanted = f"tcp://127.0.0.1:{free_port()}"
    orch = cluster.orchestrator(events_address=wanted, run_mode=RunMode.DAEMON)
    with caplog.at_level(logging.INFO, logger="pyorchestrate"):
        orch.start()
    assert orch.events_address == wanted
    assert f"events {wanted}" in caplog.text


def test_console_scripts_are_installed():
    import os
    import subprocess
    import sys

    bindir = os.path.dirname(sys.executable)
    for script, expect in (("pyorchestrate-worker", "--coordinator"), ("pyorchestrate", "events")):
        result = subprocess.run([os.path.join(bindir, script), "--help"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and expect in result.stdout


def test_an_orchestrator_named_with_whitespace_still_gets_its_local_workers():
    """Its local workers are named after it, and a worker's name is printable characters without
    spaces or "/" (pyorchestrate-worker refuses others): a tab in the name left it with no worker."""
    orch = Orchestrator("my\tcluster x/y", config=Orchestrator.Config(worker_wait_timeout=30))
    orch.register_agent(Quick, "q")
    orch.start()
    orch.join()
    status = orch.status()
    assert status["agents"]["q"]["state"] == "TERMINATED" and list(status["workers"]) == ["my_cluster_x_y-local-1"]


def _first_until_told(cluster, tmp_path):
    """A STOP_ON_EMPTY run whose one agent, "first", is READY and ends once ``first.go`` exists."""
    from behaviours import CONDITIONAL

    orch = cluster.orchestrator(min_workers=1)
    events = EventLog(orch)
    cls = CONDITIONAL["thread"]
    orch.register_agent(cls, "first", cls.Config(out=str(tmp_path / "first"), poll_interval=0.02))
    orch.start()
    cluster.worker(orch.address, "w1")
    events.wait("AGENT_READY", "first")
    return orch, events


def test_a_registration_that_meets_the_runs_end_raises_and_is_never_taken_silently(cluster, tmp_path, monkeypatch):
    """STOP_ON_EMPTY: the run ends once every agent has terminated.  A register_agent from another
    thread (or a callback) at that moment either runs its agent or raises; it returned normally,
    and its agent never ran, when the run ended between its check and its hand-over to the loop
    (2 of 5 tries of a thread registering every 0.5 ms as the run ended).  Here that moment is
    held open: the registration waits inside its dependency check while the run ends."""
    import pyorchestrate.orchestrator as orchestrator_module

    inside, go_on = threading.Event(), threading.Event()
    real_check = orchestrator_module.check_graph

    def held_check(graph):
        if threading.current_thread().name == "late":
            inside.set()
            go_on.wait(60)
        return real_check(graph)

    monkeypatch.setattr(orchestrator_module, "check_graph", held_check)
    orch, events = _first_until_told(cluster, tmp_path)
    outcome: list = []

    def late():
        try:
            outcome.append(orch.register_agent(Quick, "late", depends_on=["first"]))
        except RuntimeError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=late, name="late")
    thread.start()
    assert inside.wait(30)
    (tmp_path / "first.go").touch()  # first's condition: it runs and ends, and so does the run
    assert orch.join(timeout=60)
    go_on.set()
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    assert "run has ended" in str(outcome[0]) and "RunMode.DAEMON" in str(outcome[0])
    assert not events.of("AGENT_STARTED", "late")
    # and from a callback of the last agent's end: the same error, said the same way
    said: list = []
    orch2 = cluster.orchestrator(min_workers=1)

    def chain(agent_name):
        try:
            orch2.register_agent(Quick, f"after-{agent_name}")
        except RuntimeError as exc:
            said.append(str(exc))

    orch2.register_event(OrchestratorEvent.AGENT_TERMINATED, chain)
    orch2.register_agent(Quick, "only")
    orch2.start()
    cluster.worker(orch2.address, "w2")
    assert orch2.join(timeout=60)
    assert len(said) == 1 and "run has ended" in said[0], said


def test_a_registration_handed_over_as_the_run_ends_keeps_the_run_going_and_its_agent_runs(cluster, tmp_path,
                                                                                            monkeypatch):
    """The other side of that moment: a registration handed to the loop after the loop last read
    its mailbox, as it finds every agent terminated.  The loop ended the run and never took it
    (register_agent had returned); now it takes it, and the run goes on until that agent ends.
    Here the loop is held at that point until the registration is in its mailbox."""
    from pyorchestrate.coordinator import Coordinator

    at_end, registered = threading.Event(), threading.Event()
    real_check = Coordinator._check_finished

    def held_check(self, now):
        if self.core.all_done() and not at_end.is_set():
            at_end.set()
            registered.wait(60)
        return real_check(self, now)

    monkeypatch.setattr(Coordinator, "_check_finished", held_check)
    orch, events = _first_until_told(cluster, tmp_path)
    joined = []
    joiner = threading.Thread(target=lambda: joined.append(orch.join(timeout=60)))
    joiner.start()
    (tmp_path / "first.go").touch()
    assert at_end.wait(30)  # every agent terminated, the script in join(): the loop is about to end the run
    assert orch.register_agent(Quick, "late") == "late"
    registered.set()
    joiner.join(60)
    assert joined == [True]
    assert [e["ok"] for e in events.of("AGENT_TERMINATED", "late")] == [True]
    assert len(events.of("ALL_AGENTS_TERMINATED")) == 1
