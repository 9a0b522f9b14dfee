"""A call the coordinator's loop did not take in time (``Orchestrator.CALL_TIMEOUT``) raises
TimeoutError and is withdrawn: it is not done later.  Left queued, it was: a ``send`` that raised
and was sent again reached its agent twice."""

from __future__ import annotations

import time

import pytest
from conftest import start_daemon, wait_for

import pyorchestrate.orchestrator as orchestrator_module


def test_a_call_that_timed_out_is_never_done_and_one_that_returned_always_is(cluster, tmp_path, monkeypatch):
    from agents import Inboxed

    orch, events = start_daemon(cluster, ("w1",))
    trace = tmp_path / "trace"
    orch.register_agent(Inboxed, "inboxed", Inboxed.Config(trace=str(trace)))
    events.wait("AGENT_READY", "inboxed")
    # a microsecond: the loop takes some sends in time, not others.  Which is the scheduler's
    # choice: once (a clean-clone CI run) it took all of 300, so sends go on, 3,000 at most, until
    # one was not taken in time
    monkeypatch.setattr(orchestrator_module, "CALL_TIMEOUT", 1e-6)
    returned, raised = [], []
    for i in range(3000):
        if raised and i >= 300:
            break
        try:
            orch.send("inboxed", i)
            returned.append(i)
        except TimeoutError as exc:
            assert "not done" in str(exc) and "call again" in str(exc), exc
            raised.append(i)
    monkeypatch.setattr(orchestrator_module, "CALL_TIMEOUT", 30.0)
    assert raised, f"all {len(returned)} sends were taken within a microsecond"
    orch.send("inboxed", "end")
    wait_for(lambda: trace.exists() and "message end" in trace.read_text(), 30, "the last message handled")
    got = [line.split()[1] for line in trace.read_text().splitlines()]
    assert got == [str(i) for i in returned] + ["end"], sorted(set(got) & {str(i) for i in raised})


@pytest.mark.parametrize("call", ["status", "stop_agent"])
def test_other_calls_time_out_the_same_way(cluster, call, monkeypatch):
    """A query (status) and a command (stop_agent) at a timeout of 0: each raises the same clear
    TimeoutError when the loop did not take it at once, and a stop that raised is not done (the
    status() after it is answered after the loop passed it by).  Tried until one raises."""
    from agents import Forever

    orch, events = start_daemon(cluster, ("w1",))
    for attempt in range(20):
        name = f"forever{attempt}"
        orch.register_agent(Forever, name)
        events.wait("AGENT_READY", name)
        monkeypatch.setattr(orchestrator_module, "CALL_TIMEOUT", 0)
        try:
            orch.status() if call == "status" else orch.stop_agent(name)
        except TimeoutError as exc:
            assert "within 0 s" in str(exc) and "not done" in str(exc), exc
            monkeypatch.setattr(orchestrator_module, "CALL_TIMEOUT", 30.0)
            assert orch.status()["agents"][name]["state"] == "READY"
            if call == "stop_agent":  # a stop done would end it within milliseconds: give it 3 s
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline and not events.of("AGENT_TERMINATED", name):
                    time.sleep(0.05)
            assert not events.of("AGENT_TERMINATED", name)
            return
        monkeypatch.setattr(orchestrator_module, "CALL_TIMEOUT", 30.0)
        if call == "stop_agent":  # taken at once: done
            events.wait("AGENT_TERMINATED", name)
    pytest.fail("20 calls were all taken at once")


def test_a_call_that_meets_the_shutdown_is_told_at_once_not_after_the_call_timeout(cluster, monkeypatch):
    """A call put in as the coordinator shut down was never taken: its caller waited the whole
    call timeout (30 s) and then heard the loop "was stopped, or is overloaded".  Two moments:
    the call comes after the loop's last turn (held here: put as the loop closes), or after the
    mailbox closed (the caller passed the shut-down check just before)."""
    import concurrent.futures

    from pyorchestrate import commands
    from pyorchestrate.coordinator import Coordinator

    monkeypatch.setattr(orchestrator_module, "CALL_TIMEOUT", 5.0)
    late: list = []
    real_close = Coordinator._close

    def close_with_a_late_call(self):
        if self.core is not None and not late:
            late.append(concurrent.futures.Future())
            self.mailbox.put((commands.Snapshot(), late[0]), query=True)
        real_close(self)

    monkeypatch.setattr(Coordinator, "_close", close_with_a_late_call)
    orch, events = start_daemon(cluster, ("w1",))
    orch.stop()
    orch._coordinator.join_thread(60)  # (stop() waits 10 s for the loop's end: a loaded machine may take longer)
    assert len(late) == 1
    with pytest.raises(RuntimeError, match="shut down"):
        late[0].result(timeout=1)
    orch._shut = False  # as for a caller that checked just before the shutdown
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="shut down"):
            orch.send("anyone", 1)
    finally:
        orch._shut = True
    assert time.monotonic() - started < 1.0
