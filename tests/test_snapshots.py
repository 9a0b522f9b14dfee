"""The status snapshot: captured on the loop, expanded in the caller's thread (pure tier)."""

from pyorchestrate import commands, snapshots
from test_core import Harness

ROW_KEYS = {"name", "state", "worker", "restarts", "last_error", "failed", "started_at", "epoch", "run",
            "pending_reason", "restart", "on_disconnect", "depends_on"}


def test_the_snapshot_is_the_state_at_capture_time_whatever_changes_before_it_is_expanded():
    h = Harness()
    h.register("w1")
    h.add("a")
    h.add("b", depends_on=["a"])
    h.step(0.01)
    captured = h.core.command(commands.Snapshot(), h.now)
    assert "agents" not in captured  # the loop only captured
    record = h.core.agents["b"]
    before = record.state.value
    record.depends_on = ["a", "x"]  # the core replaces lists, never changes them in place
    h.core.states.move(record, type(record.state).TERMINATED)
    status = snapshots.expand(captured)
    assert set(status["agents"]) == {"a", "b"}
    row = status["agents"]["b"]
    assert set(row) == ROW_KEYS
    assert row["state"] == before != "TERMINATED"
    assert row["depends_on"] == ["a"]
    assert status["agents"]["a"]["worker"] == "w1"
    assert status["workers"]["w1"]["agents"] == sorted(status["workers"]["w1"]["agents"])
    assert snapshots.expand(status) is status  # already plain data


def test_expanded_rows_belong_to_the_caller():
    h = Harness()
    h.register("w1")
    h.add("a")
    h.step(0.01)
    one = snapshots.expand(h.core.command(commands.Snapshot(), h.now))
    one["agents"]["a"]["depends_on"].append("mine")
    two = snapshots.expand(h.core.command(commands.Snapshot(), h.now))
    assert two["agents"]["a"]["depends_on"] == [] and h.core.agents["a"].depends_on == []
