"""Multi-host tier with keys: a coordinator, two workers and three subscribers, each in its own
network namespace on one bridge, every host holding only what ``keys export`` gave it.

The seed example runs across them unchanged (``PYORCHESTRATE_KEYS`` names the key directory); a
subscriber with a reader key sees every event, one with no key and one with a revoked key see
nothing and say why; then a worker whose key is revoked is disconnected and its agent moves.

Needs root and ``ip netns``; skips with the reason otherwise (see test_partition_netns.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, wait_for
from test_partition_netns import TESTS, Net, _lines, _namespaces_work

from pyorchestrate.keys import KeyDir

DAEMON = """
import json, sys, time
sys.path.insert(0, {tests!r})
from agents import Forever
from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

out = open({events!r}, "a")

def record(**fields):
    if fields["event"] != "AGENT_LOG":
        out.write(json.dumps({{k: fields.get(k) for k in ("event", "agent_name", "worker", "reason")}}) + "\\n")
        out.flush()

o = Orchestrator("keyed", address={address!r}, keys={keys!r}, run_mode=RunMode.DAEMON, min_workers=2,
                 heartbeat_interval=0.2, heartbeat_liveness=10)
for event in OrchestratorEvent:
    o.register_event(event, record)
o.register_agent(Forever, "db", restart="always")
o.start()
while True:
    time.sleep(0.1)
"""


def _events_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyorchestrate.cli", "events", "--json", *args]


@pytest.mark.timeout(240)
def test_keys_across_namespaces_seed_readers_and_a_revoked_worker(tmp_path):
    reason = _namespaces_work()
    if reason:
        pytest.skip(reason)
    keys = KeyDir(tmp_path / "keys")
    keys.init()
    keys.add("worker", "w2key")
    keys.add("reader", "gone")
    hosts = {"w1": ("worker", "worker"), "w2": ("worker", "w2key"), "s1": ("reader", "reader"),
             "s3": ("reader", "gone")}
    for host, (role, name) in hosts.items():  # each host gets what export writes, nothing more
        keys.export(role, name, tmp_path / f"{host}-keys")
    keys.revoke("gone")
    net = Net()
    try:
        coordinator = net.host("c")
        for name in ("w1", "w2", "s1", "s2", "s3"):
            net.host(name)
        address, events_address = f"tcp://{coordinator}:25600", f"tcp://{coordinator}:25601"
        for name in ("w1", "w2"):
            net.spawn(name, [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", address, "--name", name,
                             "--keys", str(tmp_path / f"{name}-keys")], tmp_path / f"{name}.log")
        reader = tmp_path / "s1.jsonl"
        net.spawn("s1", _events_cli("--address", events_address, "--keys", str(tmp_path / "s1-keys"),
                                    "--timeout", "90", "--exit-on-shutdown"), reader)
        # (a refusal ends them at once; the idle timeout only bounds a broken run)
        keyless = net.spawn("s2", _events_cli("--address", events_address, "--timeout", "90"), tmp_path / "s2.log")
        revoked = net.spawn("s3", _events_cli("--address", events_address, "--keys", str(tmp_path / "s3-keys"),
                                              "--timeout", "90"), tmp_path / "s3.log")
        # the seed is over in seconds: the subscribers must be up and knocking before it starts
        wait_for(lambda: all("waiting" in (tmp_path / f"{s}.log").read_text() for s in ("s2", "s3")), 60,
                 "the keyless and the revoked subscriber to be waiting for the coordinator")

        # the seed example, unchanged: the key directory comes from the environment
        seed = subprocess.run(["ip", "netns", "exec", net.hosts["c"][0], sys.executable, "main.py", address],
                              cwd=REPO / "examples" / "seed", capture_output=True, text=True, timeout=90,
                              env={**os.environ, "PYORCHESTRATE_KEYS": str(keys.path)})
        assert seed.returncode == 0, seed.stderr
        assert "published 5 readings" in (tmp_path / "w1.log").read_text() + (tmp_path / "w2.log").read_text()

        # the reader saw the whole run, nothing lost
        wait_for(lambda: any('"SHUTDOWN"' in line for line in _lines(reader)), 30, "the reader to see SHUTDOWN")
        seen = [json.loads(line) for line in _lines(reader) if line.startswith("{")]
        for agent in ("Publisher", "Subscriber"):
            for event in ("AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"):
                assert any(e["event"] == event and e.get("agent_name") == agent for e in seen), (event, agent)
        assert not [e for e in seen if e["event"] == "EVENTS_LOST"]
        assert {e.get("worker") for e in seen if e["event"] == "AGENT_STARTED"} == {"w1", "w2"}

        # the same workers serve a second script; revoke the key of the worker running its agent
        events = tmp_path / "events.jsonl"
        script = tmp_path / "daemon.py"
        script.write_text(DAEMON.format(tests=TESTS, events=str(events), address=address, keys=str(keys.path)))
        net.spawn("c", [sys.executable, str(script)], tmp_path / "coordinator.log")

        def of(event: str) -> list[dict]:
            return [e for e in map(json.loads, _lines(events)) if e["event"] == event]

        first = wait_for(lambda: of("AGENT_READY"), 60, "db to be READY")[0]
        # no key, or a revoked one: nothing seen, the reason said, a non-zero exit (from the seed's
        # coordinator, or, on a loaded machine where the handshake came too late for it, this one)
        assert keyless.wait(100) == 1 and revoked.wait(100) == 1
        assert "requires keys" in (tmp_path / "s2.log").read_text()
        assert "refused reader key 'gone'" in (tmp_path / "s3.log").read_text()
        assert '"event"' not in (tmp_path / "s2.log").read_text() + (tmp_path / "s3.log").read_text()
        victim = first["worker"]
        other = {"w1": "w2", "w2": "w1"}[victim]
        keys.revoke(hosts[victim][1])
        lost = wait_for(lambda: of("WORKER_LOST"), 20, f"{victim} to be disconnected")[0]
        assert lost["worker"] == victim and "revoked" in lost["reason"]
        wait_for(lambda: [e for e in of("AGENT_READY") if e["worker"] == other], 30, f"db to move to {other}")
        wait_for(lambda: "was revoked" in (tmp_path / f"{victim}.log").read_text(), 20,
                 f"{victim} to say its key was revoked")
        time.sleep(1.0)
        assert len([e for e in of("WORKER_JOINED") if e["worker"] == victim]) == 1  # it did not get back in
    finally:
        net.close()  # (ends what it spawned)
