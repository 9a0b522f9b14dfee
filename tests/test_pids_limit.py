"""A worker at its pids limit (a container's, a systemd unit's ``TasksMax``: threads count) cannot
start threads: each agent that needed one fails, reported, and none waits for ever; once threads
can be had again, agents start.  Before, a process agent whose watcher thread could not be started
stayed ASSIGNED for good, and so did every agent once the starter thread itself could not start.
Real processes in a cgroup (v1 ``pids``) made for the test."""

from __future__ import annotations

import os
import signal
import time

import pytest
from agents import Forever, ForeverProcess
from conftest import start_daemon, wait_for

PIDS = "/sys/fs/cgroup/pids"


def _pids_cgroups() -> bool:
    probe = f"{PIDS}/pyorchestrate-probe-{os.getpid()}"
    try:
        os.mkdir(probe)
    except OSError:
        return False
    os.rmdir(probe)
    return True


pytestmark = pytest.mark.skipif(not _pids_cgroups(), reason="needs a writable cgroup v1 pids hierarchy (root)")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _settled(orch, names) -> bool:
    """Every one of ``names`` is READY or has ended (none waits in ASSIGNED or STARTING)."""
    agents = orch.status()["agents"]
    return all(agents[n]["state"] in ("READY", "TERMINATED") for n in names)


def test_agents_that_get_no_thread_fail_and_none_waits_for_ever(cluster):
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    worker = events.of("WORKER_JOINED")[0]["pid"]
    group = f"{PIDS}/pyorchestrate-test-{worker}"
    os.mkdir(group)
    try:
        _write(f"{group}/cgroup.procs", str(worker))  # the worker, all its threads; what it starts follows
        with open(f"{group}/pids.current") as f:
            _write(f"{group}/pids.max", f.read().strip())  # not one task more: not even the starter thread
        # a thread agent in the worker, one beyond --threads-per-process 1 (an agent host), a process agent
        for name, cls in (("t", Forever), ("hosted", Forever), ("p", ForeverProcess)):
            orch.register_agent(cls, name)
        wait_for(lambda: _settled(orch, ("t", "hosted", "p")), 20, "each agent ended or ran")
        failed = {e["agent_name"] for e in events.of("AGENT_ERROR")}
        assert failed == {"t", "hosted", "p"}, events.events
        # one task more: the starter thread takes it, and the threads it starts fail
        with open(f"{group}/pids.current") as f:
            _write(f"{group}/pids.max", str(int(f.read()) + 1))
        orch.register_agent(ForeverProcess, "p2")
        orch.register_agent(Forever, "hosted2")
        wait_for(lambda: _settled(orch, ("p2", "hosted2")), 20, "each agent ended or ran")
        _write(f"{group}/pids.max", "max")
        for name, cls in (("t3", Forever), ("p3", ForeverProcess)):
            orch.register_agent(cls, name)
            events.wait("AGENT_READY", name, timeout=30)
        assert not events.of("WORKER_LOST") and cluster.workers["w1"].poll() is None
    finally:
        cluster.workers["w1"].kill()
        cluster.workers["w1"].wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"{group}/cgroup.procs") as f:
                left = [int(p) for p in f.read().split()]
            if not left:
                break
            for pid in left:  # ours: what the worker started in the group (a host, the forkserver)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        os.rmdir(group)
