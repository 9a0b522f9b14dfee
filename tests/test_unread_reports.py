"""Reports a worker sent on a connection that the coordinator never read: they go again with
the worker's next register, and each is said once.

Seen beside 4 CPU burners: 100 agents failing at once behind a 1 MB/s link, the worker's lease
ran out and it registered again on a new connection; the errors still on the old one were read
after the register, when that connection was no longer the worker's, and 14 of the 100 were lost
(their ends came, repeated in the register: the coordinator said TERMINATED without the ERROR).
The reproduction here is exact: what goes to the coordinator is held on the link, the agents fail,
and the link resets, losing what it held (relay.py)."""

from __future__ import annotations

import os
import signal

import relay
from agents import BoomLater
from conftest import EventLog, wait_for

from pyorchestrate import RunMode


LIFECYCLE = {"AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"}


def _waiting_at(address: str) -> int:
    """Bytes received and not yet read on the connections to ``address``'s port (the relay's
    side: what it holds), from /proc/net/tcp."""
    port = int(address.rsplit(":", 1)[1])
    waiting = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                waiting += int(fields[4].split(":")[1], 16)
    return waiting


def test_errors_lost_with_a_reset_link_come_again_with_the_register_once_each_and_in_order(cluster):
    # a 30 s window: nothing is heard from the worker while the link holds its way (a one-way
    # cut), and beside 4 CPU burners that lasted past a 10 s window once (the worker was, rightly,
    # declared lost); with only 10 agents it runs no pulse process to vouch for it
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_interval=1.0, heartbeat_liveness=30)
    events = EventLog(orch)
    orch.start()
    link, address = relay.start(orch.address)
    try:
        cluster.worker(address, "w1")
        events.wait("WORKER_JOINED", "w1", timeout=30)
        names = [f"b{i}" for i in range(10)]
        for name in names:
            orch.register_agent(BoomLater, name, BoomLater.Config(seconds=2.0, size=2000))
        events.wait("AGENT_READY", timeout=30, count=len(names))
        os.kill(link.pid, signal.SIGUSR1)  # what goes to the coordinator waits on the link
        wait_for(lambda: cluster.log_of("w1").count("failed: ValueError") == len(names), 30, "every agent failed")
        # their reports are sent, and wait on the link (10 errors of 2 kB: within a connection's
        # first credit, flow.py, so none waits in the worker)
        wait_for(lambda: _waiting_at(address) >= 20_000, 30, "the reports on the link")
        assert not events.of("AGENT_ERROR")  # (held: the coordinator has read none of them)
        os.kill(link.pid, signal.SIGQUIT)  # the link resets: what it held is lost
        # (only then let it flow: both at once, the relay ran SIGHUP's handler first, by signal
        # number, and what it held went through before the reset.  The worker may have connected
        # again meanwhile: its greeting waits on the held link, and nothing more can until the
        # handshake is done)
        wait_for(lambda: _waiting_at(address) < 1_000, 10, "the link reset")
        os.kill(link.pid, signal.SIGHUP)
        events.wait("AGENT_TERMINATED", timeout=30, count=len(names))
        wait_for(lambda: len(events.of("AGENT_ERROR")) >= len(names), 10, "every error")
        for name in names:
            said = [e["event"] for e in events.events if e.get("agent_name") == name and e["event"] in LIFECYCLE]
            assert said == ["AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"], (name, said)
            assert "boom, later" in events.of("AGENT_ERROR", name)[0]["error_message"]
        assert not events.of("WORKER_LOST")
    finally:
        os.kill(link.pid, signal.SIGKILL)
        link.wait(10)
