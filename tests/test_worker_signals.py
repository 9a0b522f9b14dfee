"""A worker stops on SIGTERM/SIGINT whatever its main thread is doing at that moment.

The main thread of a worker waits on its shutdown event many times a second. A handler that set
that event itself could land while the main thread held the event's lock, and wait for ever
(stop_signals.py). The spinner below does nothing but take that lock, as often as it can, and
gets one signal after another: with a handler calling ``Event.set()`` 11 of 20 single signals
hang such a process.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
from agents import (CopyTracer, CopyTracerProcess, Forever, ForeverTracedProcess, HelperThread, LateJob, SlowGoodbye,
                    SlowJob, StuckTalker)
from conftest import DETECT, EventLog, process_gone, wait_for

from pyorchestrate import OrchestratorEvent, RunMode

ROUNDS = 20  # at 11 hangs in 20, all 20 would pass with the old handler once in ~10^7 runs

SPINNER = f"""
import threading, sys
from pyorchestrate_worker import stop_signals
stopping = threading.Event()
stop_signals.request_on_signals(stopping.set)
print("ready", flush=True)
for i in range({ROUNDS}):
    while not stopping.wait(0):  # the event's lock held most of the time, as often as can be
        pass
    stopping.clear()
    print("stopped", i, flush=True)
"""


def _line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else "(nothing)"


def test_each_stop_signal_is_honoured_whenever_it_lands():
    """One spinning process (not many: a busy machine shares its CPUs with timing tests)."""
    proc = subprocess.Popen([sys.executable, "-c", SPINNER], stdout=subprocess.PIPE, text=True)
    try:
        assert _line(proc, 60) == "ready"  # the handler is in place
        for i in range(ROUNDS):
            time.sleep(0.02)  # well into the loop
            proc.send_signal(signal.SIGTERM if i % 2 == 0 else signal.SIGINT)
            # milliseconds are enough; 10 s for a busy machine
            assert _line(proc, 10) == f"stopped {i}", f"signal {i + 1} of {ROUNDS} was never acted on"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


FORKER = """
import os, signal, sys, threading, time
from pyorchestrate_worker import stop_signals
stopping = threading.Event()
stop_signals.request_on_signals(stopping.set)
ready_r, ready_w = os.pipe()
child = os.fork()  # as an agent's multiprocessing.Pool would (fork is Linux's default)
if child == 0:
    os.write(ready_w, b"!")  # CPython drops a signal that lands before the child is set up
    time.sleep(10)  # if the signal does not end it
    os._exit(3)
os.read(ready_r, 1)
os.kill(child, int(sys.argv[1]))
_, status = os.waitpid(child, 0)
time.sleep(0.5)  # time for a wrongly relayed request to arrive
print(os.waitstatus_to_exitcode(status), stopping.is_set(), flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_forked_child_dies_of_its_stop_signal_and_the_worker_is_not_asked_to_stop(signum):
    """SIGTERM ends the child; SIGINT raises KeyboardInterrupt in it, which ends it by SIGINT."""
    done = subprocess.run([sys.executable, "-c", FORKER, str(int(signum))], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(-signum), "False"], (done.stdout, done.stderr)
    if signum == signal.SIGINT:  # as in any Python: its finally blocks run
        assert "KeyboardInterrupt" in done.stderr, done.stderr


def _copies(trace) -> dict[str, list[tuple[str, float]]]:
    """CopyTracer's trace: copy id -> [(what, time)], copies in the order they first wrote."""
    copies: dict[str, list[tuple[str, float]]] = {}
    for line in trace.read_text().splitlines():
        what, copy, at = line.split()
        copies.setdefault(copy, []).append((what, float(at)))
    return copies


def _with_worker(cluster, *args, **settings):
    """A started orchestrator, its events, and worker "w1" (command-line ``args``) joined."""
    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON, **settings)
    events = EventLog(orch)
    orch.start()
    w1 = cluster.worker(orch.address, "w1", *args)
    events.wait("WORKER_JOINED", "w1")
    return orch, events, w1


