"""A worker behind a narrow link (relay.py carrying 1 MB/s each way).  Everything the coordinator
sends a worker crosses one connection in order, lease echoes too, and the same goes for what the
worker sends back and its heartbeats.  Before flow control (pyorchestrate/flow.py), a burst filled
the sockets' buffers with seconds' worth of bytes and the lease waited behind them: 4 MB of starts
over 1 MB/s with a 2 s window and the worker's lease ran out, it registered again, the burst was
sent again, and so on for ever (59 registrations in 2 minutes, most agents never ran); 100
failures with long tracebacks the other way, and the worker registered again, and 57 of the 100
errors were lost with the old connection."""

from __future__ import annotations

import os
import signal
import time

import pytest
import relay
from agents import Ballast, DeepBoom, Forever, MessageSizes
from conftest import EventLog, wait_for

from pyorchestrate import RunMode

MB = 1_000_000


@pytest.fixture
def narrow(cluster):
    """A started coordinator with a 2 s window, and worker w1 joined through a 1 MB/s link."""
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_interval=0.4, heartbeat_liveness=5)
    events = EventLog(orch)
    orch.start()
    link, address = relay.start(orch.address, rate=1 * MB)
    try:
        cluster.worker(address, "w1")
        events.wait("WORKER_JOINED", "w1", timeout=30)
        yield orch, events
    finally:
        os.kill(link.pid, signal.SIGKILL)
        link.wait(10)


def test_a_burst_of_starts_over_a_narrow_link_keeps_the_lease(cluster, narrow):
    orch, events = narrow
    for i in range(100):  # 4 MB of starts: four seconds of the link
        orch.register_agent(Ballast, f"b{i}", Ballast.Config(ballast=f"{i:05d}" * 8000))
    events.wait("AGENT_READY", timeout=90, count=100)
    time.sleep(2.0)
    assert not events.of("WORKER_LOST"), cluster.log_of("w1")[-3000:]
    assert len(events.of("WORKER_JOINED")) == 1
    assert "registering again" not in cluster.log_of("w1")
    assert {a["state"] for a in orch.status()["agents"].values()} == {"READY"}


def test_a_burst_of_reports_over_a_narrow_link_keeps_the_lease_and_loses_none(cluster, narrow):
    orch, events = narrow
    for i in range(100):  # about 4 MB of error reports: four seconds of the link
        orch.register_agent(DeepBoom, f"d{i}")
    events.wait("AGENT_TERMINATED", timeout=90, count=100)
    time.sleep(1.0)
    assert len(events.of("AGENT_ERROR")) == 100
    assert all("x" * 1000 in e["error_message"] for e in events.of("AGENT_ERROR"))
    assert not events.of("WORKER_LOST") and len(events.of("WORKER_JOINED")) == 1
    assert "registering again" not in cluster.log_of("w1")


def test_a_payload_longer_than_the_window_to_cross_arrives_and_the_lease_holds(cluster, narrow, tmp_path):
    """8 MiB take 8 s of the link, four windows: it crosses in parts, and the echoes pass between
    them (before, the worker's lease ran out behind it, it registered again, and the message was
    lost with the old connection)."""
    orch, events = narrow
    trace = tmp_path / "sizes"
    orch.register_agent(MessageSizes, "m", MessageSizes.Config(trace=str(trace)))
    events.wait("AGENT_READY", "m", timeout=30)
    orch.send("m", bytes(8 * 2**20))
    orch.send("m", b"after")
    wait_for(lambda: trace.exists() and trace.read_text().count("size") == 2, 60, "both messages handled")
    assert trace.read_text().split("\n")[:2] == [f"size {8 * 2**20}", "size 5"]
    assert not events.of("WORKER_LOST") and len(events.of("WORKER_JOINED")) == 1
    assert "registering again" not in cluster.log_of("w1")


@pytest.fixture
def long_copies(cluster):
    """A coordinator with a 5 s window, worker w1 joined through a link that then narrows to
    50 kB/s, and 100 copies with 3,000-character names running there: a register of 300 kB, 6 s
    of the link (its list of copies makes it long)."""
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_interval=1.0, heartbeat_liveness=5)
    events = EventLog(orch)
    orch.start()
    link, address = relay.start(orch.address, rate=50_000, narrow_later=True)
    try:
        cluster.worker(address, "w1")
        events.wait("WORKER_JOINED", "w1", timeout=30)
        names = [f"{i:03d}" + "f" * 3000 for i in range(100)]
        for name in names:
            orch.register_agent(Forever, name, on_disconnect="keep")
        events.wait("AGENT_READY", timeout=60, count=100)
        os.kill(link.pid, signal.SIGWINCH)  # the link narrows to 50 kB/s
        yield orch, events, link, names
    finally:
        os.kill(link.pid, signal.SIGCONT)
        os.kill(link.pid, signal.SIGKILL)
        link.wait(10)


