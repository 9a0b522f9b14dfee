"""A worker at its pids limit (a container's, a systemd unit's ``TasksMax``: threads count) cannot
start threads: each agent that needed one fails, reported, and none waits for ever; once threads
can be had again, agents start.  Before, a process agent whose watcher thread could not be started
stayed ASSIGNED for good, and so did every agent once the starter thread itself could not start.
Real processes in a cgroup (v1 ``pids``) made for the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from agents import Forever, ForeverProcess, PidsFiller
from conftest import process_gone, start_daemon, wait_for

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


@pytest.fixture
def pids_group():
    """A pids cgroup of the test's own; at the end, whatever is still in it is killed (what the
    test's worker started there) and the group removed."""
    group = f"{PIDS}/pyorchestrate-test-{os.getpid()}-{time.monotonic_ns()}"
    os.mkdir(group)
    yield group
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"{group}/cgroup.procs") as f:
            left = [int(p) for p in f.read().split()]
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    os.rmdir(group)


def test_agents_that_get_no_thread_fail_and_none_waits_for_ever(cluster, pids_group):
    group = pids_group
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    worker = events.of("WORKER_JOINED")[0]["pid"]
    try:
        _write(f"{group}/cgroup.procs", str(worker))  # the worker, all its threads; what it starts follows
        with open(f"{group}/pids.current") as f:
            _write(f"{group}/pids.max", f.read().strip())  # not one task more: not even the starter thread
        # a thread agent in the worker, one beyond --threads-per-process 1 (an agent host), a process agent
        for name, cls in (("t", Forever), ("hosted", Forever), ("p", ForeverProcess)):
            orch.register_agent(cls, name)
        wait_for(lambda: _settled(orch, ("t", "hosted", "p")), 20, "each agent ended or ran")
        # (all three, here; a thread of the worker's that ended meanwhile could leave one room)
        failed = {e["agent_name"] for e in events.of("AGENT_ERROR") if "can't start new thread" in e["error_message"]}
        assert failed, events.events
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


def test_a_process_agent_whose_lease_guard_gets_no_thread_still_ends_with_its_worker(cluster, pids_group, tmp_path):
    """The agent's own helpers fill the pids limit; its worker dies: the agent and its helpers end
    with it.  (Here its first lease usually arrives before the helpers fill the limit, so this does
    not catch the break the next test does: a lease guard that got no thread ended the thread that
    reads the worker's pipe, and the agent ran on after its worker died.)"""
    orch, events = start_daemon(cluster, ("w1",))
    worker = events.of("WORKER_JOINED")[0]["pid"]
    _write(f"{pids_group}/cgroup.procs", str(worker))
    with open(f"{pids_group}/pids.current") as f:
        _write(f"{pids_group}/pids.max", str(int(f.read()) + 40))  # the forkserver, the agent, some helpers
    pid_file = tmp_path / "filler"
    orch.register_agent(PidsFiller, "f", PidsFiller.Config(pid_file=str(pid_file)))
    events.wait("AGENT_READY", "f", timeout=30)
    agent, helpers = (int(n) for n in pid_file.read_text().split())
    assert 0 < helpers < PidsFiller.Config.most  # it reached the limit
    time.sleep(1.0)  # leases told meanwhile (every 0.1 s)
    _write(f"{pids_group}/pids.max", "max")  # the worker must be free to do what it does at its end
    cluster.workers["w1"].kill()
    cluster.workers["w1"].wait(10)
    wait_for(lambda: process_gone(agent), 10, "the agent to end with its worker")


#: the start of a script run by :func:`_at_the_limit`: it enters the cgroup given as its argument
#: and sets the limit to what it holds, so that from there on no thread can be started
_AT_THE_LIMIT = """
import os, sys, threading
group = sys.argv[1]
with open(f"{group}/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
with open(f"{group}/pids.current") as f:
    current = f.read().strip()
with open(f"{group}/pids.max", "w") as f:
    f.write(current)
try:
    threading.Thread(target=lambda: None).start()
except RuntimeError:
    pass
else:
    sys.exit("a thread could be started: the limit is not in force")
"""


def _at_the_limit(script: str, group: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a new Python, after :data:`_AT_THE_LIMIT`, in ``group``."""
    return subprocess.run([sys.executable, "-c", _AT_THE_LIMIT + script, group], capture_output=True, text=True,
                          timeout=60)


_LISTENER = """
import logging, multiprocessing, time
import msgpack
from pyorchestrate_worker import child
from pyorchestrate_worker.lease_guard import LeaseGuard
child.setup_logging("agent probe", logging.INFO)  # its log thread cannot start either
from pyorchestrate_worker import stop_signals
import signal
stop_signals.request_on_signals(lambda: None)  # what a process agent asks first: its relay cannot start
print("default", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
class Agent:
    def stop(self):
        print("stopped", flush=True)
ours, theirs = multiprocessing.Pipe()
ours.send_bytes(msgpack.packb(["lease", time.monotonic() + 60, 1.0]))
ours.send_bytes(msgpack.packb(["stop"]))
ours.close()
child._listen(theirs, Agent(), LeaseGuard(0, lambda: None))  # at the pipe's end: worker_gone() exits
"""


def test_a_lease_guard_that_gets_no_thread_leaves_the_pipe_read(pids_group):
    """A process agent's pipe reader, told its first lease when no thread can be had: the stop
    after it still reaches the agent, and the worker's end still ends the process.  (And the
    relay for its own SIGTERM, which cannot start either, leaves SIGTERM its default.)  Before, the
    guard's thread start raised, and so did the warning about it (the log thread could not start):
    either ended the reader, and the agent ran on after its worker died."""
    done = _at_the_limit(_LISTENER, pids_group)
    from pyorchestrate_worker.child import WORKER_GONE

    assert done.stdout == "default True\nstopped\n" and done.returncode == WORKER_GONE, \
        (done.returncode, done.stdout, done.stderr)
    assert "could not start the thread that holds this process to its worker's lease" in done.stderr, done.stderr


_LOOKUP = """
from pyorchestrate_worker.resolver import Resolver
resolver = Resolver("tcp://localhost:5555")
ticket = resolver.refresh()  # its thread cannot start
print(resolver.answered(ticket), resolver.address(), resolver.error, flush=True)
with open(f"{group}/pids.max", "w") as f:
    f.write("max")
ticket = resolver.refresh()
print(resolver.wait(ticket, 30), resolver.address(), flush=True)
"""


def test_a_lookup_whose_thread_cannot_start_fails_and_the_next_one_runs(pids_group):
    """The worker's resolver (a host name as --coordinator): before, its thread was kept though not
    started, and raised, the error ended the worker's loop; kept, no lookup would ever have run."""
    done = _at_the_limit(_LOOKUP, pids_group)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("True None could not start the lookup thread"), first
    assert second == "True tcp://127.0.0.1:5555", second
