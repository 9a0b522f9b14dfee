"""A thread agent that ignores its stop past the lease's end and its stop timeout ends all the same
(worker/reexec.py): its worker starts again in its own place, since no thread can be killed.

Its coordinator here is a real script, SIGSTOPped: to the worker that is a coordinator gone silent,
as in a partition.  The lease runs out 0.5 s later, the worker stops the agent, and the agent
lingers in ``on_stop`` for 30 s.  Its replacement is due elsewhere at lease + ``stop_timeout`` +
0.2 s: the copy must be gone by then.  Before, it wrote its "alive" lines for the whole 30 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import free_port, process_gone, wait_for

from pyorchestrate.keys import KeyDir

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from agents import CopyTracer, SpawnerThread, ThreadLeaver, Traced
from pyorchestrate import Orchestrator, RunMode

o = Orchestrator("stuck", address={address!r}, run_mode=RunMode.DAEMON, min_workers=1, heartbeat_interval=0.1,
                 heartbeat_liveness=5, keys={keys!r})
if {stuck!r}:
    o.register_agent(CopyTracer, "stuck", CopyTracer.Config(trace={trace!r}, linger=30.0, stop_timeout=1.0,
                                                            chdir={chdir!r}),
                     restart="always", worker="w1")
if {spawner!r}:
    o.register_agent(SpawnerThread, "spawner", SpawnerThread.Config(pid_file={spawner!r}, deaf={stuck!r},
                                                                    stop_timeout=1.0),
                     restart="always", worker="w1")
if {leaver!r}:
    o.register_agent(ThreadLeaver, "leaver", ThreadLeaver.Config(trace={trace!r}, stop_timeout=1.0,
                                                                 join_on_stop={leaver!r} == "join"),
                     restart="always", worker="w1")
{kept}
o.start()
for _ in range(240):  # what each worker dropped, as the coordinator knows it (for the test to read)
    time.sleep(0.5)
    with open({status!r} + ".tmp", "w") as f:
        json.dump({{name: w["dropped"] for name, w in o.status()["workers"].items()}}, f)
    os.replace({status!r} + ".tmp", {status!r})
"""