@pytest.fixture
def long_register(long_copies):
    """The same, the link cut until the worker's lease has run out; the test lets it go again."""
    orch, events, link, names = long_copies
    os.kill(link.pid, signal.SIGSTOP)
    events.wait("WORKER_LOST", "w1", timeout=30)
    return long_copies


def _back_for_good(cluster, orch, events, names):
    wait_for(lambda: len(events.of("AGENT_ADOPTED")) == 100, 30, "every copy taken back")
    time.sleep(6.0)  # (a window more: the lease holds)
    log = cluster.log_of("w1")
    assert log.count("registered with coordinator") == 2 and log.count("registering again") == 1, log[-3000:]
    assert len(events.of("WORKER_LOST")) == 1 and len(events.of("WORKER_JOINED")) == 2
    assert {a["state"] for a in orch.status()["agents"].values()} == {"READY"}
    assert set(orch.status()["agents"]) == set(names)


def test_a_register_longer_than_the_window_to_cross_gets_its_welcome(cluster, long_register):
    """The worker waited 2 s for its welcome whatever its register's size, gave up, and sent it
    again on a new connection, for ever: after the cut it never got back (each try took 2-5 s,
    as the earlier tries' bytes went first).  Then, welcomed, its lease had run out as the welcome
    came (it counts from the register's stamp), and it registered again at once."""
    orch, events, link, names = long_register
    os.kill(link.pid, signal.SIGCONT)
    wait_for(lambda: cluster.log_of("w1").count("registered with coordinator") == 2, 60, "w1 welcomed again")
    _back_for_good(cluster, orch, events, names)


def test_a_long_register_lost_with_its_connection_is_sent_again_at_once(cluster, long_register):
    """The worker now waits as long as its register may take to cross (11 s more here); a
    connection that closes meanwhile lost it, and it goes again at once, not after that wait."""
    orch, events, link, names = long_register
    os.kill(link.pid, signal.SIGCONT)
    wait_for(lambda: cluster.log_of("w1").count("registering again") == 1, 30, "w1 registering")
    time.sleep(1.5)  # the register is on its way
    os.kill(link.pid, signal.SIGQUIT)  # the link resets its connections
    reset = time.monotonic()
    wait_for(lambda: cluster.log_of("w1").count("registered with coordinator") == 2, 60, "w1 welcomed again")
    # (6 s to cross again; waiting out the first register's time, it came after 18 s or more)
    assert time.monotonic() - reset < 15.0
    assert "closed before its welcome came" in cluster.log_of("w1")
    _back_for_good(cluster, orch, events, names)


def test_a_worker_resyncing_with_a_long_register_is_not_taken_for_dead(cluster, long_copies):
    """Frames lost with a connection that reset: the worker registers again on a new connection,
    with a register of 300 kB (6 s of a 50 kB/s link, a 5 s window), and its heartbeats there wait
    behind it.  It was declared lost, alive as it was (WORKER_LOST, then WORKER_JOINED 6.6 s
    later).  It now keeps the old connection for heartbeats until the new one is welcomed."""
    orch, events, link, names = long_copies
    time.sleep(1.0)
    for i in range(30):  # 90 kB of starts: on their way as the link resets
        orch.register_agent(Forever, f"late{i:02d}" + "g" * 3000)
    time.sleep(0.5)
    os.kill(link.pid, signal.SIGQUIT)
    wait_for(lambda: "from the coordinator were lost: registering again" in cluster.log_of("w1"), 30,
             "the worker noticing the lost frames")
    wait_for(lambda: cluster.log_of("w1").count("registered with coordinator") == 2, 60, "w1 welcomed again")
    events.wait("AGENT_READY", timeout=60, count=130)
    time.sleep(6.0)  # (a window more)
    assert not events.of("WORKER_LOST") and len(events.of("WORKER_JOINED")) == 1, cluster.log_of("w1")[-3000:]
    assert cluster.log_of("w1").count("registering again") == 1
    assert {a["state"] for a in orch.status()["agents"].values()} == {"READY"}