@pytest.mark.parametrize("on_disconnect", [None, "keep"])
def test_a_worker_stopped_while_an_agent_ignores_its_stop_leaves_no_second_copy(cluster, tmp_path, on_disconnect):
    """SIGTERM to a worker whose thread agent ignores its stop (it logs on, so the worker has bus
    output to flush while it tears down). The worker says "goodbye" only if every agent stopped:
    a goodbye makes the coordinator replace them at once, while a stuck thread runs until its
    process ends. Here it leaves without one, and the replacement starts after its lease, once the
    process is gone. (With a goodbye, the second copy started 50 ms after it, beside the first.)
    It says it is exiting, so a kept agent is replaced too, not kept waiting for its return."""
    orch, events, w1 = _with_worker(cluster)  # a 2 s window: it is heard to leave
    trace = tmp_path / "trace"
    orch.register_agent(StuckTalker, "t", StuckTalker.Config(trace=str(trace), stop_timeout=0.5), restart="always",
                        restart_backoff=(0.05, 0.1), on_disconnect=on_disconnect)
    events.wait("AGENT_READY", "t")
    cluster.worker(orch.address, "w2")
    events.wait("WORKER_JOINED", "w2")
    w1.send_signal(signal.SIGTERM)
    assert events.wait("AGENT_READY", "t", count=2, timeout=20)[-1]["worker"] == "w2"
    assert w1.wait(15) == 0
    first, second = _copies(trace).values()
    assert max(at for _, at in first) < min(at for _, at in second), "the stuck copy ran beside its replacement"


def test_a_worker_exits_on_sigterm_whatever_threads_its_agents_started(cluster, tmp_path):
    """An agent that started a non-daemon thread of its own kept its worker alive for ever after
    SIGTERM (the interpreter waits for such threads at exit), that thread still at work after the
    coordinator was told the worker had left."""
    orch, events, w1 = _with_worker(cluster, **DETECT)
    trace = tmp_path / "trace"
    orch.register_agent(HelperThread, "h", HelperThread.Config(trace=str(trace)))
    wait_for(trace.exists, 20, "the agent's thread")
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(15) == 0
    events.wait("WORKER_LEFT", "w1")
    lines = trace.read_text().splitlines()
    time.sleep(0.2)
    assert trace.read_text().splitlines() == lines, "the agent's thread outlived its worker"


@pytest.mark.parametrize("restart, linger", [("on-failure", 16.0), ("never", 3.0)])
def test_a_worker_stopping_slow_agents_leaves_not_lost_and_they_move(cluster, tmp_path, restart, linger):
    """SIGTERM to a worker whose agent takes 3 s or 16 s to stop (within its stop_timeout of 25 s),
    with a 0.5 s window. Three breaks:
    - the worker, silent while it waited, was declared lost after 0.5 s: WORKER_LOST, the agent's
      end taken for a failure of a worker that was only stopping it as asked;
    - an end its worker's shutdown caused was taken for the agent's own: restart="on-failure" took
      it for done, so a worker's SIGTERM (a host's maintenance) ended the agent for good;
    - the worker waited at most 15 s, whatever its agents' stop timeouts, then left, and its
      process ended under the agent mid-stop (no on_close).
    Now the worker beats on while it stops them, for as long as their stop timeouts allow, and
    the agent moves to another worker as after a drain (not counted as a restart), once its copy
    has ended. A restart="never" agent ends, saying why."""
    orch, events, w1 = _with_worker(cluster, **DETECT)
    trace = tmp_path / "trace"
    orch.register_agent(CopyTracer, "t", CopyTracer.Config(trace=str(trace), linger=linger, stop_timeout=25),
                        restart=restart)
    events.wait("AGENT_READY", "t")
    cluster.worker(orch.address, "w2")
    events.wait("WORKER_JOINED", "w2")
    signalled = time.time()
    w1.send_signal(signal.SIGTERM)
    ended = events.wait("AGENT_TERMINATED", "t", timeout=linger + 15)[0]
    assert ended["reason"] == "stopped by the shutdown of worker 'w1'"
    events.wait("WORKER_LEFT", "w1", timeout=20)
    assert w1.wait(20) == 0
    if restart == "never":
        time.sleep(1.0)  # time for a wrong restart
        assert len(events.of("AGENT_STARTED", "t")) == 1
        assert orch.status()["agents"]["t"]["state"] == "TERMINATED"
    else:
        assert events.wait("AGENT_READY", "t", count=2, timeout=20)[-1]["worker"] == "w2"
        assert orch.status()["agents"]["t"]["restarts"] == 0
        first, second = _copies(trace).values()
        assert max(at for _, at in first) < min(at for _, at in second), "the stopping copy ran beside the new one"
    first = next(iter(_copies(trace).values()))
    assert [at for what, at in first if what == "close"][0] - signalled > linger - 0.5  # it was given its time
    assert not events.of("WORKER_LOST"), "a worker stopping its agents as asked was declared lost"
    assert not events.of("AGENT_ERROR")


