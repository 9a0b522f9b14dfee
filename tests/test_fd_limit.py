"""A coordinator and a worker started under a low soft open-files limit (1,024 is most Linux
systems' default) raise it to the hard limit (pyorchestrate/fd_limit.py): real processes, a real
stranger holding idle TCP connections, real process agents."""

from __future__ import annotations

import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agents import ForeverProcess
from conftest import start_daemon, wait_for

from pyorchestrate import ControlClient

SOFT = 128  # far below what the test needs, far below every hard limit it runs under

_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
pytestmark = pytest.mark.skipif(_hard != resource.RLIM_INFINITY and _hard < 4096,
                                reason=f"the hard open-files limit here ({_hard}) leaves nothing to raise to")


def _under_soft_limit(*argv: str) -> list[str]:
    """A Python command that runs ``argv`` (a script, or ``-m module ...``) with a soft limit of SOFT."""
    run = ("name = sys.argv[2]; del sys.argv[1:3]; runpy.run_module(name, run_name='__main__', alter_sys=True)"
           if argv[0] == "-m" else "path = sys.argv.pop(1); runpy.run_path(path, run_name='__main__')")
    return [sys.executable, "-c",
            "import resource, runpy, sys\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({SOFT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
            + run, *argv]


COORDINATOR = """
import resource, sys
from pyorchestrate import Orchestrator, RunMode
orch = Orchestrator("fd", config=Orchestrator.Config(address="tcp://127.0.0.1:*", run_mode=RunMode.DAEMON,
                                                       log_level="WARNING"))
orch.start()
print(orch.address, orch.events_address, resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
sys.stdin.read()  # until the test closes it
orch.stop(timeout=5)
"""


def test_a_strangers_idle_connections_do_not_lock_commands_out(tmp_path: Path) -> None:
    # the break: with the soft limit at 200, 300 idle connections (no handshake: a stranger
    # needs no key for that) took every descriptor; libzmq's listener then failed each accept
    # and retried at once (the coordinator at 107 % CPU), and `pyorchestrate status` found no
    # coordinator until the stranger let go
    script = tmp_path / "coordinator.py"
    script.write_text(COORDINATOR)
    proc = subprocess.Popen(_under_soft_limit(str(script)), cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    stranger: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert select.select([proc.stdout], [], [], 60)[0], "the coordinator did not start within 60 s"
        address, events_address, soft = proc.stdout.readline().split()
        assert int(soft) > SOFT
        for _ in range(150):
            for where in (address, events_address):
                host, port = where.removeprefix("tcp://").rsplit(":", 1)
                stranger.append(socket.create_connection((host, int(port)), timeout=10))
        with ControlClient(address, timeout=20) as client:
            assert client.status()["workers"]["total"] == 0
    finally:
        for s in stranger:
            s.close()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_a_worker_runs_more_process_agents_than_its_soft_limit_allows(cluster, tmp_path: Path) -> None:
    # the break: each process agent holds about four of its worker's descriptors; under a soft
    # limit of 60, 2 of 40 ran and 38 failed with "Too many open files"
    orch, events = start_daemon(cluster)
    log = open(tmp_path / "low.log", "ab")
    cwd = tmp_path / "worker-low"
    cwd.mkdir()
    cluster.workers["low"] = subprocess.Popen(
        _under_soft_limit("-m", "pyorchestrate_worker", "--coordinator", orch.address, "--name", "low"),
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    events.wait("WORKER_JOINED", "low", timeout=30)
    n = 40
    for i in range(n):
        orch.register_agent(ForeverProcess, f"p{i}")
    wait_for(lambda: len(events.of("AGENT_READY")) + len(events.of("AGENT_ERROR")) >= n, 120,
             f"{n} process agents READY or failed")
    time.sleep(0.5)  # an error just after a READY
    assert events.of("AGENT_ERROR") == []
    assert len(events.of("AGENT_READY")) == n


def test_the_raise_never_lowers_and_says_what_it_did() -> None:
    # in a child process: the limit is process-wide
    code = """
import resource
from pyorchestrate import fd_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
assert fd_limit.raise_open_files_limit("test") == (128, hard if hard != resource.RLIM_INFINITY else 1 << 20)
assert fd_limit.raise_open_files_limit("test") is None  # already at the top: nothing to do
assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
files = fd_limit.open_files()
assert files is not None and 0 < files["open"] < files["limit"]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
