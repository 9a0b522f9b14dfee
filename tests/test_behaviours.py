"""Every agent behaviour, in its Thread and Process variant, on a real worker process."""

from __future__ import annotations

import signal
import time

import pytest
from agents import DeafProcess, Quick, StuckProcess
from behaviours import (CONDITIONAL, DEFERRED, EVENTDRIVEN, ONESHOT, PERIODIC, POOL, RECOVERY, STUBBORN,
                        TRIGGERED)
from conftest import process_gone, start_daemon, wait_for

MODES = ["thread", "process"]


@pytest.fixture
def daemon(cluster):
    return start_daemon(cluster, ("w1",))


def notes(path):
    return [line.split()[1:] for line in path.read_text().splitlines()] if path.exists() else []


def times(path, word):
    return [float(line.split()[0]) for line in path.read_text().splitlines() if line.split()[1] == word]


@pytest.mark.parametrize("mode", MODES)
def test_oneshot_runs_once(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    orch.register_agent(ONESHOT[mode], "once", ONESHOT[mode].Config(out=str(out)))
    assert events.wait("AGENT_TERMINATED", "once")[0]["ok"] is True
    assert [n[0] for n in notes(out)] == ["ran"]


@pytest.mark.parametrize("mode", MODES)
def test_deferred_waits_and_stop_cancels_the_wait(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    orch.register_agent(DEFERRED[mode], "later", DEFERRED[mode].Config(out=str(out), delay=0.6))
    ready_at = time.monotonic()
    events.wait("AGENT_READY", "later")
    events.wait("AGENT_TERMINATED", "later")
    assert times(out, "ran")[0] - ready_at >= 0.55
    cancelled = tmp_path / "cancelled"
    orch.register_agent(DEFERRED[mode], "never", DEFERRED[mode].Config(out=str(cancelled), delay=60))
    events.wait("AGENT_READY", "never")
    orch.stop_agent("never")
    assert events.wait("AGENT_TERMINATED", "never", timeout=10)[0]["ok"] is True
    assert not cancelled.exists()


@pytest.mark.parametrize("mode", MODES)
def test_conditional_runs_when_true_and_times_out_with_an_error(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    orch.register_agent(CONDITIONAL[mode], "cond", CONDITIONAL[mode].Config(out=str(out), poll_interval=0.05))
    events.wait("AGENT_READY", "cond")
    time.sleep(0.3)
    assert not out.exists()
    (tmp_path / "out.go").touch()
    assert events.wait("AGENT_TERMINATED", "cond")[0]["ok"] is True
    assert [n[0] for n in notes(out)] == ["ran"]
    never = tmp_path / "never"
    orch.register_agent(CONDITIONAL[mode], "late", CONDITIONAL[mode].Config(out=str(never), poll_interval=0.05,
                                                                             timeout=0.3))
    assert "TimeoutError: condition not met within 0.3 s" in events.wait("AGENT_ERROR", "late")[0]["error_message"]
    assert events.wait("AGENT_TERMINATED", "late")[0]["ok"] is False


@pytest.mark.parametrize("mode", MODES)
def test_triggered_by_the_orchestrator_and_by_a_bus_event(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    orch.register_agent(TRIGGERED[mode], "manual", TRIGGERED[mode].Config(out=str(out)))
    events.wait("AGENT_READY", "manual")
    time.sleep(0.2)
    assert not out.exists(), "nothing runs before the trigger"
    # a message instead of a trigger was taken and ignored (lost, uncounted): refused, saying what to do
    with pytest.raises(ValueError, match=r"use orchestrator.trigger\('manual', payload\)"):
        orch.send("manual", {"job": 6})
    orch.trigger("manual", {"job": 7})
    events.wait("AGENT_TERMINATED", "manual")
    assert notes(out) == [["payload", "{'job':", "7}"]]
    with pytest.raises(TypeError, match="cannot travel"):
        orch.trigger("manual", object())
    bus_out = tmp_path / "bus"
    orch.register_agent(TRIGGERED[mode], "on-event", TRIGGERED[mode].Config(out=str(bus_out),
                                                                             trigger="AGENT_TERMINATED.sentinel"))
    events.wait("AGENT_READY", "on-event")
    time.sleep(0.3)  # let its subscription reach the coordinator
    orch.register_agent(Quick, "sentinel")
    events.wait("AGENT_TERMINATED", "on-event")
    text = bus_out.read_text()
    assert "'event': 'AGENT_TERMINATED'" in text and "'agent_name': 'sentinel'" in text


@pytest.mark.parametrize("mode", MODES)
def test_recovery_retries_with_attempt_numbers_then_succeeds_or_gives_up(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    cls = RECOVERY[mode]
    orch.register_agent(cls, "flaky", cls.Config(out=str(out), max_retries=3, backoff=(0.05, 0.2, 0.0)))
    assert events.wait("AGENT_TERMINATED", "flaky")[0]["ok"] is True
    errors = events.of("AGENT_ERROR", "flaky")
    assert [e["attempt"] for e in errors] == [1, 2] and all(e["recoverable"] for e in errors)
    assert "ConnectionError: try 1 failed" == errors[0]["error_message"]
    hopeless = tmp_path / "hopeless"
    orch.register_agent(cls, "hopeless", cls.Config(out=str(hopeless), succeed_on=-1, max_retries=1,
                                                     backoff=(0.05, 0.1, 0.0)))
    assert events.wait("AGENT_TERMINATED", "hopeless")[0]["ok"] is False
    assert len(notes(hopeless)) == 2
    assert events.of("AGENT_ERROR", "hopeless")[-1]["error_message"] == "ConnectionError: try 2 failed"


@pytest.mark.parametrize("mode", MODES)
def test_event_driven_gets_bus_events_and_sent_messages(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    cls = EVENTDRIVEN[mode]
    orch.register_agent(cls, "listener", cls.Config(out=str(out), subscribe=["AGENT_READY"]))
    events.wait("AGENT_READY", "listener")
    time.sleep(0.3)
    orch.register_agent(Quick, "watched")
    orch.send("listener", {"hello": "world"})
    wait_for(lambda: out.exists() and "MESSAGE" in out.read_text() and "watched" in out.read_text(), 10,
             "both the bus event and the message")
    lines = notes(out)
    assert ["AGENT_READY", "watched", "None"] in lines
    assert ["MESSAGE", "listener", "{'hello':", "'world'}"] in lines
    orch.stop_agent("listener")
    assert events.wait("AGENT_TERMINATED", "listener")[0]["ok"] is True


@pytest.mark.parametrize("mode", MODES)
def test_pool_overlaps_runs_up_to_pool_size(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    cls = POOL[mode]
    orch.register_agent(cls, "pool", cls.Config(out=str(out), pool_size=3, execution_interval=0.05, limit=6))
    assert events.wait("AGENT_TERMINATED", "pool", timeout=20)[0]["ok"] is True
    running, peak = 0, 0
    for word in [n[0] for n in notes(out)]:
        running += 1 if word == "start" else -1
        peak = max(peak, running)
    assert peak == 3 and len(times(out, "end")) == 6


@pytest.mark.parametrize("mode", MODES)
def test_recoverable_exception_keeps_a_periodic_agent_going(daemon, tmp_path, mode):
    orch, events = daemon
    out = tmp_path / "out"
    cls = PERIODIC[mode]
    orch.register_agent(cls, "periodic", cls.Config(out=str(out), execution_interval=0.05, limit=4))
    assert events.wait("AGENT_TERMINATED", "periodic")[0]["ok"] is True
    assert [n[1] for n in notes(out)] == ["1", "2", "3", "4"]
    error = events.of("AGENT_ERROR", "periodic")[0]
    assert error["recoverable"] is True and "a bad reading" in error["error_message"]


@pytest.mark.parametrize("mode, expected", [
    ("process", "ignored stop for 0.5 s and was terminated"),  # killed, then TERMINATED
    ("thread", "cannot be terminated"),  # threads cannot be killed: reported stuck
])
def test_agent_that_ignores_stop_is_reported(daemon, tmp_path, mode, expected):
    orch, events = daemon
    cls = STUBBORN[mode]
    orch.register_agent(cls, "stubborn", cls.Config(out=str(tmp_path / "out"), stop_timeout=0.5))
    events.wait("AGENT_READY", "stubborn")
    # in its cycle: a stop asked between READY and the first cycle is seen before it (a clean end)
    wait_for(lambda: ["stuck"] in notes(tmp_path / "out"), 10, "the agent in its cycle")
    orch.stop_agent("stubborn", timeout=0.5)
    error = events.wait("AGENT_ERROR", "stubborn", timeout=10)[0]
    assert expected in error["error_message"]
    if mode == "process":
        assert events.wait("AGENT_TERMINATED", "stubborn")[0]["ok"] is False
    else:
        assert error["stuck"] is True


def test_a_process_agent_stuck_past_its_stop_timeout_ends_at_the_sigterm(daemon, tmp_path):
    """The worker's SIGTERM past the stop timeout ends it at once, as SIGTERM's default did, though
    a process agent takes a SIGTERM of its own as a stop (worker/child.py): the stop was asked
    already.  Without that, it ran on until the SIGKILL 2 s later."""
    orch, events = daemon
    pid_file = tmp_path / "pid"  # written from inside its cycle (see DeafProcess)
    orch.register_agent(StuckProcess, "stuck", StuckProcess.Config(stop_timeout=0.5, pid_file=str(pid_file)))
    events.wait("AGENT_READY", "stuck")
    wait_for(pid_file.exists, 10, "the agent in its cycle")
    orch.stop_agent("stuck", timeout=0.5)
    error = events.wait("AGENT_ERROR", "stuck", timeout=20)[0]["error_message"]
    assert f"exited with code {128 + signal.SIGTERM}" in error, error


def test_a_process_agent_deaf_to_sigterm_is_killed(cluster, daemon, tmp_path):
    """A process agent that ignores its stop and SIGTERM too is killed (SIGKILL) 2 s after the
    terminate: its stop timeout is a promise, not a request."""
    orch, events = daemon
    pid_file = tmp_path / "pid"
    orch.register_agent(DeafProcess, "deaf", DeafProcess.Config(pid_file=str(pid_file), stop_timeout=0.5))
    events.wait("AGENT_READY", "deaf")
    wait_for(pid_file.exists, 10, "the agent's pid")
    pid = int(pid_file.read_text())
    orch.stop_agent("deaf", timeout=0.5)
    assert events.wait("AGENT_TERMINATED", "deaf", timeout=20)[0]["ok"] is False
    wait_for(lambda: process_gone(pid), 10, "the deaf process to be gone")
    # said once, where it was said at each turn of the loop until the kill (40 lines)
    assert cluster.log_of("w1").count("process agent deaf ignored stop for 0.5 s: terminating it") == 1