def run_script(tmp_path, kept: bool, keys: str | None = None, chdir: str = "",
               spawner: str = "", stuck: bool = True, leaver: str = "") -> tuple[subprocess.Popen, str]:
    address = f"tcp://127.0.0.1:{free_port()}"
    path = tmp_path / "coordinator.py"
    kept_line = (f"o.register_agent(Traced, 'kept', Traced.Config(trace={str(tmp_path / 'kept.txt')!r}), worker='w1')"
                 if kept else "")
    path.write_text(SCRIPT.format(tests=TESTS, address=address, trace=str(tmp_path / "trace.txt"), kept=kept_line,
                                keys=keys, chdir=chdir, spawner=spawner, stuck=stuck, leaver=leaver,
                                status=str(tmp_path / "dropped.json")))
    log = open(tmp_path / "coordinator.log", "w")
    return subprocess.Popen([sys.executable, str(path)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT), address


def alive_times(tmp_path, copy: str) -> list[float]:
    lines = (tmp_path / "trace.txt").read_text().splitlines()
    return [float(line.split()[2]) for line in lines if line.startswith(f"alive {copy} ")]


def copies(tmp_path) -> list[str]:
    """The copies that started so far, in order."""
    path = tmp_path / "trace.txt"
    return [line.split()[1] for line in path.read_text().splitlines() if line.startswith("start")] if path.exists() else []


def dropped(tmp_path) -> dict[str, int]:
    """What the coordinator says worker w1 dropped, as its script last wrote it."""
    path = tmp_path / "dropped.json"
    return json.loads(path.read_text()).get("w1", {}) if path.exists() else {}


def first_copy(tmp_path) -> str:
    starts = copies(tmp_path)
    return starts[0] if starts else ""


def test_a_thread_agent_stuck_past_the_lease_ends_with_its_worker_starting_again(cluster, tmp_path):
    script, address = run_script(tmp_path, kept=False)
    the_copy_ends_and_its_worker_comes_back(cluster, tmp_path, script, address)


def test_the_worker_starts_again_where_it_started_whatever_directory_an_agent_moved_it_to(cluster, tmp_path):
    """An agent made another directory the process's working directory (as data jobs do). The
    worker was started with ``--keys ../keys``, a path relative to where it was started: started
    again from the agent's directory, it found no keys and ended, its agents never back."""
    KeyDir(tmp_path / "keys").init()
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    script, address = run_script(tmp_path, kept=False, keys=str(tmp_path / "keys"), chdir=str(elsewhere))
    the_copy_ends_and_its_worker_comes_back(cluster, tmp_path, script, address, "--keys", "../keys")


def test_what_a_stuck_thread_agent_started_ends_as_its_worker_starts_again(cluster, tmp_path):
    """The exec ends threads, not processes: those a thread agent started (in the worker's process
    group) ran on beside the copies started elsewhere (worker/group_guard.py).  Here a second
    thread agent ignores its stop too, having left a ``Popen`` and a shell's job running."""
    pid_file = tmp_path / "spawner.pids"
    script, address = run_script(tmp_path, kept=False, spawner=str(pid_file))
    pids: list[int] = []
    try:
        the_copy_ends_and_its_worker_comes_back(cluster, tmp_path, script, address, spawned=pids)
        assert "2 process(es) that thread agents started still run as this worker starts again" in cluster.log_of("w1")
    finally:
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_what_thread_agents_left_running_ends_once_the_lease_ran_out_and_none_runs(cluster, tmp_path):
    """A thread agent stopped at the lease's end stops as asked, but leaves a ``Popen`` and a
    shell's job running, which ran on beside the copy started elsewhere.  No thread agent runs in
    the worker after it: they end, and the worker carries on without an exec."""
    pid_file = tmp_path / "spawner.pids"
    script, address = run_script(tmp_path, kept=False, spawner=str(pid_file), stuck=False)
    pids: list[int] = []
    try:
        worker = cluster.worker(address, "w1")
        wait_for(pid_file.exists, 60, "the spawner's pids")
        pids += [int(p) for p in pid_file.read_text().split()]
        assert all(not process_gone(pid) for pid in pids)
        script.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_for(lambda: all(map(process_gone, pids)), 30, "what the thread agent left running to end")
            # lease 0.5 s + stop_timeout 1 s, with room for a busy machine; before: never
            assert time.monotonic() - stopped_at < 4.0
            # said before they were signalled, but written by the worker's log thread: maybe later
            wait_for(lambda: "2 process(es) that thread agents started still run as this worker lost its lease"
                     in cluster.log_of("w1"), 10, "the worker saying so")
            assert "starts again" not in cluster.log_of("w1") and worker.poll() is None
        finally:
            script.send_signal(signal.SIGCONT)
    finally:
        script.kill()
        script.wait(10)
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_thread_that_a_thread_agent_left_running_ends_when_its_replacement_is_due(cluster, tmp_path):
    """A thread agent that started a thread of its own stops as asked at the lease's end, but
    leaves that thread running: it went on doing the agent's work beside the copy started
    elsewhere (5 s after the coordinator went silent, and for ever: threads cannot be killed).
    It now ends when that copy is due (the lease, 0.5 s, and the agent's stop timeout, 1 s), as
    its worker starts again in its own place."""
    script, address = run_script(tmp_path, kept=False, stuck=False, leaver="leave")
    # its end, reported while the coordinator was silent, was lost with the exec: counted now
    the_copy_ends_and_its_worker_comes_back(cluster, tmp_path, script, address, thread="-helper",
                                            lost="report_lost_in_exec")
    assert "started again in its own place (exec); the process before dropped" in cluster.log_of("w1")
    assert (f"1 thread(s) that thread agents started and left running (helper-{first_copy(tmp_path)}) still run "
            "past the lease") in cluster.log_of("w1")


def test_a_thread_agent_that_ends_its_threads_as_it_stops_costs_its_worker_nothing(cluster, tmp_path):
    """The same agent, ending its thread as it stops: no exec."""
    script, address = run_script(tmp_path, kept=False, stuck=False, leaver="join")
    try:
        worker = cluster.worker(address, "w1")
        copy = wait_for(lambda: first_copy(tmp_path), 60, "the agent's first copy")
        wait_for(lambda: len(alive_times(tmp_path, copy + "-helper")) >= 3, 30, "its thread at work")
        script.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        try:
            wait_for(lambda: "lease ran out" in cluster.log_of("w1"), 15, "the lease to run out")
            time.sleep(3.0)  # past the replacement's time (lease 0.5 s + stop timeout 1 s)
            assert max(alive_times(tmp_path, copy + "-helper")) < stopped_at + 4.0
            assert "starts again" not in cluster.log_of("w1") and worker.poll() is None
        finally:
            script.send_signal(signal.SIGCONT)
    finally:
        script.kill()
        script.wait(10)


def test_threads_left_running_beside_a_kept_agent_are_only_said(cluster, tmp_path):
    """The threads left running may be the kept agent's (on_disconnect="keep"), which ending them
    would break: the worker says so and ends nothing."""
    script, address = run_script(tmp_path, kept=True, stuck=False, leaver="leave")
    try:
        worker = cluster.worker(address, "w1")
        copy = wait_for(lambda: first_copy(tmp_path), 60, "the agent's first copy")
        wait_for(lambda: (tmp_path / "kept.txt").exists() and len(alive_times(tmp_path, copy + "-helper")) >= 3, 30,
                 "both at work")
        script.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: "keep running (on_disconnect='keep') too" in cluster.log_of("w1"), 15, "the worker saying so")
            assert f"1 thread(s) that thread agents started (helper-{copy}) still run" in cluster.log_of("w1")
            assert "starts again" not in cluster.log_of("w1") and worker.poll() is None
            assert "close kept" not in (tmp_path / "kept.txt").read_text()
        finally:
            script.send_signal(signal.SIGCONT)
    finally:
        script.kill()
        script.wait(10)