def test_a_second_ctrl_c_ends_the_worker_at_once_and_its_agents_start_elsewhere(cluster, tmp_path):
    """Ctrl-C asks a worker to stop its agents in order, for as long as their stop timeouts allow
    (here an on_stop of 60 s). A second Ctrl-C, from an operator who will not wait, asked the same
    again. It now ends the worker at once (exit 130): its process agents end with it (their pipe
    closes), and the coordinator, its connection closed, starts the agent elsewhere, never beside
    its first copy."""
    orch, events, w1 = _with_worker(cluster, **DETECT)
    trace, pid_file = tmp_path / "trace", tmp_path / "pid"
    orch.register_agent(CopyTracer, "t", CopyTracer.Config(trace=str(trace), linger=60, stop_timeout=90),
                        restart="on-failure", restart_backoff=(0.05, 0.1))
    orch.register_agent(CopyTracerProcess, "p", CopyTracerProcess.Config(trace=str(tmp_path / "p"), linger=60,
                                                                        stop_timeout=90, pid_file=str(pid_file)))
    events.wait("AGENT_READY", "t")
    events.wait("AGENT_READY", "p")
    cluster.worker(orch.address, "w2")
    events.wait("WORKER_JOINED", "w2")
    w1.send_signal(signal.SIGINT)
    wait_for(lambda: "Ctrl-C again: exit at once" in cluster.log_of("w1"), 10, "the first Ctrl-C to be heard")
    time.sleep(0.5)  # well into the 60 s stop
    w1.send_signal(signal.SIGINT)
    assert w1.wait(10) == 130
    assert "SIGINT again: exiting now, not waiting for 2 agent(s) to stop" in cluster.log_of("w1")
    wait_for(lambda: process_gone(int(pid_file.read_text())), 10, "the process agent to end with its worker")
    assert not [what for what, _ in _copies(tmp_path / "p").popitem()[1] if what == "close"]  # mid-stop
    assert events.wait("AGENT_READY", "t", count=2, timeout=20)[-1]["worker"] == "w2"
    first, second = _copies(trace).values()
    assert max(at for _, at in first) < min(at for _, at in second), "the first copy ran beside the second"
    assert not [what for what, _ in first if what == "close"]  # cut short: that is what it asked for


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_workers_whole_group_stops_its_agents_gracefully(cluster, tmp_path, signum):
    """Ctrl-C at a worker's terminal sends SIGINT to its whole process group (so does ``kill --
    -PGID`` its signal). It reached the processes that run agents too: a process agent died of a
    KeyboardInterrupt (of exit code 255 with SIGTERM), and so did agent hosts with their thread
    agents: AGENT_ERROR, no on_stop, while the worker was stopping them in order. Now only the
    worker acts on it: every agent (in the worker's process, in an agent host, in a process of
    its own) runs on_stop and on_close, and none fails."""
    orch, events, w1 = _with_worker(cluster, "--threads-per-process", "1", **DETECT)
    agents = {"t0": Forever, "t1": Forever, "p": ForeverTracedProcess}  # t1 in an agent host
    for name, cls in agents.items():
        orch.register_agent(cls, name, cls.Config(trace=str(tmp_path / name)))
        events.wait("AGENT_READY", name)
    os.killpg(w1.pid, signum)  # the worker leads its group (Cluster.worker: a session of its own)
    assert w1.wait(20) == 0
    events.wait("WORKER_LEFT", "w1")
    for name in agents:
        assert (tmp_path / name).read_text().split() == ["setup", "on_stop", "on_close"], name
    assert not events.of("AGENT_ERROR")


