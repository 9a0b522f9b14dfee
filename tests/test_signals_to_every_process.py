"""Signals sent to every process of a worker, as ``systemctl kill -s SIG UNIT`` and systemd's default
``KillMode=control-group`` stop do (the whole cgroup), act as they do on the worker alone.

- SIGUSR1: each of the worker, its agent hosts and process agents prints its stacks, and nothing
  else changes (worker/stack_dump.py).  Before, a process agent, an agent host, the forkserver, the
  resource tracker and the worker's guard died of it, the agents as failures.
- SIGTERM: every agent stops gracefully, as with the worker's stop alone.  Before, the process agent
  and the agent host died of it (AGENT_ERROR, "exited with code 255"), without ``on_stop``.
"""

from __future__ import annotations

import os
import signal
import time

from agents import DeafThread, Forever, ForeverProcess
from conftest import _processes, live_children, process_gone, start_daemon, wait_for


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (running)."""
    found, todo = [], [pid]
    table = _processes()
    while todo:
        parent = todo.pop()
        for p, state, ppid, _ in table:
            if ppid == parent and state != "Z":
                found.append(p)
                todo.append(p)
    return found


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _guard_of(worker: int) -> int:
    """The pid of the worker's guard (worker/group_guard.py: a shell in a session of its own)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args[:2] == [b"/bin/sh", b"-c"] and args[3:5] == [b"guard", str(worker).encode()]:
            return int(entry)
    raise AssertionError(f"no guard of worker {worker}")


def test_sigusr1_to_all_of_a_workers_processes_ends_no_agent(cluster, tmp_path):
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    worker = events.of("WORKER_JOINED")[0]["pid"]
    orch.register_agent(ForeverProcess, "p", ForeverProcess.Config(pid_file=str(tmp_path / "p.pid")))
    orch.register_agent(Forever, "t1")
    orch.register_agent(Forever, "t2")  # beyond --threads-per-process 1: in an agent host
    for name in ("p", "t1", "t2"):
        events.wait("AGENT_READY", name, timeout=30)
    guard = _guard_of(worker)
    process_agent = int((tmp_path / "p.pid").read_text())
    forkserver = next(pid for pid in live_children(worker) if b"forkserver" in _cmdline(pid))
    host = next(pid for pid in live_children(forkserver) if pid != process_agent)
    everyone = [worker, guard, *_descendants(worker)]  # the forkserver, the resource tracker, p, the host
    assert len(everyone) == 6 and process_agent in everyone and host in everyone, everyone
    # one by one at first (each writes its stacks to the worker's stderr, and two at once mingle)
    os.kill(process_agent, signal.SIGUSR1)
    wait_for(lambda: " in cycle" in cluster.log_of("w1"), 10, "the process agent's stacks")
    os.kill(host, signal.SIGUSR1)
    wait_for(lambda: "host.py\", line" in cluster.log_of("w1"), 10, "the agent host's stacks")
    for pid in everyone:
        os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: " in _serve" in cluster.log_of("w1"), 10, "the worker's stacks")
    time.sleep(1.0)
    # the guard too (with it the worker's guarantee: worker/group_guard.py), and the forkserver
    assert [pid for pid in everyone if process_gone(pid)] == []
    assert not events.of("AGENT_ERROR") and not events.of("AGENT_TERMINATED") and not events.of("WORKER_LOST"), \
        [e for e in events.events if e["event"] in ("AGENT_ERROR", "AGENT_TERMINATED", "WORKER_LOST")]
    orch.register_agent(ForeverProcess, "p2")  # the forkserver still serves
    events.wait("AGENT_READY", "p2", timeout=30)


def test_sigterm_to_all_of_a_workers_processes_stops_every_agent_gracefully(cluster):
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    worker = events.of("WORKER_JOINED")[0]["pid"]
    orch.register_agent(ForeverProcess, "p")
    orch.register_agent(Forever, "t1")
    orch.register_agent(Forever, "t2")  # beyond --threads-per-process 1: in an agent host
    for name in ("p", "t1", "t2"):
        events.wait("AGENT_READY", name, timeout=30)
    everyone = [worker, *_descendants(worker)]
    assert len(everyone) == 5, everyone  # with the forkserver and the resource tracker
    for pid in everyone:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            # ended before its turn: the worker, signalled first, stopped it meanwhile (seen beside
            # 4 CPU burners; a group's signal reaches all at once, this loop one at a time)
            pass
    assert cluster.workers["w1"].wait(30) == 0
    for name in ("p", "t1", "t2"):
        events.wait("AGENT_TERMINATED", name, timeout=10)
    ends = {e["agent_name"]: e["ok"] for e in events.of("AGENT_TERMINATED")}
    assert ends == {"p": True, "t1": True, "t2": True} and not events.of("AGENT_ERROR"), events.events


def test_an_agent_host_signalled_twice_ends_with_its_stuck_agent(cluster, tmp_path):
    """The first SIGTERM asks its agents to stop; a thread stuck in its cycle never sees that, and
    the second ends the host, as SIGTERM's default did at the first."""
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    orch.register_agent(Forever, "t1")
    events.wait("AGENT_READY", "t1", timeout=30)
    pid_file = tmp_path / "host.pid"
    orch.register_agent(DeafThread, "stuck", DeafThread.Config(pid_file=str(pid_file)))  # in an agent host
    events.wait("AGENT_READY", "stuck", timeout=30)
    host = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "the host's pid"))
    os.kill(host, signal.SIGTERM)
    time.sleep(1.0)
    assert not process_gone(host) and not events.of("AGENT_TERMINATED")
    os.kill(host, signal.SIGTERM)
    error = events.wait("AGENT_ERROR", "stuck", timeout=20)[0]["error_message"]
    assert f"exited with code {128 + signal.SIGTERM}" in error, error
    assert orch.status()["agents"]["t1"]["state"] == "READY"
