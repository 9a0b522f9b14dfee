"""A process agent that stops reading its pipe (SIGSTOP, a debugger, SIGTTIN) never makes its
worker's loop wait (worker/child_link.py).

The loop tells each such process its lease every heartbeat.  Unread, those messages filled the pipe
(~290 of them), and the next send held the loop for as long as the process stayed stopped: its
worker was taken for lost 29 s after the SIGSTOP at a 0.1 s heartbeat (5 minutes at 1 s), and every
agent it ran was started elsewhere while still running there."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import msgpack
from conftest import wait_for

from pyorchestrate import OrchestratorEvent


def test_a_stopped_process_agent_loses_its_worker_nothing(cluster, tmp_path):
    from agents import CopyTracerProcess, QuietTracer

    trace, pid_file, victim_trace = tmp_path / "trace.txt", tmp_path / "pid", tmp_path / "victim.txt"
    # a heartbeat every 20 ms fills the pipe in ~6 s; the liveness window stays 0.5 s
    orch = cluster.orchestrator(min_workers=1, heartbeat_interval=0.02, heartbeat_liveness=25)
    lost: list[str] = []
    orch.register_event(OrchestratorEvent.WORKER_LOST, lambda worker: lost.append(worker))
    orch.start()
    cluster.worker(orch.address, "w1")
    orch.register_agent(QuietTracer, "victim", QuietTracer.Config(trace=str(victim_trace)), restart="always")
    orch.register_agent(CopyTracerProcess, "stopped", CopyTracerProcess.Config(trace=str(trace), pid_file=str(pid_file)),
                        restart="always")
    assert orch.agent("victim").wait_ready(30) and orch.agent("stopped").wait_ready(30)
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(12.0)  # twice what fills the pipe
        assert not lost, lost
        assert orch.agent("victim").state == "READY" and orch.agent("stopped").state == "READY"
    finally:
        os.kill(pid, signal.SIGCONT)
    # resumed, it reads what waited (the newest lease, not hundreds) and stops when asked
    orch.stop_agent("stopped", timeout=5)
    wait_for(lambda: orch.agent("stopped").state == "TERMINATED", 30, "the resumed agent stopped")
    assert not orch.status()["agents"]["stopped"]["failed"] and not lost
    victims = {line.split()[1] for line in victim_trace.read_text().splitlines()}
    assert len(victims) == 1, victims


def test_a_link_to_a_child_that_reads_nothing_never_waits_and_keeps_order():
    """A real pipe nobody reads: thousands of leases and a stop are handed over at once; read later,
    the pipe gives what went straight in, then the newest lease and the stop, in that order."""
    from pyorchestrate_worker.child_link import ChildLink

    ours, theirs = multiprocessing.Pipe()
    link = ChildLink(ours)
    started = time.monotonic()
    for i in range(3000):
        link.send(["lease", float(i), 5.0])
    link.send(["deliver", "message", "x" * 100_000])  # long: through the writer even with room
    link.send(["stop", 1.0])
    link.send(["lease", 3000.0, 5.0])
    assert time.monotonic() - started < 5.0  # nothing waited for the reader
    assert link.writers >= 1  # the pipe filled: a writer took over (a new one each time it fills again)
    got = []
    while len(got) < 3 or got[-1][0] != "lease" or got[-1][1] != 3000.0:
        assert theirs.poll(10), got[-5:]
        got.append(msgpack.unpackb(theirs.recv_bytes(), raw=False))
    leases = [m[1] for m in got if m[0] == "lease"]
    assert leases == sorted(leases) and leases[-1] == 3000.0 and len(leases) < 3000  # older ones replaced
    tail = [m[0] for m in got if m[0] != "lease"]
    assert tail == ["deliver", "stop"], tail
    assert got.index(["stop", 1.0]) < len(got) - 1  # the stop before the last lease, as sent
    ours.close()
    theirs.close()


def test_a_writer_thread_that_cannot_start_loses_counted_messages_and_the_next_send_tries_again():
    """At a pids limit the writer thread cannot be started: on the starter thread later (the
    backlog waited for ever, unsent), or at once, from within ``send`` (the supervisor's fallback
    when not even its starter thread can start: it reported the failure under the link's lock)."""
    from pyorchestrate_worker.child_link import DIRECT_MAX, ChildLink

    ours, theirs = multiprocessing.Pipe()
    big = ["deliver", "x" * (DIRECT_MAX + 1)]  # too long to go straight in: always the writer's
    no_thread = RuntimeError("can't start new thread")
    link = ChildLink(ours, start=lambda thread: link.writer_failed(no_thread))
    sender = threading.Thread(target=link.send, args=(big,), daemon=True)
    sender.start()
    sender.join(5)
    assert not sender.is_alive(), "send waited for its own lock"
    assert (link.lost, link.writers) == (1, 0)

    later: list[threading.Thread] = []
    link = ChildLink(ours, start=later.append)  # queued for a starter that fails afterwards
    link.send(big)
    link.send(big)
    assert len(later) == 1 and link.lost == 0
    link.writer_failed(no_thread)
    assert link.lost == 2
    link._start = threading.Thread.start  # threads can be had again
    link.send(big)
    assert theirs.poll(5) and msgpack.unpackb(theirs.recv_bytes()) == big
    ours.close()
    theirs.close()