def test_one_shot_jobs_on_a_stopped_worker_run_once_each(cluster, tmp_path):
    """SIGTERM to a worker running two one-shot jobs, restart="on-failure". One is mid-work and
    does not look at the stop (as most execute()s do not): it finishes, and its end is its own.
    Moved like a long-running agent, it ran a second time elsewhere. The other, a Deferred job not
    yet due, never began: it moves and runs on the other worker (taken for done, it never ran)."""
    orch, events, w1 = _with_worker(cluster, **DETECT)
    slow, late = tmp_path / "slow", tmp_path / "late"
    # long enough that both are still at it when w2 has joined, beside 4 CPU burners too
    orch.register_agent(SlowJob, "slow", SlowJob.Config(trace=str(slow), seconds=5.0), restart="on-failure")
    orch.register_agent(LateJob, "late", LateJob.Config(trace=str(late), delay=8.0), restart="on-failure")
    events.wait("AGENT_READY", "late")
    wait_for(slow.exists, 20, "the slow job's work to begin")
    cluster.worker(orch.address, "w2")
    events.wait("WORKER_JOINED", "w2")
    assert "done" not in slow.read_text() and not late.exists(), "too slow a machine: nothing would be cut short"
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(20) == 0
    ended = events.wait("AGENT_TERMINATED", "late", count=2, timeout=40)
    assert [e["worker"] for e in events.of("AGENT_STARTED", "late")] == ["w1", "w2"]
    assert ended[-1]["ok"] and late.read_text().split() == ["done"]
    time.sleep(1.0)  # time for a wrong second run
    assert [e["worker"] for e in events.of("AGENT_STARTED", "slow")] == ["w1"]
    assert slow.read_text().split() == ["begin", "done"]
    assert orch.status()["agents"]["slow"]["state"] == "TERMINATED"
    assert not events.of("AGENT_ERROR")


BROKEN = """
import threading, time
from pyorchestrate_worker import cli, node
def broken(self):
    raise RuntimeError("a bug of ours")
node.Worker._register_with_retries = broken  # an error of ours out of Worker.run
threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()  # as an agent's own thread
cli.entry(["--coordinator", "tcp://127.0.0.1:1", "--name", "w1"])
"""


def test_a_worker_whose_loop_fails_exits_saying_why_whatever_threads_run():
    """An error of ours escaping the worker's loop ended in the interpreter's teardown, which
    waits for every non-daemon thread: a thread an agent started kept the broken worker alive
    for ever. It is logged, and the process exits 1."""
    proc = subprocess.run([sys.executable, "-c", BROKEN], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "worker failed" in proc.stderr and "RuntimeError: a bug of ours" in proc.stderr


def test_what_agents_log_while_their_worker_stops_them_arrives_as_it_comes(cluster):
    """A worker waiting for its agents to stop sent nothing of their bus output until the wait was
    over: 30 lines logged over 3 s of an on_stop all arrived at once, at its end (and a long,
    chatty stop filled the outbox). Now they go as they come."""
    orch, events, w1 = _with_worker(cluster, **DETECT)
    seen = []
    orch.register_event(OrchestratorEvent.AGENT_LOG,
                        lambda **f: seen.append(time.monotonic()) if "stopping" in str(f.get("message")) else None)
    orch.register_event(OrchestratorEvent.AGENT_TERMINATED, lambda **f: seen.append(("end", time.monotonic())))
    orch.register_agent(SlowGoodbye, "g", SlowGoodbye.Config(lines=30, seconds=3.0, stop_timeout=20))
    events.wait("AGENT_READY", "g")
    w1.send_signal(signal.SIGTERM)
    events.wait("WORKER_LEFT", "w1", timeout=30)
    assert w1.wait(20) == 0
    lines = [t for t in seen if not isinstance(t, tuple)]
    (end,) = [x[1] for x in seen if isinstance(x, tuple)]
    assert len(lines) == 30 and orch.status()["lost_events"] == 0
    assert lines[0] < end - 1.0, "the first line came only with the end"


def test_an_agent_reading_the_terminal_of_a_background_worker_fails_alone(cluster, tmp_path):
    """A worker started as a background job of a shell (``pyorchestrate-worker ... &``), its stdin
    the terminal: an agent that read it (``input()``, a ``breakpoint()`` left in) got the whole
    worker stopped by SIGTTIN (state T): lost, and every agent of it with it. Here a real terminal
    (a pty), a shell with job control, the worker in the background."""
    import fcntl
    import pty
    import termios

    from agents import Asker

    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON, **DETECT)
    events = EventLog(orch)
    orch.start()
    pid_file, log = tmp_path / "w1.pid", tmp_path / "w1.log"
    master, slave = pty.openpty()

    def a_terminal_of_its_own() -> None:  # the shell's session, whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    job = (f"set -m; {sys.executable} -m pyorchestrate_worker --coordinator {orch.address} --name w1 "
           f"> {log} 2>&1 & echo $! > {pid_file}; sleep 60")
    shell = subprocess.Popen(["bash", "-c", job], cwd=tmp_path, stdin=slave, stdout=slave, stderr=slave,
                             preexec_fn=a_terminal_of_its_own)
    os.close(slave)
    pid = 0
    try:
        events.wait("WORKER_JOINED", "w1", timeout=30)
        pid = int(pid_file.read_text())
        orch.register_agent(Forever, "bystander", worker="w1")
        events.wait("AGENT_READY", "bystander")
        orch.register_agent(Asker, "asker", worker="w1")
        error = events.wait("AGENT_ERROR", "asker", timeout=15)[0]
        assert "Input/output error" in error["error_message"], error
        time.sleep(1.0)  # two liveness windows
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T", "the worker was stopped"
        assert not events.of("WORKER_LOST") and orch.status()["agents"]["bystander"]["state"] == "READY"
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        shell.kill()
        shell.wait(10)
        os.close(master)


