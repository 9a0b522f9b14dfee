"""worker/lease_guard.py: a child process's own end of its stopped worker's lease.  A real process
(``sleep``) stands for the worker, stopped and resumed with real signals; no socket."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from conftest import wait_for

from pyorchestrate_worker import clock
from pyorchestrate_worker.lease_guard import POLL, LeaseGuard


def test_it_stops_only_when_the_worker_is_stopped_past_its_lease_and_ends_only_if_allowed():
    worker = subprocess.Popen(["sleep", "60"])
    stopped = threading.Event()
    guard = LeaseGuard(worker.pid, stopped.set, may_end=lambda: False)  # kept agents run here
    try:
        guard.renewed(clock.now() - 1.0, stop_timeout=0.2)  # its lease is over, but it runs
        time.sleep(10 * POLL)
        assert not stopped.is_set(), "a worker that runs (busy, cut off) acts itself"
        worker.send_signal(signal.SIGSTOP)
        guard.renewed(clock.now() + 0.5, stop_timeout=0.2)  # stopped, within its lease
        time.sleep(0.3)
        assert not stopped.is_set(), "stopped for less than its lease: nothing to do yet"
        wait_for(stopped.is_set, 5, "the stop at the lease")
        time.sleep(0.2 + 4 * POLL)  # past the stop timeout: may_end says no, so this process lives on
        # the worker is back and holds a lease again (new agents may run here): stopped past
        # that one too, the guard acts again
        stopped.clear()
        worker.send_signal(signal.SIGCONT)
        guard.renewed(clock.now() + 0.3, stop_timeout=0.2)
        time.sleep(0.2)
        worker.send_signal(signal.SIGSTOP)
        wait_for(stopped.is_set, 5, "the stop at the next lease")
    finally:
        worker.send_signal(signal.SIGCONT)
        worker.kill()
        worker.wait(5)
