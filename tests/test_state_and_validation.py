"""State/control events (standalone and remote) and config validation on the coordinator and worker."""

from __future__ import annotations

import os
import time

import pytest
from agents import Quick
from behaviours import HOLDABLE, PickyAgent
from conftest import start_daemon

from pyorchestrate import (BaseThreadAgent, ConfigValidationError, ValidationPolicy, ValidationResult,
                           ValidationSeverity)

MODES = ["thread", "process"]


@pytest.mark.parametrize("mode", MODES)
def test_standalone_state_and_control_events_are_real_in_both_variants(tmp_path, mode):
    out = tmp_path / "out"
    agent = HOLDABLE[mode](config=HOLDABLE[mode].Config(out=str(out)))
    agent.control_events.execute_event.clear()  # hold it after READY
    agent.start()
    try:
        assert agent.state_events.start_event.wait(20)
        assert agent.state_events.ready_event.wait(20)
        time.sleep(0.3)
        assert not out.exists(), "held: the work waits for execute_event"
        agent.control_events.execute_event.set()
        assert agent.state_events.close_event.wait(20)
        assert "work" in out.read_text()
    finally:
        assert agent.join(20)


def test_event_sets_extend_by_nested_subclassing():
    class Saver(BaseThreadAgent):
        class StateEvents(BaseThreadAgent.StateEvents):
            saved_event = None

        def execute(self):
            self.state_events.saved_event.set()

    agent = Saver()
    assert set(agent.state_events.names()) == {"start_event", "ready_event", "close_event", "saved_event"}
    agent.start()
    assert agent.state_events.saved_event.wait(5) and agent.join(5)


@pytest.mark.parametrize("mode", MODES)
def test_remote_agents_held_after_ready_until_execute(cluster, tmp_path, mode):
    orch, events = start_daemon(cluster, ("w1",), hold_after_ready=True)
    outs = [tmp_path / f"out{i}" for i in range(3)]
    for i, out in enumerate(outs):
        orch.register_agent(HOLDABLE[mode], f"held{i}", HOLDABLE[mode].Config(out=str(out)))
    handle = orch.agent("held0")
    assert handle.wait_ready(20) and handle.state == "READY" and handle.worker == "w1"
    assert orch.agent("held1").wait_ready(20) and orch.agent("held2").wait_ready(20)
    time.sleep(0.3)
    assert not any(out.exists() for out in outs), "nothing runs while held"
    handle.execute()
    assert handle.wait_closed(20) and handle.state == "TERMINATED"
    assert outs[0].exists() and not outs[1].exists()
    orch.execute()  # all the others
    for i in (1, 2):
        assert orch.agent(f"held{i}").wait_closed(20)
    with pytest.raises(ValueError, match="unknown agent"):
        orch.agent("ghost")


def test_validation_runs_again_on_the_worker_and_an_error_stops_only_that_agent(cluster, tmp_path):
    orch, events = start_daemon(cluster, ("w1",))
    out = tmp_path / "out"
    orch.register_agent(PickyAgent, "picky", PickyAgent.Config(out=str(out), registered_in=os.getpid()))
    orch.register_agent(Quick, "fine")
    error = events.wait("AGENT_ERROR", "picky")[0]["error_message"]
    assert "not on the machine it was registered on" in error and "a second finding" in error
    assert not events.of("AGENT_READY", "picky") and not out.exists()
    assert events.wait("AGENT_TERMINATED", "fine")[0]["ok"] is True


def test_validation_severities_and_policy():
    class Checked(BaseThreadAgent):
        class Config(BaseThreadAgent.Config):
            level = "warning"

            def validate(self):
                results = super().validate()
                severity = {"warning": ValidationSeverity.WARNING, "error": ValidationSeverity.ERROR,
                            "critical": ValidationSeverity.CRITICAL}.get(self.level)
                if severity:
                    results.append(ValidationResult("level", f"a {self.level}", severity))
                return results

        def execute(self):
            pass

    from pyorchestrate import Orchestrator

    orch = Orchestrator("v")
    orch.register_agent(Checked, "warned", Checked.Config(level="warning"))  # logged, registered
    with pytest.raises(ConfigValidationError, match="a error"):
        orch.register_agent(Checked, "errored", Checked.Config(level="error"))
    lenient = ValidationPolicy(ignore_errors=True)
    orch.register_agent(Checked, "let-through", Checked.Config(level="error", validation_policy=lenient))
    with pytest.raises(ConfigValidationError, match="a critical"):
        orch.register_agent(Checked, "critical", Checked.Config(level="critical", validation_policy=lenient))
    quiet = Checked.Config(level="warning", validation_policy=ValidationPolicy(ignore_warnings=True))
    assert quiet.check("x") == []
    assert [r.severity for r in Checked.Config(level="warning").check("x")] == [ValidationSeverity.WARNING]
    assert "errored" not in orch.status()["agents"] and "let-through" in orch.status()["agents"]
