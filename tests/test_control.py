"""The control port's rules and answers, without sockets (pyorchestrate.control)."""

from __future__ import annotations

import msgpack
import pytest

from pyorchestrate import commands as cmd
from pyorchestrate import control, protocol
from pyorchestrate.control import Refused


def test_roles_reader_may_query_admin_may_act_no_keys_may_both():
    assert control.check("status", {}, "reader") == {}
    assert control.check("agents", {}, "admin") == {"state": None, "worker": None, "limit": 0}
    assert control.check("stop", {"agent": "a"}, None) == {"agent": "a", "timeout": 10.0}
    with pytest.raises(Refused, match="'stop' needs an admin key; this client connected with a reader key"):
        control.check("stop", {"agent": "a"}, "reader")
    with pytest.raises(Refused, match="needs a reader or admin key; this client connected with a worker key"):
        control.check("status", {}, "worker")
    with pytest.raises(Refused, match="needs an admin key"):
        control.check("shutdown", {}, "worker")


def test_arguments_are_checked_and_said_wrong():
    with pytest.raises(Refused, match="unknown request 'reboot'"):
        control.check("reboot", {}, None)
    with pytest.raises(Refused, match="'stop' takes no argument 'force'"):
        control.check("stop", {"agent": "a", "force": True}, None)
    with pytest.raises(Refused, match="missing field 'agent'"):
        control.check("stop", {}, None)
    with pytest.raises(Refused, match="'agent' has type int"):
        control.check("stop", {"agent": 5}, None)
    with pytest.raises(Refused, match="timeout must be between 0 and 3600"):
        control.check("restart", {"agent": "a", "timeout": 1e9}, None)


def test_actions_become_core_commands():
    assert control.command("stop", {"agent": "a", "timeout": 2.0}) == [cmd.StopAgent("a", 2.0)]
    assert control.command("drain", {"worker": "w"}) == [cmd.DrainWorker("w")]
    # like Orchestrator.stop(): the run ends (the script's join() returns) once all have stopped
    assert control.command("shutdown", {"timeout": 1.0}) == [cmd.RequestStop(), cmd.StopAll(1.0)]


def _captured():
    """Rows as the loop captures them (snapshots.capture_agents), and the rest of a snapshot."""
    from types import SimpleNamespace

    from pyorchestrate.restart import RestartPolicy
    from pyorchestrate.snapshots import capture_agents
    from pyorchestrate.states import AgentState as S

    def record(name, state, worker=None, restarts=0, error=None, started_at=None):
        return SimpleNamespace(name=name, state=state, worker=worker, restarts=restarts, error=error,
                               failed=error is not None, started_at=started_at, epoch=1, run="r", pending_reason="",
                               policy=RestartPolicy.build("never", 10, (0.5, 30.0)), on_disconnect=None, depends_on=[])

    rows = capture_agents([record("b", S.READY, "w1", 2, started_at=100.0), record("a", S.TERMINATED, "w2", 0, "ValueError: x"),
                           record("c", S.PENDING)])
    snapshot = {"workers": {"w1": {"name": "w1", "host": "h", "pid": 1, "labels": {}, "capacity": 0, "alive": True,
                                   "draining": False, "agents": ["b"], "running": 1, "since_heartbeat": 0.2,
                                   "dropped": {"deliver_to_unknown_agent": 4, "bad_frame": 1}},
                            "w2": {"name": "w2", "host": "h", "pid": 2, "labels": {}, "capacity": 3, "alive": False,
                                   "draining": False, "agents": [], "running": 0, "since_heartbeat": 9.0,
                                   "dropped": {"bad_frame": 2}}},
                "lost_events": 3, "dropped": {"bad_frame": 1}, "addresses": {}, "security": {}}
    return rows, snapshot


def test_views_of_a_snapshot():
    from pyorchestrate.snapshots import expand_agents

    rows, snap = _captured()
    listed = control.agents(expand_agents(control.pick(rows, {})), now_wall=130.0)
    assert [r["name"] for r in listed] == ["a", "b", "c"] and listed[1]["uptime"] == 30.0 and listed[0]["uptime"] is None
    assert [r[0] for r in control.pick(rows, {"state": "ready"})] == ["b"]
    assert [r[0] for r in control.pick(rows, {"worker": "w2"})] == ["a"]
    assert [r[0] for r in control.pick(rows, {"limit": 2})] == ["a", "b"]  # errors first, then by name
    assert [(w["name"], w["state"]) for w in control.workers(snap)] == [("w1", "alive"), ("w2", "gone")]
    s = control.status(rows, snap, {"coordinator": "c"})
    assert s["agents"]["by_state"] == {"PENDING": 1, "READY": 1, "TERMINATED": 1} and s["agents"]["restarts"] == 2
    assert s["workers"]["by_state"] == {"alive": 1, "gone": 1} and s["lost_events"] == 3
    assert s["agents"]["with_errors"] == [{"name": "a", "state": "TERMINATED", "last_error": "ValueError: x"}]
    # what workers dropped (their heartbeats say it): per worker, and in all beside the coordinator's own
    assert [w["dropped"] for w in control.workers(snap)] == [{"deliver_to_unknown_agent": 4, "bad_frame": 1},
                                                              {"bad_frame": 2}]
    assert s["dropped"] == {"bad_frame": 1}
    assert s["workers"]["dropped"] == {"bad_frame": 3, "deliver_to_unknown_agent": 4}


