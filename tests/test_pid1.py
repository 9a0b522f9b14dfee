"""A worker that is its PID namespace's init (a container's only process: Kubernetes, ``docker run``
without ``--init``) reaps the orphans its agents leave: every process whose parent ends is handed to
it, and a zombie that nobody reaps holds its pid for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from agents import OrphanMaker
from conftest import _processes, live_children, start_daemon, wait_for


def _pid_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _pid_namespaces(), reason="needs unshare --pid (root, util-linux)")


@pytest.mark.parametrize(("end", "code"), [("sys.exit(3)", 3), ("os.kill(os.getpid(), signal.SIGKILL)", 128 + 9)])
def test_pid_1_ends_with_the_workers_exit_status(end, code):
    """As a shell says it: a signal's number plus 128 (what a container runtime reports)."""
    script = f"import os, signal, sys\nfrom pyorchestrate_worker import init\ninit.reap_if_init()\n{end}\n"
    assert subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
                          timeout=60).returncode == code


def test_a_worker_as_pid_1_reaps_its_agents_orphans_and_takes_its_signals(cluster, tmp_path):
    orch, events = start_daemon(cluster)
    log = open(tmp_path / "w1.log", "ab")
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
                                "pyorchestrate_worker", "--coordinator", orch.address, "--name", "w1"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        events.wait("WORKER_JOINED", "w1", timeout=30)
        init = wait_for(lambda: live_children(unshare.pid), 10, "PID 1")[0]
        orch.register_agent(OrphanMaker, "o", worker="w1")
        events.wait("AGENT_READY", "o", timeout=30)
        time.sleep(3)

        def zombies() -> set[int]:
            return {p for p, state, parent, _ in _processes() if parent == init and state == "Z"}

        # one that just ended may not be reaped yet on a busy machine; none may stay (before, all 20 did)
        first = zombies()
        time.sleep(1.0)
        assert first & zombies() == set()
        # what is sent to PID 1 is the worker's: SIGUSR1 its stacks, SIGTERM its graceful stop
        os.kill(init, signal.SIGUSR1)
        wait_for(lambda: " in _serve" in (tmp_path / "w1.log").read_text(errors="replace"), 10, "the stacks")
        os.kill(init, signal.SIGTERM)
        assert unshare.wait(30) == 0
        assert events.wait("WORKER_LEFT", "w1", timeout=10)
        assert [e["event"] for e in events.events if e.get("agent_name") == "o"][-1] == "AGENT_TERMINATED"
        assert not events.of("WORKER_LOST") and not events.of("AGENT_ERROR")
    finally:
        if unshare.poll() is None:
            os.killpg(unshare.pid, signal.SIGKILL)  # the namespace's processes die with its PID 1
            unshare.wait(10)
        log.close()
