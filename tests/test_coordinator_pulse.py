"""The coordinator's pulse (pyorchestrate/coordinator_pulse.py): a coordinator script whose call
holds the GIL past its workers' lease stops no agent; a stopped one still does.

The script is a real process with a real local worker.  A call through ``ctypes.PyDLL`` keeps the
GIL for its whole length, as a long ``list.sort`` or ``json.loads`` does, but for a set time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import needs_ipv6, process_gone, wait_for

from pyorchestrate.core import ClusterCore
from pyorchestrate.keys import KeyDir
from pyorchestrate.coordinator_pulse import stalled
from pyorchestrate.limits import Limits
from pyorchestrate_worker.coordinator_vouch import should_ask, takes

TESTS = os.path.dirname(os.path.abspath(__file__))

# lifecycle events go to a file, one JSON line each (line-buffered: the test reads them as they come)
SCRIPT = """
import ctypes, json, os, signal, sys, time
sys.path.insert(0, {tests!r})
from agents import Traced
from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

out = open({events!r}, "a", buffering=1)
LIFECYCLE = [e for e in OrchestratorEvent if e.value not in ("AGENT_HEARTBEAT", "AGENT_LOG")]
say = lambda event, agent=None: print(json.dumps({{"event": event, "agent": agent}}), file=out)
o = Orchestrator("pulsed", run_mode=RunMode.DAEMON, heartbeat_interval=0.2, heartbeat_liveness=5,
                 coordinator_pulse={pulse!r}, keys={keys!r}, address={address!r})
for event in LIFECYCLE:
    o.register_event(event, lambda **f: say(f["event"], f.get("agent_name")))
o.register_agent(Traced, "steady", Traced.Config(trace={trace!r}), restart="always", restart_backoff=(0.1, 0.5))
o.start()
{worker}
while not open({events!r}).read().count("AGENT_READY"):
    time.sleep(0.05)
time.sleep(0.5)
{hold}
time.sleep(2.0)  # a lease that ran out during the hold: its agent's stop and restart come now
say("DONE")
o.stop()
{worker_end}
"""

HOLDS = {
    # one C call that keeps the GIL for 3 s: three times the lease (0.2 s x 5)
    "gil": "ctypes.PyDLL(None).sleep(3)",
    # the whole process stopped for as long: no pulse may vouch for it
    "sigstop": "os.kill(os.getpid(), signal.SIGSTOP)",
}


# a worker of its own, for a coordinator on an address (embedded workers use 127.0.0.1)
WORKER = """import subprocess
worker = subprocess.Popen([sys.executable, "-m", "pyorchestrate_worker", "--coordinator", o.address, "--name", "w1"]
                          + (["--keys", {keys!r}] if {keys!r} else []))"""
WORKER_END = "worker.terminate(); worker.wait(20)"


def _run(tmp_path, hold: str, pulse: bool, keyed: bool = False, address: str | None = None
         ) -> tuple[list[dict], list[str]]:
    events, trace = tmp_path / "events.jsonl", tmp_path / "trace.txt"
    script = tmp_path / "script.py"
    keys = None
    if keyed:
        KeyDir(tmp_path / "keys").init()
        keys = str(tmp_path / "keys")
    worker, worker_end = (WORKER.format(keys=keys), WORKER_END) if address else ("", "")
    script.write_text(SCRIPT.format(tests=TESTS, events=str(events), trace=str(trace), pulse=pulse, hold=HOLDS[hold],
                                    keys=keys, address=address, worker=worker, worker_end=worker_end))
    events.touch()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "stderr.txt", "w"), start_new_session=True)
    try:
        if hold == "sigstop":
            wait_for(lambda: os.path.exists(f"/proc/{proc.pid}/stat")
                     and open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T",
                     30, "the script to stop itself")
            time.sleep(3.0)
            proc.send_signal(signal.SIGCONT)
        assert proc.wait(60) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return [json.loads(line) for line in events.read_text().splitlines()], trace.read_text().splitlines()


def _before_done(events: list[dict]) -> list[str]:
    names = [e["event"] for e in events]
    assert "DONE" in names, names
    return names[:names.index("DONE")]


@pytest.mark.parametrize("pulse, keyed, address", [(True, False, None), (True, True, None), (False, False, None),
                                                   pytest.param(True, True, "tcp://[::1]:*", marks=needs_ipv6)],
                         ids=["pulse", "pulse-keys", "no-pulse", "pulse-keys-ipv6"])
def test_a_script_holding_the_gil_past_the_lease_stops_no_agent_with_its_pulse(tmp_path, pulse, keyed, address):
    """With the pulse: one copy from start to stop(), nothing lost, disconnected or restarted; with
    keys too (the pulse's port admits workers' keys only), and on IPv6.  Without it (the control):
    the worker's lease runs out and the agent runs a second time, so this test can tell the two apart."""
    events, trace = _run(tmp_path, "gil", pulse, keyed, address)
    before = _before_done(events)
    stderr = (tmp_path / "stderr.txt").read_text()
    setups = [line for line in trace if line.startswith("setup")]
    if pulse:
        assert len(setups) == 1, (trace, before, stderr[-3000:])
        assert "WORKER_LOST" not in before and "AGENT_DISCONNECTED" not in before, before
        assert before.count("AGENT_STARTED") == 1, before
        assert "lease ran out" not in stderr, stderr[-3000:]
        assert "coordinator loop stalled" in stderr  # the stall happened, and was noticed
    else:
        assert "lease ran out" in stderr, stderr[-3000:]
        assert len(setups) == 2, (trace, before)


