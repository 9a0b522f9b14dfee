"""A log stream that takes no data (a terminal paused with Ctrl-S, ``script.py | less`` not
scrolled, a pipe nobody reads) stops neither a coordinator's loop nor a worker's (log_thread.py),
and what could not be written is counted and said.

Each test gives a real process a stderr pipe of one page that it never reads, beside an agent that
logs a line every 5 ms, and checks that the guarantees hold while the pipe is full: no running
agent is stopped or started twice, no worker is taken for lost.  Then it reads the pipe, and the
lines that waited come."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import DETECT, free_port, wait_for

TESTS = os.path.dirname(os.path.abspath(__file__))
def writing_to_a_full_pipe(pid: int) -> bool:
    """Does a thread of ``pid`` wait in a write to a pipe (the kernel's wait channel says so)?  Not
    judged by the bytes in the pipe: a pipe holds 16 pages, and lines that end mid-page fill it with
    less than its 64 KiB."""
    channels = []
    for path in glob.glob(f"/proc/{pid}/task/*/wchan"):
        try:
            channels.append(Path(path).read_text())
        except OSError:
            pass
    if channels and all(c in ("", "0") for c in channels):
        pytest.skip("this kernel does not name wait channels (/proc/PID/wchan)")
    return any("pipe_write" in c for c in channels)


def read_all(fd: int, seconds: float) -> bytes:
    """What the pipe gives within ``seconds`` (it is read now, so its writer goes on)."""
    os.set_blocking(fd, False)
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        if not chunk:
            break
        out += chunk
    return out


def copies(trace: Path) -> dict[str, list[str]]:
    """Each copy's start/close lines, by copy id."""
    seen: dict[str, list[str]] = {}
    for line in trace.read_text().splitlines() if trace.exists() else ():
        kind, copy, _ = line.split()
        if kind != "alive":
            seen.setdefault(copy, []).append(kind)
    return seen


SCRIPT = """
import json, logging, sys, time
sys.path.insert(0, {tests!r})
from agents import Chatty, CopyTracer
from pyorchestrate import Orchestrator, OrchestratorEvent

{logging_setup}
out = open({events!r}, "a")

def record(**fields):
    if fields["event"] not in ("AGENT_HEARTBEAT", "AGENT_LOG"):
        out.write(json.dumps({{k: fields.get(k) for k in ("event", "agent_name", "worker")}}) + "\\n")
        out.flush()

o = Orchestrator("svc", heartbeat_interval=0.1, heartbeat_liveness=5, local_workers=2)
for event in OrchestratorEvent:
    o.register_event(event, record)
o.register_agent(CopyTracer, "victim", CopyTracer.Config(trace={trace!r}), restart="always")
o.register_agent(Chatty, "chatty")
o.start()
time.sleep(120)
"""


@pytest.mark.parametrize("logging_setup", ["", "logging.basicConfig(level=logging.INFO)"], ids=["ours", "basicConfig"])
def test_a_coordinator_whose_stderr_takes_nothing_stops_no_agent(tmp_path, logging_setup):
    """Its loop prints its INFO lines and its agents' log lines: with the pipe full, that loop
    stopped answering heartbeats, and its workers' leases ran out and stopped the running victim
    1.1 s after the pipe filled (then restarted it: restart="always")."""
    events, trace = tmp_path / "events.jsonl", tmp_path / "trace.txt"
    script = tmp_path / "coordinator.py"
    script.write_text(SCRIPT.format(tests=TESTS, logging_setup=logging_setup, events=str(events), trace=str(trace)))
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=write)
    os.close(write)
    try:
        def said() -> list[tuple[str, str]]:
            lines = events.read_text().splitlines() if events.exists() else []
            return [(e["event"], e["agent_name"] or e["worker"]) for e in map(json.loads, lines)]

        wait_for(lambda: ("AGENT_READY", "victim") in said() and ("AGENT_READY", "chatty") in said(), 60, "both READY")
        wait_for(lambda: writing_to_a_full_pipe(proc.pid), 30, "a write to the full stderr pipe")
        time.sleep(3.0)  # six liveness windows with nothing read
        assert writing_to_a_full_pipe(proc.pid), "its stderr took data meanwhile: the test proves nothing"
        assert ("AGENT_TERMINATED", "victim") not in said() and not [e for e in said() if e[0] == "WORKER_LOST"], said()
        assert list(copies(trace).values()) == [["start"]], copies(trace)
        assert proc.poll() is None
        # read again, the pipe gets what waited (the loop's own lines among them), in order
        text = read_all(read, 5.0).decode(errors="replace")
        assert "agent victim ready on" in text and "copy" in text.rpartition("agent victim ready on")[2], text[-2000:]
        assert list(copies(trace).values()) == [["start"]], copies(trace)
    finally:
        proc.kill()
        proc.wait(10)
        read_all(read, 0.2)
        os.close(read)