def _event(seq, event, subject, time_):
    topic = protocol.event_topic(event, subject)
    body = msgpack.packb({"event": event, "seq": seq, "publisher": "p", "incarnation": "i", "event_date": "2026-11-30",
                          "event_time": time_, "agent_name": subject})
    return seq, topic, body


def _published(seq, agent, topic):
    """An AGENT_EVENT: its bus topic names what ``agent`` published about, not the agent."""
    seq, _, body = _event(seq, "AGENT_EVENT", agent, "10:00:04.000000")
    return seq, protocol.event_topic("AGENT_EVENT", topic), body


def test_history_filters_by_agent_and_time_and_keeps_the_latest():
    items = [_event(1, "AGENT_STARTED", "a", "10:00:00.000000"), _event(2, "AGENT_HEARTBEAT", "a", "10:00:01.0"),
             _event(3, "AGENT_STARTED", "ab", "10:00:02.000000"), _event(4, "AGENT_READY", "a", "10:00:03.500000"),
             _event(5, "AGENT_TERMINATED", "a", "10:00:05.000000"), _event(6, "AGENT_STARTED", "x.a", "10:00:06.0"),
             _published(7, "a", "temperature"), _published(8, "x", "a")]
    rows = control.history(items, {"agent": "a", "since": None, "limit": 1000}, protocol.decode_body)
    # not "ab" or "x.a", no heartbeats, its own events whatever their topic (not another's
    # about "a"), oldest first; `history --agent a` showed 6 and 8, and not 7
    assert [r["seq"] for r in rows] == [1, 4, 5, 7]
    latest = control.history(items, {"agent": "a", "since": None, "limit": 2}, protocol.decode_body)
    assert [r["seq"] for r in latest] == [5, 7]
    since = control._event_wall({"event_date": "2026-11-30", "event_time": "10:00:03.000000"})
    assert [r["seq"] for r in control.history(items[:5], {"agent": None, "since": since, "limit": 10},
                                              protocol.decode_body)] == [4, 5]


def test_history_of_one_agent_decodes_no_other_agents_published_events():
    """Another agent's AGENT_EVENTs (their topic names what was published about, not who) are
    passed over without being decoded: each was, 0.19 s of the loop for 100,000 held."""
    items = [_published(seq, "busy", "reading") for seq in range(1, 1001)]
    items += [_published(1001, "quiet", "reading"), _published(1002, "quietly", "reading")]
    decoded = []

    def decode(topic, body):
        decoded.append(topic)
        return protocol.decode_body(topic, body)

    rows = control.history(items, {"agent": "quiet", "since": None, "limit": 1000}, decode)
    assert [r["seq"] for r in rows] == [1001]
    assert len(decoded) == 2  # its own, and "quietly"'s (its name holds "quiet": decoded, then left out)


def test_tables_without_rich_are_aligned_text(monkeypatch, capsys):
    from pyorchestrate import tables

    monkeypatch.setattr(tables, "rich", None)
    tables.show(tables.build("agents", ["NAME", "STATE"], [["alpha", "READY"], ["b", None]]), "a line")
    assert capsys.readouterr().out.splitlines() == ["agents", "NAME   STATE", "alpha  READY", "b", "a line"]
    assert [tables.duration(s) for s in (None, 3.21, 245, 7380, 97200)] == ["-", "3.2s", "4m05s", "2h03m", "1d03h"]
    assert tables.short("a\nb  c" + "x" * 100, 10) == "a b cxxxx…"  # one line, cut with an ellipsis


def test_status_says_when_the_coordinator_nears_its_open_files_limit() -> None:
    from pyorchestrate.cli_control import _open_files

    assert _open_files(None) == ""  # a system that does not tell
    assert _open_files({"open": 35, "limit": 1024}) == "  files 35 of 1024"
    assert _open_files({"open": 35, "limit": -1}) == "  files 35 of unlimited"
    near = _open_files({"open": 900, "limit": 1024})
    assert near.startswith("  files 900 of 1024") and "new connections will be refused" in near