def test_a_stopped_script_gets_no_pulse(tmp_path):
    """SIGSTOP stops the whole process: its pulse must not vouch for it (a stopped process is not
    a stalled loop), and the lease runs out as before."""
    events, trace = _run(tmp_path, "sigstop", True)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "lease ran out" in stderr, stderr[-3000:]
    assert len([line for line in trace if line.startswith("setup")]) == 2, trace


# ------------------------------------------------------------------ the rules, pure


def test_a_worker_asks_only_while_its_lease_runs_and_the_echoes_are_late():
    limits = Limits(0.2, 5)  # stall 0.4 s, lease 1.0 s
    assert not should_ask(10.3, 10.0, limits)  # echoes on time
    assert should_ask(10.5, 10.0, limits)
    assert should_ask(11.0, 10.0, limits)
    assert not should_ask(11.01, 10.0, limits)  # the lease ran out: it may have been declared lost


def test_a_worker_takes_only_a_prompt_answer():
    limits = Limits(0.2, 5)
    assert takes(10.0, 10.1, limits)
    assert not takes(10.0, 10.41, limits)  # late: says nothing about now
    assert not takes(10.5, 10.0, limits)  # from the future: not ours


def test_the_pulse_vouches_only_past_a_stall():
    assert not stalled(10.3, 10.0, 0.4)
    assert stalled(10.5, 10.0, 0.4)


def _core(now: float) -> ClusterCore:
    from pyorchestrate import Orchestrator

    config = Orchestrator.Config(heartbeat_interval=0.2, heartbeat_liveness=5)
    return ClusterCore("c", "s", config, now=now, rng=random.Random(1), wall=lambda: 0.0,
                       drop=lambda *a: None)


def test_the_loop_honours_a_vouch_given_while_it_was_stalled_even_if_its_own_clock_says_no_stall():
    """The pulse read our last tick (10.0), vouched at 10.6, and wrote that before we read it;
    we took our clock at 10.3, a moment before: our clock alone says no stall."""
    from pyorchestrate.records import WorkerRecord

    core = _core(10.0)
    core.tick(10.0)
    worker = WorkerRecord(name="w", identity=b"w", incarnation="i", host="h", pid=1, labels={}, capacity=1,
                          versions={}, order=0, last_seen=9.9)
    core.workers["w"] = worker
    core.tick(10.3, vouched=10.6)
    assert worker.last_seen == 10.6 and worker.alive
    # a vouch that came less than a stall after our last tick is no stall of ours: nothing changes
    core.tick(10.5, vouched=10.7)
    assert worker.last_seen == 10.6


def test_the_pulse_port_admits_workers_keys_only(tmp_path):
    """Nobody without a worker's key gets through the pulse's handshake: not a reader, not a
    stranger with a key of its own making."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    from pyorchestrate import Orchestrator, RunMode
    from pyorchestrate.curve import connect_as

    keys = KeyDir(tmp_path / "keys")
    keys.init()
    orch = Orchestrator("gate", keys=str(keys.path), local_workers=0, min_workers=0, run_mode=RunMode.DAEMON)
    orch.start()
    ctx = zmq.Context()
    try:
        pulse = orch._coordinator.pulse
        assert pulse is not None
        address = f"tcp://127.0.0.1:{pulse.port}"

        def handshake(setup) -> int:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            setup(sock)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            sock.connect(address)
            try:
                assert monitor.poll(10_000), "no handshake outcome within 10 s"
                return recv_monitor_message(monitor)["event"]
            finally:
                sock.disable_monitor()
                monitor.close(0)
                sock.close(0)

        def stranger(sock) -> None:
            sock.curve_serverkey = keys.coordinator_public()
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()

        assert handshake(lambda s: connect_as(s, keys.client("worker"))) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert handshake(lambda s: connect_as(s, keys.client("reader"))) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert handshake(stranger) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    finally:
        ctx.destroy(0)
        orch.stop()
    # it ended by itself when stop() closed its stdin (its gatekeeper too), not killed 2 s later
    assert pulse.process.returncode == 0


KILLED = """
import os, sys, time
from pyorchestrate import Orchestrator, RunMode
o = Orchestrator("killed", keys={keys!r}, local_workers=0, min_workers=0, run_mode=RunMode.DAEMON)
o.start()
print(o._coordinator.pulse.process.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keys"])
def test_the_pulse_ends_soon_after_its_coordinator_is_killed(tmp_path, keyed):
    """SIGKILL gives the script no word to say: its pulse sees it is gone, and ends (with keys, its
    gatekeeper thread once spun on the ended context, for ever)."""
    keys = None
    if keyed:
        KeyDir(tmp_path / "keys").init()
        keys = str(tmp_path / "keys")
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(keys=keys))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        pid = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)  # the script only: its pulse is left to notice
        proc.wait(10)
        wait_for(lambda: process_gone(pid), 10, "the pulse to end")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_status_says_where_the_pulse_listens_and_whether_it_runs(tmp_path, caplog):
    from pyorchestrate import Orchestrator, RunMode

    orch = Orchestrator("seen", local_workers=0, min_workers=0, run_mode=RunMode.DAEMON)
    orch.start()
    try:
        status = orch.status()
        pulse = orch._coordinator.pulse
        assert status["addresses"]["pulse"] == f"tcp://127.0.0.1:{pulse.port}" and status["pulse_running"]
        os.kill(pulse.process.pid, signal.SIGKILL)
        wait_for(lambda: not orch.status()["pulse_running"], 10, "status to say the pulse is gone")
        wait_for(lambda: "pulse process ended" in caplog.text, 10, "the coordinator to say so")
    finally:
        orch.stop()
    off = Orchestrator("off", local_workers=0, min_workers=0, run_mode=RunMode.DAEMON, coordinator_pulse=False)
    off.start()
    try:
        assert off.status()["addresses"]["pulse"] is None and not off.status()["pulse_running"]
    finally:
        off.stop()
