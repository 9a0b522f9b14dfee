"""Agent hosts: a worker runs at most ``--threads-per-process`` thread agents in its own process
and the rest in host processes of as many each (worker/host.py).  Real worker, real hosts."""

from __future__ import annotations

import os
import re
import signal

from conftest import process_gone, start_daemon, wait_for

from pyorchestrate import LoopingThreadAgent, TriggeredThreadAgent


class Answers(TriggeredThreadAgent):
    """Waits for its trigger, then says which process ran it and what it was given."""

    def execute(self, payload):
        self.logger.info("pid=%d payload=%s", os.getpid(), payload)
        self.publish("answered", pid=os.getpid(), payload=payload)


class Lingers(LoopingThreadAgent):
    def setup(self):
        self.logger.info("pid=%d", os.getpid())

    def cycle(self):
        self.wait_stop(0.2)


def _pids(events, pattern=r"pid=(\d+)"):
    """agent name -> pid it logged."""
    return {e["agent_name"]: int(re.search(pattern, e["message"]).group(1))
            for e in events.of("AGENT_LOG") if re.search(pattern, e["message"])}


def _one_agent_per_process(cluster):
    """Agents a, b, c READY on w1 at --threads-per-process 1: a in the worker, b and c in hosts."""
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    for name in ("a", "b", "c"):
        orch.register_agent(Lingers, name)
    events.wait("AGENT_READY", count=3, timeout=30)
    wait_for(lambda: len(_pids(events)) == 3, 15, "every agent's pid")
    return orch, events, cluster.workers["w1"], _pids(events)


def test_thread_agents_beyond_the_limit_run_in_agent_hosts_and_get_what_is_sent_to_them(cluster):
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "2"))
    worker = cluster.workers["w1"]
    names = [f"a{i}" for i in range(5)]
    for name in names:
        orch.register_agent(Answers, name)
    events.wait("AGENT_READY", count=5, timeout=30)
    for i, name in enumerate(names):
        orch.trigger(name, {"n": i})
    terminated = events.wait("AGENT_TERMINATED", count=5, timeout=30)
    assert all(e["ok"] for e in terminated), terminated
    wait_for(lambda: len(_pids(events)) == 5, 15, "every agent's log line")
    pids = _pids(events)
    by_pid = {}
    for name, pid in pids.items():
        by_pid.setdefault(pid, []).append(name)
    # two in the worker's own process, the other three in two hosts (two, then one)
    assert len(by_pid.get(worker.pid, [])) == 2, by_pid
    assert sorted(len(v) for p, v in by_pid.items() if p != worker.pid) == [1, 2], by_pid
    # each got its own payload (deliveries reach the right slot), logs and events travel the bus
    payloads = {e["agent_name"]: e["message"].split("payload=")[1] for e in events.of("AGENT_LOG")
                if "payload=" in e["message"]}
    assert payloads == {name: str({"n": i}) for i, name in enumerate(names)}
    answered = {e["agent_name"]: e["data"]["pid"] for e in events.of("AGENT_EVENT")
                if e.get("topic") == "answered"}
    assert answered == pids
    # hosts with no agents left exit (and are reaped by the worker)
    for pid in by_pid:
        if pid != worker.pid:
            wait_for(lambda: process_gone(pid), 15, f"idle host {pid} to exit")
    assert orch.status()["lost_events"] == 0


def test_a_dead_host_fails_its_own_agents_only_and_stops_reach_hosted_agents(cluster):
    orch, events, worker, pids = _one_agent_per_process(cluster)
    assert pids["a"] == worker.pid and len({pids["a"], pids["b"], pids["c"]}) == 3, pids
    os.kill(pids["c"], signal.SIGKILL)
    error = events.wait("AGENT_ERROR", "c", timeout=15)[0]
    assert "host process" in error["error_message"] and "killed by signal 9" in error["error_message"], error
    assert events.wait("AGENT_TERMINATED", "c", timeout=15)[0]["ok"] is False
    orch.stop_agent("b")
    assert events.wait("AGENT_TERMINATED", "b", timeout=15)[0]["ok"] is True
    orch.stop_agent("a")
    assert events.wait("AGENT_TERMINATED", "a", timeout=15)[0]["ok"] is True
    assert not events.of("AGENT_ERROR", "a") and not events.of("AGENT_ERROR", "b")
    assert not events.of("WORKER_LOST")
    wait_for(lambda: process_gone(pids["b"]), 15, "b's host to exit once b ended")


def test_sigterm_stops_hosted_agents_gracefully_and_leaves_no_host_behind(cluster):
    orch, events, worker, pids = _one_agent_per_process(cluster)
    hosts = {pid for pid in pids.values() if pid != worker.pid}
    assert len(hosts) == 2
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    for name in ("a", "b", "c"):
        assert events.wait("AGENT_TERMINATED", name)[0]["ok"] is True
    assert not events.of("AGENT_ERROR") and not events.of("WORKER_LOST")
    for pid in hosts:  # the cluster fixture also checks the worker's session is empty
        wait_for(lambda: process_gone(pid), 15, f"host {pid} to exit")