def the_copy_ends_and_its_worker_comes_back(cluster, tmp_path, script: subprocess.Popen, address: str,
                                             *worker_args: str, spawned: list[int] | None = None,
                                             thread: str = "", lost: str = "") -> None:
    """``thread``: the suffix of the copy's trace lines to follow ("-helper": a thread it started);
    ``lost``: a kind of drop the coordinator must hear of from the worker started again."""
    try:
        worker = cluster.worker(address, "w1", *worker_args)
        copy = wait_for(lambda: first_copy(tmp_path), 60, "the agent's first copy")
        wait_for(lambda: len(alive_times(tmp_path, copy + thread)) >= 3, 30, "the copy at work")
        if spawned is not None:
            pid_file = tmp_path / "spawner.pids"
            wait_for(pid_file.exists, 30, "the spawner's pids")
            spawned += [int(p) for p in pid_file.read_text().split()]
            assert [not process_gone(pid) for pid in spawned] == [True, True]
        script.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        try:
            time.sleep(6.0)
            last = max(alive_times(tmp_path, copy + thread))
            # lease 0.5 s + stop_timeout 1 s, with room for a busy machine: not the 30 s it lingers
            assert last < stopped_at + 4.0, (last - stopped_at, cluster.log_of("w1")[-2000:])
            assert "this worker starts again (exec)" in cluster.log_of("w1")
            assert worker.poll() is None  # the same process, started again in its own place
            if spawned is not None:  # gone before the exec: before the copies elsewhere were due
                assert [not process_gone(pid) for pid in spawned] == [False, False]
        finally:
            script.send_signal(signal.SIGCONT)
        # the new worker registers with the resumed coordinator, which starts the agent again on it
        wait_for(lambda: len(copies(tmp_path)) >= 2, 60, "the agent started again")
        if lost:
            wait_for(lambda: dropped(tmp_path).get(lost, 0) >= 1, 30, f"the coordinator counting {lost}")
    finally:
        script.kill()
        script.wait(10)


def test_a_worker_that_also_runs_a_kept_agent_says_so_and_keeps_running(cluster, tmp_path):
    """Starting again would end the kept agent too (on_disconnect="keep", restart="never"): the
    worker says why it cannot, and the kept agent runs on."""
    script, address = run_script(tmp_path, kept=True)
    try:
        worker = cluster.worker(address, "w1")
        copy = wait_for(lambda: first_copy(tmp_path), 60, "the agent's first copy")
        wait_for(lambda: (tmp_path / "kept.txt").exists() and len(alive_times(tmp_path, copy)) >= 3, 30, "both at work")
        script.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: "keep running (on_disconnect='keep') too" in cluster.log_of("w1"), 15, "the worker saying so")
            assert "this worker starts again" not in cluster.log_of("w1") and worker.poll() is None
            assert "close kept" not in (tmp_path / "kept.txt").read_text()
        finally:
            script.send_signal(signal.SIGCONT)
    finally:
        script.kill()
        script.wait(10)
