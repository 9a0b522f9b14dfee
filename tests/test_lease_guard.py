"""worker/lease_guard.py: a child process's own end of its stopped worker's lease.  A real process
(``sleep``) stands for the worker, stopped and resumed with real signals; no socket."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from conftest import wait_for

from pyorchestrate_worker import clock
from pyorchestrate.agents import LoopingThreadAgent
from pyorchestrate_worker.lease_guard import POLL, Lease, LeaseGuard


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


class _Cycles(LoopingThreadAgent):
    def setup(self):
        self.cycles = 0

    def cycle(self):
        self.cycles += 1
        self.wait_stop(0.01)


def test_a_looping_agent_begins_no_cycle_past_its_lease_until_it_is_renewed_or_the_agent_stopped():
    """The agent's side (BaseAgent._may_go_on): past the lease as last told and the agent's stop
    timeout (when its replacement may start), no cycle begins; a renewal lets the cycles go on, a
    stop ends the agent without one more.  Within the stop timeout they go on (a busy worker passes
    renewals on late: no pause for that)."""
    lease = Lease()
    agent = _Cycles("a")
    agent._lease = lease
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        wait_for(lambda: getattr(agent, "cycles", 0) >= 3, 5, "cycles under no lease told")
        lease.until = clock.now() - 100.0  # over: as a process thawed after its lease sees it
        time.sleep(0.3)  # a cycle that had begun ends
        held = agent.cycles
        time.sleep(0.3)
        assert agent.cycles == held, "cycles went on past the lease"
        lease.until = clock.now() + 60.0  # renewed: the worker's loop had an echo it had not read
        wait_for(lambda: agent.cycles > held + 3, 5, "cycles once the lease is renewed")
        lease.until = clock.now() - 1.0  # over, but not its stop timeout (10 s): no replacement yet
        held = agent.cycles
        wait_for(lambda: agent.cycles > held + 3, 5, "cycles within the stop timeout after the lease")
        lease.until = clock.now() - 100.0
        time.sleep(0.1)
        held = agent.cycles
        agent.stop()  # what the worker does once it sees the lease over
        thread.join(5)
        assert not thread.is_alive() and agent.cycles == held
    finally:
        agent.stop()
        thread.join(5)


def test_periodic_pool_triggered_and_deferred_agents_hold_at_a_lease_that_is_over():
    """Every loop of a behaviour looks at the lease before it begins more work."""
    from pyorchestrate.agents import DeferredThreadAgent, PeriodicThreadAgent, PoolThreadAgent, TriggeredThreadAgent

    ran = []

    class Periodic(PeriodicThreadAgent):
        def runner(self):
            ran.append("periodic")

    class Pool(PoolThreadAgent):
        def runner(self):
            ran.append("pool")

    class Deferred(DeferredThreadAgent):
        def execute(self):
            ran.append("deferred")

    class Triggered(TriggeredThreadAgent):
        def execute(self, payload):
            ran.append("triggered")

    over = Lease()
    over.until = clock.now() - 100.0
    agents = [Periodic("p", Periodic.Config(execution_interval=0.01)), Pool("q", Pool.Config(execution_interval=0.01)),
              Deferred("d", Deferred.Config(delay=0.01)), Triggered("t")]
    threads = []
    for agent in agents:
        agent._lease = over
        threads.append(threading.Thread(target=agent.run))
        threads[-1].start()
    agents[3].deliver("trigger", {"n": 1})  # delivered while its lease is over: not acted on
    time.sleep(0.3)
    assert ran == []
    for agent in agents:
        agent.stop()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert ran == [] and agents[2]._not_run and agents[3]._not_run


def test_a_recovery_agent_tries_no_more_past_its_lease_and_fails_with_its_last_try():
    from pyorchestrate.agents import RecoveryThreadAgent

    tries = []

    class Flaky(RecoveryThreadAgent):
        def execute(self):
            tries.append(clock.now())
            raise RuntimeError(f"try {len(tries)}")

    lease = Lease()
    agent = Flaky("r", Flaky.Config(max_retries=50, backoff=(0.05, 0.05, 0.0)))
    agent._lease = lease
    result = []
    thread = threading.Thread(target=lambda: result.append(agent.run()))
    thread.start()
    try:
        wait_for(lambda: len(tries) >= 2, 5, "two tries under the lease")
        lease.until = clock.now() - 100.0
        time.sleep(0.1)
        held = len(tries)
        time.sleep(0.3)
        assert len(tries) == held, "it tried again past its lease"
        agent.stop()
        thread.join(5)
        assert result == [False] and len(tries) == held  # failed, with no try after the stop
    finally:
        agent.stop()
        thread.join(5)
