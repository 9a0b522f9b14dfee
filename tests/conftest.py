"""Fixtures that start real clusters: an orchestrator in the test process, workers as separate
processes on 127.0.0.1 with OS-chosen ports and fast heartbeats.  Every wait has a timeout, and
every test is checked for processes left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

# coordinators leave a run marker per name and address (pyorchestrate/runmarker.py): keep the
# suite's apart from the machine's, and from one run to the next
import tempfile

os.environ.setdefault("PYORCHESTRATE_STATE_DIR", tempfile.mkdtemp(prefix="pyorchestrate-tests-"))

from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

REPO = Path(__file__).resolve().parent.parent
LIFECYCLE = {"AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", "AGENT_TERMINATED"}
# quick heartbeats, but a 2 s silence window: a test that is not about detection must not see a
# false death when CI loads the machine (one did at 0.5 s: a worker lost while pip ran beside the
# suite).  Detection tests ask for DETECT and derive their waits from it.
FAST = {"heartbeat_interval": 0.1, "heartbeat_liveness": 20, "worker_wait_timeout": 20.0}


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


#: for tests (or parameters) on tcp://[::1]: a machine or container may have no IPv6 at all
needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
DETECT = {"heartbeat_interval": 0.1, "heartbeat_liveness": 5}  # a 0.5 s window


def process_gone(pid: int) -> bool:
    """Is there no process ``pid`` any more?  A zombie is gone too: an orphan that ended is handed
    to this process (see _adopt_orphans), which does not reap it (a wait could take the status of a
    child a Popen object waits for)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port(span: int = 3) -> int:
    """A port P with P..P+span-1 free a moment ago (a coordinator given P binds P, P+1 and P+2).

    Chosen below Linux's ephemeral range (32768+), where ports bound as ``:*`` by parallel tests
    never land, so only another test doing the same could collide, and the check makes that rare."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000 - span)
        socks = []
        try:
            for p in range(port, port + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port span found")


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, session id) of every process, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.append((int(entry), fields[0], int(fields[1]), int(fields[3])))
    return out


def _session_members(sid: int) -> list[int]:
    return [pid for pid, state, _, session in _processes() if session == sid and state != "Z"]


def _adopt_orphans() -> None:
    """Make this test process the reaper of its descendants' orphans (Linux's
    PR_SET_CHILD_SUBREAPER): a process that outlives its parent (a coordinator's pulse, a helper
    of a killed script) is then handed to us, not to init, so no_process_left_behind sees it.
    Without it, keyed pulses that never ended went unnoticed through whole runs."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass  # not Linux: orphans go to init, unseen, as before


_adopt_orphans()


def live_children(pid: int) -> list[int]:
    return [p for p, state, parent, _ in _processes() if parent == pid and state != "Z"]


class EventLog:
    """Records every orchestrator event (via callbacks) for assertions."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        for event in OrchestratorEvent:
            orchestrator.register_event(event, self._record)

    def _record(self, **fields: Any) -> None:
        with self._lock:
            self.events.append(fields)

    def of(self, event: str, subject: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == event
                    and (subject is None or subject in (e.get("agent_name"), e.get("worker")))]

    def wait(self, event: str, subject: str | None = None, timeout: float = 15.0, count: int = 1) -> list[dict]:
        return wait_for(lambda: len(self.of(event, subject)) >= count and self.of(event, subject), timeout,
                        f"{count} x {event} {subject or ''}")


class Cluster:
    """Starts orchestrators and worker processes for one test and cleans them all up."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.workers: dict[str, subprocess.Popen] = {}
        self.orchestrators: list[Orchestrator] = []
        self.leaks: list[str] = []

    def orchestrator(self, name: str = "test", **settings: Any) -> Orchestrator:
        settings = {"address": "tcp://127.0.0.1:*", **FAST, **settings}
        orch = Orchestrator(name, config=Orchestrator.Config(**settings))
        self.orchestrators.append(orch)
        return orch

    def worker(self, coordinator: str, name: str, *args: str) -> subprocess.Popen:
        """Start ``pyorchestrate-worker`` in an empty directory (so nothing of ours is importable)."""
        cwd = self.tmp / f"worker-{name}"
        cwd.mkdir(exist_ok=True)
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyorchestrate_worker", "--coordinator", coordinator, "--name", name, *args],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.workers[name] = proc
        return proc

    def _stacks_of(self, name: str, proc: subprocess.Popen) -> str:
        """What a worker that will not exit is doing: SIGUSR1 makes it print every thread's stack
        to its log (worker/cli.py); the log's last lines then say where each one is."""
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return "(gone)"
        time.sleep(1.0)
        return "\n".join(self.log_of(name).splitlines()[-80:])

    def log_of(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for orch in self.orchestrators:
            try:
                orch.stop(timeout=5)
            except Exception as exc:  # keep cleaning up
                self.leaks.append(f"orchestrator.stop raised {exc!r}")
        for name, proc in self.workers.items():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name, proc in self.workers.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                self.leaks.append(f"worker {name} ignored SIGTERM for 20 s; its threads and its log's end:\n"
                                  + self._stacks_of(name, proc))
            # a graceful worker leaves nothing in its session (forkserver, process agents)
            try:
                wait_for(lambda: not _session_members(proc.pid), 10, f"session of worker {name} to empty")
            except AssertionError:
                self.leaks.append(f"worker {name} left processes {_session_members(proc.pid)}")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start_daemon(cluster: "Cluster", *workers: tuple[str, ...], **settings: Any) -> tuple[Orchestrator, EventLog]:
    """A started DAEMON orchestrator with ``workers`` (each ``(name, *cli_args)``) joined."""
    orch = cluster.orchestrator(min_workers=settings.pop("min_workers", 1), run_mode=RunMode.DAEMON, **settings)
    events = EventLog(orch)
    orch.start()
    for name, *args in workers:
        cluster.worker(orch.address, name, *args)
    for name, *_ in workers:
        events.wait("WORKER_JOINED", name)
    return orch, events


def probe_on_w1(cluster: "Cluster") -> tuple[Orchestrator, EventLog]:
    """A started DAEMON orchestrator, worker w1, and a long-lived agent "probe" READY on it."""
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON)
    events = EventLog(orch)
    orch.start()
    cluster.worker(orch.address, "w1")
    from agents import Forever

    orch.register_agent(Forever, "probe")
    events.wait("AGENT_READY", "probe")
    return orch, events


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.close()
    if c.leaks:  # in full: an assertion's message is cut short, and the stacks are in the middle
        pytest.fail("\n\n".join(c.leaks), pytrace=False)


def _our_leftovers() -> list[int]:
    # multiprocessing's resource tracker (one per interpreter, started by process-shared events of
    # standalone process agents) lives until this process exits by design: not a leak
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return [pid for pid in live_children(os.getpid()) if pid != tracker]


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    try:
        wait_for(lambda: not _our_leftovers(), 10, "child processes to exit")
    except AssertionError:
        leftover = _our_leftovers()
        for pid in leftover:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"test left processes behind: {leftover}")


def run_script(args: list[str], cwd: Path, timeout: float = 60.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a Python script as its own process with a hard timeout."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