def test_a_worker_whose_stderr_takes_nothing_is_not_lost_and_its_agents_run_once(cluster, tmp_path):
    """A worker prints its agents' lines (--agent-logs print) and its own.  With its stderr full,
    its loop's next line (here: it starts an agent host) held the loop: the coordinator took the
    worker for lost and started the victim on w2 while the first copy ran on."""
    from agents import Chatty, QuietTracer

    trace = tmp_path / "trace.txt"
    orch = cluster.orchestrator(min_workers=2, **DETECT)
    orch.start()
    read, write = os.pipe()
    cwd = tmp_path / "worker-w1"
    cwd.mkdir()
    cluster.workers["w1"] = subprocess.Popen(
        [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", orch.address, "--name", "w1",
         "--threads-per-process", "2"], cwd=cwd, stdout=write, stderr=write, start_new_session=True)
    os.close(write)
    try:
        cluster.worker(orch.address, "w2")
        orch.register_agent(QuietTracer, "victim", QuietTracer.Config(trace=str(trace)), worker="w1", restart="always")
        orch.register_agent(Chatty, "chatty", worker="w1")
        assert orch.agent("victim").wait_ready(30) and orch.agent("chatty").wait_ready(30)
        wait_for(lambda: writing_to_a_full_pipe(cluster.workers["w1"].pid), 30, "a write to the full stderr pipe")
        # a third thread agent goes to an agent host, which the worker's loop says it starts
        orch.register_agent(Chatty, "third", worker="w1")
        time.sleep(3.0)  # six liveness windows with nothing read
        assert writing_to_a_full_pipe(cluster.workers["w1"].pid), "its stderr took data meanwhile: the test proves nothing"
        status = orch.status()
        assert status["workers"]["w1"]["alive"], status["workers"]["w1"]
        assert status["agents"]["victim"]["worker"] == "w1" and status["agents"]["third"]["state"] == "READY", status
        assert list(copies(trace).values()) == [["start"]], copies(trace)
        text = read_all(read, 5.0).decode(errors="replace")
        assert "agent host 1: started" in text, text[-2000:]
    finally:
        read_all(read, 0.2)
        os.close(read)


def test_a_worker_whose_agent_ships_the_root_log_to_a_collector_that_hangs_is_not_lost(cluster, tmp_path):
    """An agent added a handler to the root logger (an HTTP log shipper, as agents that configure
    logging in setup() do) whose collector accepts and never answers. The worker's own records
    reach the root too: its loop's next line (here: it starts an agent host) waited in that
    handler for ever, and the coordinator took the worker for lost while its agents ran on."""
    import socket

    from agents import Chatty, QuietTracer, RootLogShipper

    collector = socket.socket()
    collector.bind(("127.0.0.1", 0))
    collector.listen(64)  # connections complete in the backlog; nothing is ever read or answered
    trace = tmp_path / "trace.txt"
    orch = cluster.orchestrator(min_workers=2, **DETECT)
    orch.start()
    try:
        cluster.worker(orch.address, "w1", "--threads-per-process", "2")
        cluster.worker(orch.address, "w2")
        orch.register_agent(QuietTracer, "victim", QuietTracer.Config(trace=str(trace)), worker="w1", restart="always")
        orch.register_agent(RootLogShipper, "shipper",
                            RootLogShipper.Config(collector="127.0.0.1:%d" % collector.getsockname()[1]), worker="w1")
        assert orch.agent("victim").wait_ready(30) and orch.agent("shipper").wait_ready(30)
        # a third thread agent goes to an agent host, which the worker's loop says it starts
        orch.register_agent(Chatty, "third", worker="w1")
        time.sleep(3.0)  # six liveness windows
        status = orch.status()
        assert status["workers"]["w1"]["alive"], status["workers"]["w1"]
        assert status["agents"]["victim"]["worker"] == "w1" and status["agents"]["third"]["worker"] == "w1", status
        assert list(copies(trace).values()) == [["start"]], copies(trace)
    finally:
        collector.close()


class Written(logging.Handler):
    """Keeps each record's message, after ``pause()`` (a stream that takes its time, or none)."""

    def __init__(self, pause) -> None:
        super().__init__()
        self.pause = pause
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.pause()
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def logger_through(target: logging.Handler, writer):
    """A logger of its own whose records ``writer`` (a LogThread) hands to ``target``."""
    from pyorchestrate.log_thread import QueuedHandler

    logger = logging.getLogger(f"pyorchestrate.test.{writer.name}")
    logger.propagate = False
    handler = QueuedHandler(target, writer)
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)


