"""Multi-host tier: a coordinator, two workers and a subscriber, each in its own network namespace
on one bridge; a worker is cut off by disabling its bridge port (``bridge link set dev X state 0``)
for three times the liveness window, then healed.

The promise: at no moment do two copies of the agent run, and nothing the cut-off copy sent
reaches the bus after its replacement is READY.  Each copy appends ``start``/``alive``/``close``
lines with its copy id and the time to a file in a shared directory (one host clock), so overlap is
read from what the copies did, not from what the coordinator believed.

Needs root and ``ip netns``; skips with the reason otherwise.  Every address is inside namespaces
this test creates (no address is added to the host's own namespace), and all of it is removed at
the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import process_gone, wait_for

TESTS = os.path.dirname(os.path.abspath(__file__))
WINDOW = 1.0  # heartbeat 0.2 s x 5

SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from agents import CopyTracer, CopyTracerProcess, SpawnerThread
from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

out = open({events!r}, "a")

def record(**fields):
    if fields["event"] != "AGENT_LOG":
        out.write(json.dumps({{k: fields.get(k) for k in ("event", "agent_name", "worker", "epoch")}}
                             | {{"t": time.time()}}) + "\\n")
        out.flush()

o = Orchestrator("partitioned", address={address!r}, insecure=True, run_mode=RunMode.DAEMON, min_workers=2,
                 heartbeat_interval=0.2, heartbeat_liveness=5)
for event in OrchestratorEvent:
    o.register_event(event, record)
o.register_agent({agent}, "db", {agent}.Config(trace={trace!r}, stop_timeout=1.0, {config}),
                 restart="always", restart_backoff=(0.2, 1.0))
o.start()
while True:
    time.sleep(0.1)
"""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


class Net:
    """A bridge and one namespace per host; removed in :meth:`close`."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000:04d}"
        self.bridge = f"pob{tag}"
        self.subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, host-side veth, address)
        self.procs: list[subprocess.Popen] = []  # what spawn() started: ended in close()
        # a run that was killed mid-way may have left these names behind: ours to remove
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=20)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")

    def host(self, name: str) -> str:
        index = len(self.hosts) + 1
        ns, veth = f"po{self.bridge[3:]}{name}", f"{self.bridge}{name}"
        address = f"{self.subnet}.{index}"
        # a namespace lives on while a process is in it, and so does its veth pair (a name taken
        # by a run before): deleting the veth's host end deletes the pair at once
        subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        _run("ip", "netns", "add", ns)
        self.hosts[name] = (ns, veth, address)  # close() removes it, also if what follows fails
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", self.bridge)
        _run("ip", "link", "set", veth, "up")
        for cmd in (["ip", "addr", "add", f"{address}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                    ["ip", "link", "set", "lo", "up"]):
            _run("ip", "netns", "exec", ns, *cmd)
        return address

    def spawn(self, name: str, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[name][0], *args], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cut(self, name: str, cut: bool) -> None:
        _run("bridge", "link", "set", "dev", self.hosts[name][1], "state", "0" if cut else "3")

    def close(self) -> None:
        """End what spawn() started (each in its own session: the whole group), and whatever else
        still runs in the namespaces (a worker's guard, a process agent: sessions or groups of their
        own, that end by themselves a moment later), then remove the namespaces and their veths."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        for ns, veth, _ in self.hosts.values():
            listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20)
            for pid in map(int, listed.stdout.split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=20)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=20)


def _namespaces_work() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not (shutil.which("ip") and shutil.which("bridge")):
        return "needs iproute2 (ip, bridge)"
    probe = f"poprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return ""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _spans(path: Path) -> list[tuple[float, float, str]]:
    """Each copy's first and last line in a CopyTracer trace, in order of start."""
    copies: dict[str, list[float]] = {}
    for line in _lines(path):
        _, copy, at = line.split()
        copies.setdefault(copy, []).append(float(at))
    return sorted((min(ts), max(ts), copy) for copy, ts in copies.items())


