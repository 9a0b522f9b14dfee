"""Worker processes the orchestrator starts itself when no address is configured."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("pyorchestrate.local_workers")

MAX_NICE = 19  #: the lowest CPU priority a worker may take (``pyorchestrate-worker --nice``)


def check_nice(nice: object) -> int:
    """``nice`` as a whole number from 0 to 19, or ValueError saying what is wrong (the worker's
    ``--nice`` and ``Config.local_worker_nice``)."""
    if not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= MAX_NICE:
        raise ValueError(f"nice must be a whole number from 0 (normal priority) to {MAX_NICE} (lowest), got {nice!r}")
    return nice


class LocalWorkers:
    """``count`` ``pyorchestrate-worker`` processes on loopback; they exit with their parent."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, count: int, coordinator: str, prefix: str, log_level: str, keys: list[str] = (),
              nice: int = 0) -> list[str]:
        """``keys``: the worker's key options (``--keys DIR --key-name NAME``), if the coordinator uses keys;
        ``nice``: the priority they give up (``pyorchestrate-worker --nice``)."""
        names = []
        for i in range(count):
            name = f"{prefix}-local-{i + 1}"
            cmd = [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", coordinator, "--name", name,
                   "--parent-pid", str(os.getpid()), "--log-level", log_level, "--agent-logs", "bus",
                   "--nice", str(nice), *keys]
            # a session of their own: a Ctrl-C at the terminal reaches the coordinator, which stops
            # them in order, rather than killing them under their agents
            self.processes.append(subprocess.Popen(cmd, start_new_session=True))
            names.append(name)
        return names

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("local worker %d did not stop within %.0f s: killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(5)
        self.processes.clear()