def test_records_beyond_the_limit_are_dropped_counted_and_said_once_the_stream_moves():
    """The log thread's queue is bounded: a stream that takes nothing costs records, not memory
    without bound, and never the logging thread's time; the count is said where they are missing."""
    from pyorchestrate.log_thread import LogThread

    moving = threading.Event()
    writer = LogThread("test-log-stuck", limit=5)
    target = Written(lambda: moving.wait(30))
    with logger_through(target, writer) as logger:
        started = time.monotonic()
        items = ["a", "b"]
        for i in range(20):
            logger.warning("line %d of %s", i, items)
        items.append("changed later")  # the message is made when logged, not when written
        assert time.monotonic() - started < 1.0  # nobody waited on the stream (but STALL, once)
        assert writer.dropped in (14, 15)  # 5 queued, the first perhaps taken by the thread already
        moving.set()
        assert writer.flush(10)
        kept = 20 - writer.dropped
        assert target.lines[:kept] == [f"line {i} of ['a', 'b']" for i in range(kept)]
        assert target.lines[kept:] == [
            f"{writer.dropped} log record(s) dropped: the log stream took no data for a while (a paused terminal, "
            "a pipe nobody reads); agents' lines also went on the bus"]
        logger.warning("after")
        assert writer.flush(10) and target.lines[-1] == "after" and writer.dropped in (14, 15)


def test_a_slow_stream_that_moves_slows_the_logger_down_and_loses_nothing():
    """A full queue waits for room while the stream takes data (a burst of the coordinator's lines
    to a file lost 9,521 of 26,000 to drops before): only a stream that took nothing for
    log_thread.STALL seconds costs records."""
    from pyorchestrate.log_thread import LogThread

    writer = LogThread("test-log-slow", limit=5)
    target = Written(lambda: time.sleep(0.002))
    with logger_through(target, writer) as logger:
        for i in range(100):
            logger.warning("line %d", i)
        assert writer.flush(10)
        assert target.lines == [f"line {i}" for i in range(100)] and writer.dropped == 0


KEYED_SCRIPT = """
import json, sys, time
from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

out = open({events!r}, "a")

def record(**fields):
    out.write(json.dumps({{"event": fields["event"], "worker": fields.get("worker")}}) + "\\n")
    out.flush()

o = Orchestrator("gate", address={address!r}, keys={keys!r}, run_mode=RunMode.DAEMON, min_workers=0)
o.register_event(OrchestratorEvent.WORKER_JOINED, record)
o.start()
record(event="started")
sys.stderr.write("x" * 200_000)  # nobody reads the pipe: this thread waits here, and the pipe is full
sys.stderr.flush()
"""


def test_a_keyed_coordinator_whose_stderr_takes_nothing_still_lets_its_workers_in(cluster, tmp_path):
    """The gatekeeper (ZAP) thread says what it refused: with the pipe full, its first refusal
    (a stranger's key) held it in that line, and every handshake after it waited for ever; a
    worker holding an admitted key never got in."""
    import zmq

    from pyorchestrate.keys import KeyDir

    keys = KeyDir(tmp_path / "keys")
    keys.init()
    events = tmp_path / "events.jsonl"
    address = f"tcp://127.0.0.1:{free_port()}"
    script = tmp_path / "coordinator.py"
    script.write_text(KEYED_SCRIPT.format(events=str(events), address=address, keys=str(keys.path)))
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=write)
    os.close(write)
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)
    try:
        said = lambda: [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []  # noqa: E731
        wait_for(lambda: said(), 60, "the coordinator to start")
        wait_for(lambda: writing_to_a_full_pipe(proc.pid), 30, "a write to the full stderr pipe")
        stranger.curve_serverkey = keys.coordinator_pair()[0]
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        stranger.connect(address)
        stranger.send(b"let me in", zmq.NOBLOCK)
        time.sleep(1.0)  # refused, and said so (or waiting to say so)
        cluster.worker(address, "w1", "--keys", str(keys.path))
        wait_for(lambda: any(e["event"] == "WORKER_JOINED" for e in said()), 20, "the admitted worker to join")
        assert writing_to_a_full_pipe(proc.pid), "its stderr took data meanwhile: the test proves nothing"
    finally:
        stranger.close(linger=0)
        ctx.term()
        proc.kill()
        proc.wait(10)
        read_all(read, 0.2)
        os.close(read)