def _worker_writing_to(orch, stderr: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyorchestrate_worker", "--coordinator", orch.address, "--name",
                             "w1"], stdout=stderr, stderr=stderr, start_new_session=True)


def test_sigusr1_prints_every_threads_stack_and_the_worker_goes_on(cluster):
    """Through stderr opened again (worker/stack_dump.py).  (A socket as stderr, written as before,
    is not tested: in 2 of 3 clean-clone CI runs its stacks never arrived, for a reason not found.)"""
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON)
    events = EventLog(orch)
    orch.start()
    ours, theirs = os.pipe()
    worker = _worker_writing_to(orch, theirs)
    os.close(theirs)
    out = b""
    try:
        events.wait("WORKER_JOINED", "w1", timeout=30)
        os.kill(worker.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        # the main thread's frames, among all threads': Worker.run's, called from the command's
        # main. Not the loop's (_serve): WORKER_JOINED is published as the register is read, and
        # the worker may still be taking its welcome when the signal comes (a clean-clone CI run:
        # the stacks came, without _serve, and this waited for it for 30 s)
        while not (b"Thread 0x" in out and b"in run" in out and b"cli.py" in out) and time.monotonic() < deadline:
            if select.select([ours], [], [], 1.0)[0]:
                out += os.read(ours, 1 << 16)
        assert b"Thread 0x" in out and b"in run" in out and b"cli.py" in out, out[-3000:]
        time.sleep(0.5)
        assert worker.poll() is None and not events.of("WORKER_LOST")
    finally:
        worker.terminate()
        worker.wait(30)
        os.close(ours)


def test_sigusr1_with_a_stderr_nobody_reads_is_no_false_death(cluster):
    """The stacks went to stderr with blocking writes from the signal handler: with a pipe nobody
    read (a hung log shipper, a paused pager), the worker's loop waited in that write, and its
    coordinator took it for lost 0.8 s later.  Now the dump is cut short instead."""
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_interval=0.2, heartbeat_liveness=5)
    events = EventLog(orch)
    orch.start()
    ours, theirs = os.pipe()
    worker = _worker_writing_to(orch, theirs)
    os.close(theirs)
    try:
        orch.register_agent(Forever, "f")
        events.wait("AGENT_READY", "f", timeout=30)
        filler = os.open(f"/proc/self/fd/{ours}", os.O_WRONLY | os.O_NONBLOCK)  # the same pipe, ours
        try:
            while True:
                os.write(filler, b"x" * 4096)
        except BlockingIOError:
            pass  # full: whatever the worker writes to stderr now waits
        finally:
            os.close(filler)
        os.kill(worker.pid, signal.SIGUSR1)
        time.sleep(4.0)  # 4 times the 1 s a silent worker is given
        assert not events.of("WORKER_LOST") and worker.poll() is None
    finally:
        os.set_blocking(ours, False)
        try:
            while os.read(ours, 1 << 16):  # its stderr flows again: the worker may stop
                pass
        except BlockingIOError:
            pass
        worker.terminate()
        worker.wait(30)
        os.close(ours)