def _cluster(net: Net, tmp_path: Path, script: Callable[[str], str], port: int, *more_hosts: str) -> str:
    """Hosts c (the coordinator, running ``script(its address)``), w1 and w2 (a worker each) and
    ``more_hosts``; returns the coordinator's host address."""
    coordinator = net.host("c")
    for name in ("w1", "w2", *more_hosts):
        net.host(name)
    address = f"tcp://{coordinator}:{port}"
    path = tmp_path / "coordinator.py"
    path.write_text(script(address))
    net.spawn("c", [sys.executable, str(path)], tmp_path / "coordinator.log")
    for name in ("w1", "w2"):
        net.spawn(name, [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", address, "--name", name],
                  tmp_path / f"{name}.log")
    return coordinator


def _of(events: Path, event: str) -> list[dict]:
    return [e for e in map(json.loads, _lines(events)) if e["event"] == event]


@pytest.fixture
def net():
    """A bridge for the test's namespaces (skips without root or iproute2), removed after it."""
    reason = _namespaces_work()
    if reason:
        pytest.skip(reason)
    made = Net()
    try:
        yield made
    finally:
        made.close()


#: the agent: a thread agent that stops slowly, within its stop timeout; a process agent that
#: ignores both its stop and SIGTERM (its worker terminates it, then kills it: the kill was 2 s
#: past its stop timeout, its replacement started 0.2 s past it, and they overlapped)
AGENTS = {"thread": ("CopyTracer", "linger=0.8"),
          "process": ("CopyTracerProcess", "linger=10.0, deaf_to_sigterm=True"),
          # and processes it started and never ends (worker/group_guard.py): they ran on for ever
          "thread-processes": ("SpawnerThread", "linger=0.8, pid_file={pids!r}")}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", sorted(AGENTS))
def test_a_cut_off_worker_never_leaves_two_live_copies_nor_a_stale_event(tmp_path, kind, net):
    trace, events, bus = tmp_path / "copies.txt", tmp_path / "events.jsonl", tmp_path / "bus.jsonl"
    agent, config = AGENTS[kind]
    pids = tmp_path / "pids"
    config = config.format(pids=str(pids))
    coordinator = _cluster(net, tmp_path, lambda address: SCRIPT.format(
        tests=TESTS, events=str(events), address=address, trace=str(trace), agent=agent, config=config), 25600, "s")
    net.spawn("s", [sys.executable, "-m", "pyorchestrate.cli", "events", "--address",
                    f"tcp://{coordinator}:25601", "--json", "--heartbeats", "--timeout", "120"], bus)

    def of(event: str) -> list[dict]:
        return _of(events, event)

    first = wait_for(lambda: of("AGENT_READY"), 60, "db to be READY")[0]
    victim, other = first["worker"], {"w1": "w2", "w2": "w1"}[first["worker"]]
    time.sleep(1.0)  # the subscriber hears the steady state
    ended = _watch_ended([int(p) for p in _lines(pids)[0].split()] if kind == "thread-processes" else [])
    net.cut(victim, True)
    time.sleep(3 * WINDOW)
    net.cut(victim, False)
    second = wait_for(lambda: [e for e in of("AGENT_READY") if e["worker"] == other], 30,
                      f"db to be READY on {other}")[0]
    time.sleep(3.0)  # the healed worker comes back; anything stale would arrive now

    # what the copies did: never two alive at once
    spans = _spans(trace)
    assert len(spans) == 2, spans
    assert spans[0][1] < spans[1][0], f"two copies alive at once: {spans}"
    lost = of("WORKER_LOST")
    assert [e["worker"] for e in lost] == [victim]

    # what the bus carried: nothing from the cut-off copy once its worker was declared lost
    # (what it sent while cut off arrives at the heal, and is dropped)
    seen = [json.loads(line) for line in _lines(bus) if line.startswith("{")]
    gone = next(i for i, e in enumerate(seen) if e.get("event") == "WORKER_LOST")
    ready = next(i for i, e in enumerate(seen) if e.get("event") == "AGENT_READY" and e.get("worker") == other)
    stale = [e for e in seen[gone:] if e.get("agent_name") == "db" and e.get("worker") == victim
             and e.get("event") in ("AGENT_LOG", "AGENT_HEARTBEAT", "AGENT_EVENT")]
    assert not stale, stale[:3]
    assert any(e.get("event") == "AGENT_LOG" and e.get("worker") == other for e in seen[ready:]), \
        "the new copy's logs reach the bus"
    assert second["epoch"] > first["epoch"]
    if kind == "thread-processes":  # gone before the second copy started; the second copy's run
        assert ended and ended[0] < spans[1][0], (ended, spans)
        assert len(_lines(pids)) == 2 and all(not process_gone(int(p)) for p in _lines(pids)[1].split())


def _watch_ended(pids: list[int]) -> list[float]:
    """When none of ``pids`` ran any more (time.time(), as the copies' traces), filled in by a
    thread that looks every 20 ms for up to 60 s."""
    import threading

    ended: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(map(process_gone, pids)):
                ended.append(time.time())
                return
            time.sleep(0.02)

    if pids:
        threading.Thread(target=watch, daemon=True).start()
    return ended


STALL_SCRIPT = """
import ctypes, json, os, sys, time
sys.path.insert(0, {tests!r})
from agents import CopyTracer
from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

out = open({events!r}, "a", buffering=1)
say = lambda **f: print(json.dumps({{k: f.get(k) for k in ("event", "agent_name", "worker")}}), file=out)
o = Orchestrator("stalled", address={address!r}, insecure=True, run_mode=RunMode.DAEMON, min_workers=2,
                 heartbeat_interval=0.2, heartbeat_liveness=5)
for event in OrchestratorEvent:
    if event.value not in ("AGENT_LOG", "AGENT_HEARTBEAT"):
        o.register_event(event, say)
for name, worker in (("a", "w1"), ("b", "w2")):
    o.register_agent(CopyTracer, name, CopyTracer.Config(trace=os.path.join({traces!r}, name), stop_timeout=1.0,
                                                         linger=0.3), worker=worker, restart="always",
                     restart_backoff=(0.2, 1.0))
o.start()
while not os.path.exists({trigger!r}):
    time.sleep(0.05)
ctypes.PyDLL(None).sleep(3)  # one call of the script that holds the GIL: 3 times the lease
while True:
    time.sleep(0.1)
"""


@pytest.mark.timeout(180)
def test_a_stalled_script_keeps_the_reachable_worker_and_the_cut_off_one_still_stops_in_time(tmp_path, net):
    """The coordinator's script holds the GIL for 3 s while w1 is cut off.  w2 reaches the pulse
    across the bridge: its agent runs on, one copy.  w1 cannot: its lease runs out, its copy
    stops, and the next copy starts only after (never two at once)."""
    events, traces, trigger = tmp_path / "events.jsonl", tmp_path / "traces", tmp_path / "hold"
    traces.mkdir()
    _cluster(net, tmp_path, lambda address: STALL_SCRIPT.format(
        tests=TESTS, events=str(events), address=address, traces=str(traces), trigger=str(trigger)), 25610)

    def of(event: str) -> list[dict]:
        return _of(events, event)

    wait_for(lambda: len(of("AGENT_READY")) == 2, 60, "a and b to be READY")
    time.sleep(0.5)
    net.cut("w1", True)
    trigger.touch()
    time.sleep(3.5)
    net.cut("w1", False)
    wait_for(lambda: len([e for e in of("AGENT_READY") if e["agent_name"] == "a"]) == 2, 30,
             "a's next copy to be READY")
    time.sleep(2.0)

    b, a = _spans(traces / "b"), _spans(traces / "a")
    assert len(b) == 1, f"b, on the reachable worker, ran {len(b)} copies: {b}"
    assert len(a) == 2 and a[0][1] < a[1][0], f"a's copies: {a}"
    # (w1 itself may come back before it is declared lost: the stall gave every worker a fresh window)
    assert "w2" not in [e["worker"] for e in of("WORKER_LOST")]
    assert "lease ran out" in (tmp_path / "w1.log").read_text()
    assert "lease ran out" not in (tmp_path / "w2.log").read_text()
    assert "coordinator loop stalled" in (tmp_path / "coordinator.log").read_text()
