"""Plugins: order, failure isolation, custom plugins, orchestrator plugins, and the ZeroMQ
communication plugins between agents on two different workers."""

from __future__ import annotations

import pytest
from behaviours import HOOKED, Listener, Recorder, Speaker
from conftest import free_port, start_daemon

import pyorchestrate as po

MODES = ["thread", "process"]


def lines(path):
    return [" ".join(line.split()[1:]) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("explode", [False, True])
def test_plugin_order_and_failure_isolation_on_a_worker(cluster, tmp_path, mode, explode):
    orch, events = start_daemon(cluster, ("w1",))
    out = tmp_path / "out"
    cls = HOOKED[mode]
    orch.register_agent(cls, "hooked", cls.Config(out=str(out), explode=explode))
    terminated = events.wait("AGENT_TERMINATED", "hooked")[0]
    got = lines(out)
    # (a class shipped by value may not keep its attributes' declaration order, hence the set)
    assert set(got[3].split()[1:]) == {"first", "broken", "last"}
    assert got[:3] == ["init first", "init last", "setup"] and got[4:] == ["on_close", "final last", "final first"], \
        "plugins initialized before setup, finalized after on_close (last first), even on error"
    plugin_error = [e for e in events.of("AGENT_ERROR", "hooked") if e.get("plugin")][0]
    assert plugin_error["plugin"] == "broken" and plugin_error["recoverable"] is True
    assert "OSError: broken cannot start" in plugin_error["error_message"]
    assert terminated["ok"] is (not explode), "a failing plugin alone does not fail the agent"


def test_custom_plugin_replaces_the_defaults(cluster, tmp_path):
    orch, events = start_daemon(cluster, ("w1",))
    out = tmp_path / "out"

    class Only(po.Plugins):
        solo = Recorder("solo")

    cls = HOOKED["thread"]
    orch.register_agent(cls, "custom", cls.Config(out=str(out)), custom_plugin=Only)
    events.wait("AGENT_TERMINATED", "custom")
    assert lines(out) == ["init solo", "setup", "execute solo", "on_close", "final solo"]
    with pytest.raises(TypeError, match="custom_plugin"):
        orch.register_agent(cls, "wrong", cls.Config(out=str(out)), custom_plugin=42)


def test_orchestrator_plugins_initialize_at_start_and_finalize_at_shutdown():
    calls = []

    class Probe(po.PluginBase):
        def initialize(self):
            calls.append(("init", self.owner.name))

        def finalize(self):
            calls.append(("final", self.owner.name))

    class Watched(po.Orchestrator):
        class Plugin(po.Orchestrator.Plugin):
            probe = Probe()

    orch = Watched("watched", local_workers=0, min_workers=0)
    orch.start()
    assert calls == [("init", "watched")]
    orch.join(timeout=10)
    assert calls == [("init", "watched"), ("final", "watched")]


def test_zmq_pubsub_and_reqrep_between_agents_on_two_workers(cluster, tmp_path):
    orch, events = start_daemon(cluster, ("w1",), ("w2",), min_workers=2)
    pub, rep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"

    class ListenerPlugins(po.Plugins):
        feed = po.ZmqPubSub(pub, role="sub", topics=["news"], bind=False)
        answers = po.ZmqReqRep(rep, role="rep")

    listener_out, speaker_out = tmp_path / "listener", tmp_path / "speaker"
    orch.register_agent(Listener, "listener", Listener.Config(out=str(listener_out)), worker="w2",
                        custom_plugin=ListenerPlugins)
    events.wait("AGENT_READY", "listener")
    orch.register_agent(Speaker, "speaker", Speaker.Config(out=str(speaker_out), pub=pub, rep=rep), worker="w1")
    assert events.wait("AGENT_TERMINATED", "speaker", timeout=30)[0]["ok"] is True
    assert events.wait("AGENT_TERMINATED", "listener", timeout=30)[0]["ok"] is True
    assert lines(speaker_out) == ["answer 42 1"]
    assert events.of("AGENT_STARTED", "speaker")[0]["worker"] != events.of("AGENT_STARTED", "listener")[0]["worker"]


def test_reqrep_times_out_and_recovers():
    req = po.ZmqReqRep(f"tcp://127.0.0.1:{free_port()}", role="req", timeout=0.2)
    req.initialize()
    try:
        with pytest.raises(TimeoutError, match="no reply"):
            req.request({"x": 1})
        with pytest.raises(TimeoutError):  # the socket was reset: a second request is allowed
            req.request({"x": 2})
        with pytest.raises(TypeError, match="cannot send"):
            req.request(object())
    finally:
        req.finalize()
