"""A link that fails one way only (a firewall or NAT table that drops one direction): the worker
still hears the coordinator but is not heard, or the other way round.  Either way its agents
must move to the other worker without two copies of one ever running at once, and the cluster
must settle once the link is whole again.  The cut: relay.py holding one way."""

from __future__ import annotations

import os
import signal
import time

import pytest
import relay
from agents import CopyTracer, copy_spans
from conftest import EventLog

from pyorchestrate import RunMode

WAYS = {"the worker unheard": signal.SIGUSR1, "the coordinator unheard": signal.SIGUSR2}


@pytest.mark.parametrize("way", list(WAYS))
def test_a_one_way_cut_moves_the_agents_and_never_leaves_two_copies(cluster, tmp_path, way):
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_liveness=10)
    events = EventLog(orch)
    orch.start()
    cut, address = relay.start(orch.address)
    names = [f"k{i}" for i in range(3)]
    try:
        cluster.worker(address, "w1")
        events.wait("WORKER_JOINED", "w1")
        for name in names:
            orch.register_agent(CopyTracer, name, CopyTracer.Config(trace=str(tmp_path / name), stop_timeout=1.0),
                                restart="always")
            events.wait("AGENT_READY", name)
        cluster.worker(orch.address, "w2")
        events.wait("WORKER_JOINED", "w2")
        cut.send_signal(WAYS[way])
        for name in names:  # moved: a second copy READY, on w2
            assert events.wait("AGENT_READY", name, count=2, timeout=30)[-1]["worker"] == "w2"
        time.sleep(2.0)
        cut.send_signal(signal.SIGHUP)  # whole again
        events.wait("WORKER_JOINED", "w1", count=2, timeout=30)
        time.sleep(2.0)
        for name in names:
            spans = sorted(copy_spans(tmp_path / name).values())
            assert len(spans) == 2, (name, spans)
            (_, first_last, _), (second_first, _, _) = spans
            assert first_last < second_first, f"{name}: two copies ran at once ({first_last} >= {second_first})"
            assert orch.status()["agents"][name]["state"] == "READY"
    finally:
        os.kill(cut.pid, signal.SIGKILL)
        cut.wait(10)
