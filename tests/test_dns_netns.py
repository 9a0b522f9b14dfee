"""Multi-host tier: a worker that knows its coordinator by a host name, in a namespace whose DNS
server (``fake_dns.py``, in its own namespace) goes silent.

libzmq resolves a ``tcp://NAME:PORT`` in its I/O thread, at every connect and reconnect, and that
thread carries every socket of the context: measured here, one reconnect of one socket while
DNS was silent held every other socket of the process for the resolver's whole timeout (10 s with
glibc's defaults).  For a worker that is a silent control connection, and so a false death, from
nothing more than a DNS outage and one connection that dropped.

Needs root and ``ip netns`` (skips otherwise); every address is inside the test's namespaces, and
their ``/etc/netns/<namespace>`` directories are removed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import live_children, wait_for
from test_partition_netns import TESTS, Net, _of, _spans, net  # noqa: F401  (net: the fixture)

SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from agents import CopyTracer
from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

out = open({events!r}, "a", buffering=1)
say = lambda **f: print(json.dumps({{k: f.get(k) for k in ("event", "agent_name", "worker")}}), file=out)
o = Orchestrator("named", address={address!r}, insecure=True, run_mode=RunMode.DAEMON, min_workers=1,
                 heartbeat_interval=0.2, heartbeat_liveness=5)
for event in OrchestratorEvent:
    if event.value not in ("AGENT_LOG", "AGENT_HEARTBEAT"):
        o.register_event(event, say)
o.register_agent(CopyTracer, "a", CopyTracer.Config(trace={trace!r}, stop_timeout=1.0), restart="always",
                 restart_backoff=(0.2, 1.0))
o.start()
while True:
    time.sleep(0.1)
"""

NAME = "coordinator.pyorchestrate.test"


def _resolv_conf(net: Net, host: str, nameserver: str) -> None:
    """``ip netns exec`` puts /etc/netns/<namespace>/resolv.conf over /etc/resolv.conf.  A 2 s
    timeout and 2 attempts: one resolution waits 4 s while the server is silent (4 windows)."""
    directory = Path("/etc/netns") / net.hosts[host][0]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:2 attempts:2\n")


@pytest.fixture
def dns_net(net):
    """``net`` whose namespaces' /etc/netns directories are removed after the test."""
    try:
        yield net
    finally:
        for ns, _, _ in net.hosts.values():
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


class Named:
    """A coordinator (host c) running SCRIPT, a DNS server (host d) that names it, and a worker
    (host w1) that knows it only by that name."""

    def __init__(self, net: Net, tmp_path: Path, port: int) -> None:
        self.net, self.tmp_path, self.port = net, tmp_path, port
        self.events, self.trace = tmp_path / "events.jsonl", tmp_path / "copies.txt"
        ready = tmp_path / "dns" / "ready"
        ready.parent.mkdir()
        self.silent, self.names = ready.parent / "silent", ready.parent / "names"
        coordinator, _, dns = net.host("c"), net.host("w1"), net.host("d")
        self.name(coordinator)
        net.spawn("d", [sys.executable, os.path.join(TESTS, "fake_dns.py"), "--bind", dns, "--ready", str(ready)],
                  tmp_path / "dns.log")
        wait_for(ready.exists, 30, "the DNS server to listen")
        _resolv_conf(net, "w1", dns)
        self.coordinator = self.start_coordinator("c")
        net.spawn("w1", [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", f"tcp://{NAME}:{port}",
                         "--name", "w1"], tmp_path / "w1.log")

    def name(self, address: str) -> None:
        """What DNS answers for NAME from now on."""
        self.names.write_text(f"{NAME}={address}\n")

    def start_coordinator(self, host: str):
        script = self.tmp_path / f"coordinator-{host}.py"
        script.write_text(SCRIPT.format(tests=TESTS, events=str(self.events), trace=str(self.trace),
                                        address=f"tcp://{self.net.hosts[host][2]}:{self.port}"))
        return self.net.spawn(host, [sys.executable, str(script)], self.tmp_path / f"coordinator-{host}.log")

    def of(self, event: str) -> list[dict]:
        return _of(self.events, event)

    def worker_log(self) -> str:
        return (self.tmp_path / "w1.log").read_text()


@pytest.mark.timeout(180)
def test_a_worker_that_knows_its_coordinator_by_name_outlives_a_dns_outage(tmp_path, dns_net):
    """DNS goes silent, then the connection to the coordinator's pulse drops (its process is
    killed: the port now refuses, and libzmq reconnects every 100 ms).  The worker's control
    connection must go on: no WORKER_LOST, its agent runs on as one copy."""
    named = Named(dns_net, tmp_path, 25620)
    wait_for(lambda: named.of("AGENT_READY"), 60, "a to be READY")
    pulse = wait_for(lambda: [p for p in live_children(named.coordinator.pid)
                              if b"coordinator_pulse" in Path(f"/proc/{p}/cmdline").read_bytes()], 10,
                     "the coordinator's pulse process")[0]
    time.sleep(0.5)
    named.silent.touch()
    os.kill(pulse, signal.SIGKILL)
    time.sleep(8.0)  # two of the resolver's timeouts

    log = named.worker_log()
    assert not named.of("WORKER_LOST"), f"a false death; the worker said:\n{log[-3000:]}"
    assert "lease ran out" not in log, log[-3000:]
    spans = _spans(named.trace)
    assert len(spans) == 1, f"the agent ran {len(spans)} copies: {spans}"
    assert spans[0][1] > time.time() - 1.0, "the agent runs on"
    assert " answered" in (tmp_path / "dns.log").read_text(), "the worker found its coordinator through DNS"


@pytest.mark.timeout(180)
def test_a_coordinator_restarted_during_a_dns_outage_is_found_at_its_last_address(tmp_path, dns_net):
    """DNS goes silent and the coordinator is killed and started again at the same address: the
    worker registers with it (libzmq alone would wait for DNS, 4 s a try, and never connect)."""
    named = Named(dns_net, tmp_path, 25630)
    wait_for(lambda: named.of("AGENT_READY"), 60, "a to be READY")
    named.silent.touch()
    os.killpg(named.coordinator.pid, signal.SIGKILL)
    named.coordinator.wait(10)
    time.sleep(1.0)
    named.start_coordinator("c")
    wait_for(lambda: named.worker_log().count("registered with coordinator") == 2, 30,
             "the worker to register with the restarted coordinator")
    wait_for(lambda: len(named.of("AGENT_READY")) == 2, 30, "a to be READY again")
    log = named.worker_log()
    assert log.count("connecting to its last address") == 1, log[-3000:]  # said once, not every attempt
    assert " silent" in (tmp_path / "dns.log").read_text(), "the worker asked DNS while it was silent"


@pytest.mark.timeout(180)
def test_a_worker_follows_its_coordinator_to_the_address_dns_names_next(tmp_path, dns_net):
    """The coordinator ends on one host and starts on another, and DNS names the new one: the
    worker registers there (it looks the name up again before each registration)."""
    named = Named(dns_net, tmp_path, 25640)
    moved = dns_net.host("c2")
    wait_for(lambda: named.of("AGENT_READY"), 60, "a to be READY")
    os.killpg(named.coordinator.pid, signal.SIGKILL)
    named.coordinator.wait(10)
    named.name(moved)
    named.start_coordinator("c2")
    wait_for(lambda: f"(tcp://{moved}:25640)" in named.worker_log(), 30,
             "the worker to register with the coordinator at its new address")
    wait_for(lambda: len(named.of("AGENT_READY")) == 2, 30, "a to be READY again")
    assert f"is now at tcp://{moved}:25640" in named.worker_log()
