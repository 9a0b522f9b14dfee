"""A worker far from its coordinator (a long round trip: another continent, a satellite) through
relay.py delaying each way.  Before, the worker stamped its register before its connection's
ZeroMQ handshake (a few round trips), and the first fresh echo came a round trip after the
welcome: at 200 ms each way and a 1 s window the lease it got had run out at once, and it
registered again for ever; at 600 ms each way its registration timed out (2 s) before the
handshake was done, and it never joined, whatever the window."""

from __future__ import annotations

import os
import signal
import time

import pytest
import relay
from agents import Forever
from conftest import EventLog, wait_for

from pyorchestrate import RunMode


@pytest.mark.parametrize("delay, liveness", [(0.2, 10), (0.6, 30)])  # windows of 1 s and 3 s (0.1 s beats)
def test_a_worker_over_a_long_link_joins_once_and_keeps_its_agents(cluster, delay, liveness):
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_liveness=liveness)
    events = EventLog(orch)
    orch.start()
    link, address = relay.start(orch.address, delay)
    try:
        cluster.worker(address, "w1")
        events.wait("WORKER_JOINED", "w1", timeout=30)
        for i in range(3):
            orch.register_agent(Forever, f"f{i}")
        for i in range(3):
            events.wait("AGENT_READY", f"f{i}", timeout=30)
        time.sleep(5.0)
        assert not events.of("WORKER_LOST") and len(events.of("WORKER_JOINED")) == 1
        assert "registering again" not in cluster.log_of("w1")
        assert {a["state"] for a in orch.status()["agents"].values()} == {"READY"}
    finally:
        os.kill(link.pid, signal.SIGKILL)
        link.wait(10)


def test_a_round_trip_longer_than_the_window_is_said(cluster):
    """It cannot hold a lease (600 ms each way, a 1 s window): say why, not only "silent"."""
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_liveness=10)
    orch.start()
    link, address = relay.start(orch.address, 0.6)
    try:
        cluster.worker(address, "w1")
        wait_for(lambda: "longer than its heartbeat window (1.0 s" in cluster.log_of("w1"), 30, "the worker saying why")
        # it registers again meanwhile (each attempt 4-5 s here: after the welcome it waits a heartbeat
        # interval and 2 s more for an echo that renews its lease, which here never comes in time)
        wait_for(lambda: cluster.log_of("w1").count("registering again") >= 2, 30, "two more attempts")
        assert cluster.log_of("w1").count("longer than its heartbeat window") == 1  # once, not at each attempt
    finally:
        os.kill(link.pid, signal.SIGKILL)
        link.wait(10)
