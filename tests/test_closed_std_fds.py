"""A worker started with stdin, stdout and stderr closed (``<&- >&- 2>&-``: a daemon helper, an init
script) works as any other (worker/std_fds.py).  Before, its own pipes took descriptors 1 and 2:
log lines and SIGUSR1's stacks went into the pipe that carries SIGTERM to its stop thread, and a
clean SIGTERM stop ended with exit status 1 (``sys.stdout`` was None)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agents import Forever, ForeverProcess
from conftest import EventLog

from pyorchestrate import RunMode


def test_a_worker_with_its_standard_descriptors_closed_runs_and_stops_cleanly(cluster):
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON)
    events = EventLog(orch)
    orch.start()
    worker = subprocess.Popen(f"exec {sys.executable} -m pyorchestrate_worker --coordinator {orch.address} --name w1 "
                              "<&- >&- 2>&-", shell=True, start_new_session=True, cwd=cluster.tmp)  # noqa: S602
    try:
        events.wait("WORKER_JOINED", "w1", timeout=30)
        orch.register_agent(Forever, "t")
        orch.register_agent(ForeverProcess, "p", ForeverProcess.Config(pid_file=str(cluster.tmp / "p.pid")))
        events.wait("AGENT_READY", "t", timeout=30)
        events.wait("AGENT_READY", "p", timeout=30)
        agent = int((cluster.tmp / "p.pid").read_text())
        for pid in (worker.pid, agent):  # and so the forkserver's between them: its children's streams
            assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == [os.devnull] * 3, pid
        os.kill(worker.pid, signal.SIGUSR1)  # its stacks go to /dev/null, and nothing else happens
        time.sleep(1.0)
        assert worker.poll() is None and not events.of("WORKER_LEFT") and not events.of("AGENT_TERMINATED")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        for name in ("t", "p"):
            events.wait("AGENT_TERMINATED", name, timeout=10)
        ends = {e["agent_name"]: e["ok"] for e in events.of("AGENT_TERMINATED")}
        assert ends == {"t": True, "p": True} and not events.of("AGENT_ERROR"), events.events
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
