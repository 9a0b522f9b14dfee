"""What a process agent starts and leaves running ends with it, before its end is told (the
coordinator may start the agent again elsewhere on that word): real workers, real agents that
leave a ``Popen`` and a shell's background job behind (worker/child.py, ``end_strays``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from agents import Forever, ForeverProcess, Forker, ForkerThread, Spawner, SpawnerThread
from conftest import start_daemon, wait_for

from pyorchestrate import OrchestratorEvent
from pyorchestrate_worker.pulse import worker_state


def _running(pid: int) -> bool:
    """Is ``pid`` a process that still runs (a zombie does not: it waits only to be reaped)?"""
    return worker_state(pid) not in (None, "Z", "X")


@pytest.fixture
def strays():
    """The pids of the strays of a test; any still running at its end is killed (a failing test
    must not leave them: they are nobody's children)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _spawned(cluster, tmp_path: Path, strays: list[int], **config) -> tuple:
    """A DAEMON orchestrator, worker w1, and a READY Spawner "s" whose two strays run (their pids
    added to ``strays``); with the strays' state recorded as each AGENT_TERMINATED callback runs."""
    orch, events = start_daemon(cluster, ("w1",))
    at_end: list[list[bool]] = []
    lock = threading.Lock()

    def on_end(agent_name: str) -> None:
        with lock:
            at_end.append([_running(pid) for pid in strays])

    orch.register_event(OrchestratorEvent.AGENT_TERMINATED, on_end)
    pid_file = tmp_path / "spawner.pids"
    orch.register_agent(Spawner, "s", Spawner.Config(pid_file=str(pid_file), **config))
    events.wait("AGENT_READY", "s", timeout=30)
    wait_for(pid_file.exists, 10, "the spawner's pids")
    popen, job, agent = (int(line) for line in pid_file.read_text().split())
    with lock:
        strays.extend((popen, job))
    assert _running(popen) and _running(job) and _running(agent)
    assert os.getpgid(popen) == os.getpgid(job) == agent  # in the agent's group, not the worker's
    return orch, events, at_end


def test_a_stopped_process_agent_ends_what_it_started_before_its_end_is_told(cluster, tmp_path, strays) -> None:
    # the break: both processes ran on after the agent's AGENT_TERMINATED (the coordinator's
    # word that it may start the agent again elsewhere), for ever
    orch, events, at_end = _spawned(cluster, tmp_path, strays)
    orch.stop_agent("s")
    events.wait("AGENT_TERMINATED", "s", timeout=30)
    wait_for(lambda: at_end, 10, "the TERMINATED callback")
    assert at_end == [[False, False]]
    assert events.of("AGENT_ERROR", "s") == []


def test_strays_that_ignore_sigterm_are_killed_before_the_end_is_told(cluster, tmp_path, strays) -> None:
    orch, events, at_end = _spawned(cluster, tmp_path, strays, stubborn=True)
    orch.stop_agent("s")
    events.wait("AGENT_TERMINATED", "s", timeout=30)
    wait_for(lambda: at_end, 10, "the TERMINATED callback")
    assert at_end == [[False, False]]


def test_an_agent_killed_for_ignoring_its_stop_takes_its_strays_with_it(cluster, tmp_path, strays) -> None:
    # the worker terminates a process agent past its stop timeout: its SIGTERM and SIGKILL
    # went to the agent's process alone, and what it started ran on
    orch, events, at_end = _spawned(cluster, tmp_path, strays, deaf=True, stubborn=True)
    orch.stop_agent("s", timeout=0.5)
    events.wait("AGENT_TERMINATED", "s", timeout=30)
    wait_for(lambda: at_end, 10, "the TERMINATED callback")
    assert at_end == [[False, False]]


def test_strays_end_with_a_worker_that_dies(cluster, tmp_path, strays) -> None:
    # the worker is SIGKILLed: its agent's process ends at once (child.worker_gone), as the
    # coordinator, seeing the connection close, starts the agent elsewhere; its strays ran on
    orch, events, _ = _spawned(cluster, tmp_path, strays)
    os.kill(cluster.workers["w1"].pid, signal.SIGKILL)
    events.wait("WORKER_LOST", "w1", timeout=30)
    wait_for(lambda: not any(map(_running, strays)), 10, "the strays to end")


@pytest.mark.parametrize("where", ["process", "host"])
def test_an_agent_process_that_dies_beside_a_forked_helper_is_reported_at_once(cluster, tmp_path, strays, where):
    # the break: the helper holds the agent's end of the worker's pipe, so the pipe never closed
    # when the agent's process (a process agent's, or the agent host of a thread agent) was
    # SIGKILLed (the OOM killer's way): the worker never reported it, and the coordinator
    # counted it running for as long as the helper lived
    orch, events = start_daemon(cluster, ("w1", "--threads-per-process", "1"))
    if where == "host":  # the first thread agent runs in the worker, the next in an agent host
        orch.register_agent(Forever, "filler")
        events.wait("AGENT_READY", "filler", timeout=30)
    pid_file = tmp_path / "forker.pids"
    cls = Forker if where == "process" else ForkerThread
    orch.register_agent(cls, "f", cls.Config(pid_file=str(pid_file)))
    events.wait("AGENT_READY", "f", timeout=30)
    wait_for(pid_file.exists, 10, "the forker's pids")
    helper, agent = (int(line) for line in pid_file.read_text().split())
    strays.append(helper)
    assert _running(helper)
    os.kill(agent, signal.SIGKILL)
    ended = events.wait("AGENT_TERMINATED", "f", timeout=15)
    assert not ended[0]["ok"] and "killed by signal 9" in events.of("AGENT_ERROR", "f")[0]["error_message"]
    assert not _running(helper)  # in the agent's group: killed before the end was told
    assert not events.of("AGENT_TERMINATED", "filler")  # the worker and its own agents live on


def test_a_stopped_workers_agent_that_ignores_its_lease_takes_its_strays_with_it(cluster, tmp_path, strays):
    # the worker is SIGSTOPped past its lease: its process agent, deaf to the stop its lease
    # guard asks for, ends itself at its stop timeout (lease_guard.py), as the worker would have
    # killed it; its strays ran on beside the copy the coordinator started elsewhere
    orch, events = start_daemon(cluster, ("w1",), heartbeat_interval=0.1, heartbeat_liveness=5)
    pid_file = tmp_path / "spawner.pids"
    orch.register_agent(Spawner, "s", Spawner.Config(pid_file=str(pid_file), deaf=True, stubborn=True,
                                                     stop_timeout=1.0), restart="on-failure",
                        restart_backoff=(0.1, 0.5))
    events.wait("AGENT_READY", "s", timeout=30)
    wait_for(pid_file.exists, 10, "the spawner's pids")
    popen, job, agent = (int(line) for line in pid_file.read_text().split())
    strays.extend((popen, job, agent))
    cluster.worker(orch.address, "w2")
    events.wait("WORKER_JOINED", "w2")
    w1 = cluster.workers["w1"]
    w1.send_signal(signal.SIGSTOP)
    try:
        replaced = events.wait("AGENT_READY", "s", count=2, timeout=30)[-1]
        assert replaced["worker"] == "w2"
        assert [_running(pid) for pid in (popen, job, agent)] == [False, False, False]
    finally:
        w1.send_signal(signal.SIGCONT)
    wait_for(lambda: pid_file.read_text().split()[2] != str(agent), 10, "the second copy's pids")
    strays.extend(int(pid) for pid in pid_file.read_text().split())


def test_process_agents_end_with_their_worker_even_if_a_fork_of_it_lives(cluster, tmp_path, strays) -> None:
    # the break: a thread agent forks a helper, which is a copy of the worker holding the worker's
    # end of every process agent's pipe; the worker is SIGKILLed, the coordinator (its connection
    # closed) starts the agents elsewhere, and the process agent, its pipe never closed, ran on
    orch, events = start_daemon(cluster, ("w1",))
    forker_pids, process_pid = tmp_path / "forker.pids", tmp_path / "p.pid"
    orch.register_agent(ForeverProcess, "p", ForeverProcess.Config(pid_file=str(process_pid)))
    events.wait("AGENT_READY", "p", timeout=30)
    orch.register_agent(ForkerThread, "f", ForkerThread.Config(pid_file=str(forker_pids)))
    events.wait("AGENT_READY", "f", timeout=30)
    wait_for(lambda: forker_pids.exists() and process_pid.exists(), 10, "the pids")
    helper, worker = (int(line) for line in forker_pids.read_text().split())
    agent = int(process_pid.read_text())
    strays.extend((helper, agent))
    assert worker == cluster.workers["w1"].pid and _running(helper) and _running(agent)
    os.kill(worker, signal.SIGKILL)
    events.wait("WORKER_LOST", "w1", timeout=30)
    wait_for(lambda: not _running(agent), 10, "the process agent to end with its worker")


# ------------------------------------------------------------------ a thread agent's processes
# They are in the worker's process group (worker/group_guard.py), and end with the worker.


def _thread_spawner(cluster, tmp_path: Path, strays: list[int], workers: tuple, **config) -> tuple:
    """A DAEMON orchestrator with ``workers``, and a READY SpawnerThread "s" (restarted always);
    its copy's pids (added to ``strays``) and the name of its worker."""
    orch, events = start_daemon(cluster, *workers)
    pid_file = tmp_path / "spawner.pids"
    orch.register_agent(SpawnerThread, "s", SpawnerThread.Config(pid_file=str(pid_file), **config), restart="always",
                        restart_backoff=(0.1, 0.5))
    worker = events.wait("AGENT_READY", "s", timeout=30)[0]["worker"]
    wait_for(pid_file.exists, 10, "the spawner's pids")
    pids = [int(p) for p in pid_file.read_text().split()]
    strays.extend(pids)
    assert all(map(_running, pids))
    return orch, events, pids, worker


def test_a_thread_agents_processes_die_with_its_worker_and_only_the_new_copys_run(cluster, tmp_path, strays):
    # the break: the worker is SIGKILLed (the OOM killer's way); the coordinator, seeing the
    # connection close, starts the agent on w2 at once, and the first copy's processes (in the
    # dead worker's group: a Popen, a shell's job, a forked copy of the worker) ran on beside the
    # second copy's, for ever
    orch, events, first, host = _thread_spawner(cluster, tmp_path, strays, (("w1",), ("w2",)), fork=True,
                                                detached=True)
    worker = cluster.workers[host]
    assert [os.getpgid(pid) for pid in first[:3]] == [worker.pid] * 3
    worker.kill()
    wait_for(lambda: not any(map(_running, first[:3])), 10, "the dead worker's thread agent's processes to end")
    assert _running(first[3])  # it left the group (a session of its own): not followed, on purpose
    events.wait("AGENT_READY", "s", timeout=30, count=2)
    wait_for(lambda: len((tmp_path / "spawner.pids").read_text().splitlines()) == 2, 10, "the second copy's pids")
    second = [int(p) for p in (tmp_path / "spawner.pids").read_text().splitlines()[1].split()]
    strays.extend(second)
    assert all(map(_running, second)) and not any(map(_running, first[:3]))


def test_a_stopping_workers_thread_agent_processes_end_with_it(cluster, tmp_path, strays):
    # SIGTERM: the worker stops its agents and exits; what they left running ran on
    orch, events, pids, host = _thread_spawner(cluster, tmp_path, strays, (("w1",),))
    worker = cluster.workers[host]
    worker.terminate()
    assert worker.wait(30) == 0
    assert not any(map(_running, pids))
    assert "2 process(es) that thread agents started still run as this worker stops" in cluster.log_of(host)


def test_a_worker_that_does_not_lead_its_group_leaves_the_group_alone(cluster, tmp_path, strays):
    # its group is its starter's: a shell here, beside whose other job (a sleep) the worker runs.
    # Killing "the worker's group" would kill them
    orch, events = start_daemon(cluster)
    worker = [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", orch.address, "--name", "w1"]
    log = open(tmp_path / "w1.log", "ab")
    shell = subprocess.Popen(["sh", "-c", 'sleep 600 & echo $! > sibling; "$@"; wait', "sh", *worker], cwd=tmp_path,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        events.wait("WORKER_JOINED", "w1", timeout=30)
        sibling = int((tmp_path / "sibling").read_text())
        strays.append(sibling)
        pid_file = tmp_path / "spawner.pids"
        orch.register_agent(SpawnerThread, "s", SpawnerThread.Config(pid_file=str(pid_file)))
        events.wait("AGENT_READY", "s", timeout=30)
        wait_for(pid_file.exists, 10, "the spawner's pids")
        pids = [int(p) for p in pid_file.read_text().split()]
        strays.extend(pids)
        worker_pid = events.of("WORKER_JOINED", "w1")[0]["pid"]
        assert os.getpgid(worker_pid) == shell.pid != worker_pid
        wait_for(lambda: "does not lead its process group" in (tmp_path / "w1.log").read_text(), 10,
                 "the worker saying why it ends nothing")
        os.kill(worker_pid, signal.SIGKILL)
        events.wait("WORKER_LOST", "w1", timeout=30)
        time.sleep(0.5)  # what a guard would have done by now
        assert _running(sibling) and _running(shell.pid) and all(map(_running, pids))
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(10)
