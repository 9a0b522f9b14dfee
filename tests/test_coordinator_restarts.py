"""The coordinator as a process of its own: how it ends, stalls and comes back.

Each coordinator here is a real script in its own process, SIGKILLed, SIGSTOPped, SIGTERMed or
interrupted as a user's would be; workers are real ``pyorchestrate-worker`` processes.  Agents
write a line to a shared trace file when a copy starts (``setup``) and ends (``close``), so the
tests see every copy that ever ran, on any worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, needs_ipv6, wait_for

from pyorchestrate import RunMode

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from agents import Traced
from pyorchestrate import Orchestrator, OrchestratorEvent, RunMode

out = open({events!r}, "a")

def record(**fields):
    if fields["event"] not in ("AGENT_HEARTBEAT", "AGENT_LOG"):
        out.write(json.dumps({{k: fields.get(k) for k in ("event", "agent_name", "worker", "reason")}}) + "\\n")
        out.flush()

o = Orchestrator({name!r}, address={address!r}, run_mode=RunMode.DAEMON, min_workers={workers},
                 heartbeat_interval=0.1, heartbeat_liveness=5)
for event in OrchestratorEvent:
    o.register_event(event, record)
versions = {versions!r}
for i in range({agents}):
    o.register_agent(Traced, f"agent{{i}}", Traced.Config(trace={trace!r}, version=versions.get(i, 1), **{agent_config!r}),
                     worker={pin!r})
o.start()
{ending}
"""

ENDINGS = {
    "sleep": "time.sleep(120)",
    "sigterm": "while True:\n    time.sleep(0.1)",
    "sigint": "while True:\n    time.sleep(0.1)",  # Ctrl-C outside join()
    # once its 3 agents run (a first start on a fixed port waits the adoption window first)
    "exception": "while not (os.path.exists('trace.txt') and open('trace.txt').read().count('setup') >= 3):\n"
                 "    time.sleep(0.05)\nraise RuntimeError('the script failed after start()')",
    # a child of the script's own, forked (as multiprocessing does by default before Python 3.14)
    "fork": "import multiprocessing\nchild = multiprocessing.get_context('fork').Process(target=time.sleep, args=(60,))\n"
            "child.start()\nopen('forked.pid', 'w').write(str(child.pid))\ntime.sleep(120)",
}


def _ctrl_c_as_at_a_terminal() -> None:
    """In the script's process, before it starts: SIGINT as a user's terminal gives it.  A suite
    started as a background job of a shell (nohup ... &, a CI runner's wrapper) has SIGINT ignored,
    every child inherits that, and Python then leaves it ignored: the Ctrl-C case below waited 30 s
    for a script that never heard it (SigIgn of the script: SIGINT and SIGQUIT, as a shell sets them
    for a job run with &)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Script:
    """One coordinator script run as its own process."""

    def __init__(self, tmp: Path, tag: str, address: str, *, name: str = "svc", agents: int = 3, workers: int = 1,
                 versions: dict[int, int] | None = None, ending: str = "sleep",
                 agent_config: dict | None = None, pin: str | None = None) -> None:
        self.events = tmp / f"events-{tag}.jsonl"
        path = tmp / f"coordinator-{tag}.py"
        path.write_text(SCRIPT.format(tests=TESTS, events=str(self.events), name=name, address=address,
                                      workers=workers, versions=versions or {}, agents=agents,
                                      trace=str(tmp / "trace.txt"), ending=ENDINGS[ending],
                                      agent_config=agent_config or {}, pin=pin))
        self.log = open(tmp / f"coordinator-{tag}.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(path)], cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_ctrl_c_as_at_a_terminal)

    def of(self, event: str) -> list[dict]:
        if not self.events.exists():
            return []
        return [e for e in map(json.loads, self.events.read_text().splitlines()) if e["event"] == event]

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def trace(tmp: Path) -> list[str]:
    path = tmp / "trace.txt"
    return path.read_text().splitlines() if path.exists() else []


def setups(tmp: Path) -> list[str]:
    return [line for line in trace(tmp) if line.startswith("setup")]


class Scripts:
    """Coordinator scripts on one fixed address (a restarted script comes back to it), and the
    workers that serve them; every script is ended after the test."""

    def __init__(self, cluster, tmp: Path, host: str = "127.0.0.1") -> None:
        self.cluster, self.tmp = cluster, tmp
        self.address = f"tcp://{host}:{free_port()}"
        self.started: list[Script] = []

    def workers(self, *names: str) -> None:
        for name in names:
            self.cluster.worker(self.address, name)

    def run(self, tag: str, **settings) -> Script:
        script = Script(self.tmp, tag, self.address, **settings)
        self.started.append(script)
        return script


@pytest.fixture
def scripts(cluster, tmp_path, request):
    made = Scripts(cluster, tmp_path, getattr(request, "param", "127.0.0.1"))  # (a host: indirect parametrize)
    yield made
    for script in made.started:
        script.end()


@pytest.mark.parametrize("scripts", ["127.0.0.1", pytest.param("[::1]", marks=needs_ipv6)], indirect=True,
                         ids=["ipv4", "ipv6"])
def test_a_sigkilled_coordinator_started_again_adopts_its_agents_and_replaces_a_changed_one(cluster, tmp_path, scripts):
    scripts.workers("w1", "w2")
    first = scripts.run("first", agents=20, workers=2)
    wait_for(lambda: len(setups(tmp_path)) == 20, 30, "20 agents to start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    # the same script again: every agent is still running and is adopted, none starts anew
    second = scripts.run("second", agents=20, workers=2)
    wait_for(lambda: len(second.of("AGENT_ADOPTED")) == 20, 30, "20 agents to be adopted")
    time.sleep(1.0)  # anything that would start or stop a copy has had time to
    assert not second.of("AGENT_STARTED") and not second.of("AGENT_TERMINATED")
    assert len(setups(tmp_path)) == 20 and not [line for line in trace(tmp_path) if line.startswith("close")]

    # once more, with agent3's config changed: that one is replaced (its old copy stops first),
    # the other 19 are adopted
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(10)
    third = scripts.run("third", agents=20, workers=2, versions={3: 2})
    wait_for(lambda: len(third.of("AGENT_ADOPTED")) == 19 and third.of("AGENT_READY"), 30,
             "19 adopted and agent3 started anew")
    time.sleep(1.0)
    assert [e["agent_name"] for e in third.of("AGENT_READY")] == ["agent3"]
    assert "agent3" not in {e["agent_name"] for e in third.of("AGENT_ADOPTED")}
    lines = trace(tmp_path)
    assert lines.count("setup agent3 2") == 1 and lines.index("close agent3") < lines.index("setup agent3 2")
    assert len(setups(tmp_path)) == 21 and [line for line in lines if line.startswith("close")] == ["close agent3"]

    # and a clean end stops them all
    third.proc.send_signal(signal.SIGTERM)
    assert third.proc.wait(30) == 128 + signal.SIGTERM
    wait_for(lambda: len([line for line in trace(tmp_path) if line.startswith("close")]) == 21, 20,
             "every copy to close")


def test_a_sigkilled_coordinator_started_again_without_its_run_marker_still_runs_no_agent_twice(
        cluster, tmp_path, scripts, monkeypatch):
    """The run marker lives on the coordinator's host, and is lost where the restarted script
    gets a fresh file system: a container restarted by Kubernetes, a systemd service's private
    /tmp.  The restarted script waits for one worker only: before, it started the agents that
    worker did not run at once, and the other worker's copies of them, reported a moment later,
    ran beside them (10 of 20 agents twice; w2 is held back here, so that it registers second).
    The workers' word that the coordinator they served never released them now opens the
    adoption window."""
    scripts.workers("w1", "w2")
    first = scripts.run("first", agents=20, workers=2)
    wait_for(lambda: len(setups(tmp_path)) == 20, 30, "20 agents to start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    monkeypatch.setenv("PYORCHESTRATE_STATE_DIR", str(tmp_path / "fresh-state"))  # the marker is lost
    w2 = scripts.cluster.workers["w2"]
    os.kill(w2.pid, signal.SIGSTOP)  # w2 registers only once w1 has (the order was a race)
    second = scripts.run("second", agents=20, workers=1)
    wait_for(lambda: [e for e in second.of("WORKER_JOINED") if e["worker"] == "w1"], 30, "w1 to join")
    time.sleep(0.5)
    os.kill(w2.pid, signal.SIGCONT)
    wait_for(lambda: len(second.of("AGENT_ADOPTED")) == 20, 30, "20 agents to be adopted")
    time.sleep(1.0)  # anything that would start or stop a copy has had time to
    assert not second.of("AGENT_STARTED") and not second.of("AGENT_TERMINATED")
    assert len(setups(tmp_path)) == 20 and not [line for line in trace(tmp_path) if line.startswith("close")]
    assert "left it without saying it finished" in Path(second.log.name).read_text()


def test_a_worker_that_ran_nothing_still_tells_a_coordinator_without_its_marker_that_the_last_one_crashed(
        cluster, tmp_path, scripts, monkeypatch):
    """The crashed script ran its agents on w2 only (pinned there).  Started again without its
    marker and without the pins, it hears w1 first, which runs nothing of it but was left by it
    without a word that it finished: it waits as after a crash.  w2 comes back after the window a
    coordinator without a marker waits anyway (held 4.5 s by SIGSTOP), and its copies are adopted;
    without w1's word they were started on w1 when that window ended, and ran twice."""
    scripts.workers("w1", "w2")
    first = scripts.run("first", agents=3, workers=2, pin="w2")
    wait_for(lambda: len(setups(tmp_path)) == 3, 30, "3 agents to start on w2")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    monkeypatch.setenv("PYORCHESTRATE_STATE_DIR", str(tmp_path / "fresh-state"))  # the marker is lost
    w2 = scripts.cluster.workers["w2"]
    os.kill(w2.pid, signal.SIGSTOP)
    second = scripts.run("second", agents=3, workers=1)
    wait_for(lambda: [e for e in second.of("WORKER_JOINED") if e["worker"] == "w1"], 30, "w1 to join")
    time.sleep(4.5)  # past the adoption window of a start without a marker (2.7 s here)
    os.kill(w2.pid, signal.SIGCONT)
    wait_for(lambda: len(second.of("AGENT_ADOPTED")) == 3, 30, "3 agents to be adopted")
    time.sleep(1.0)
    assert not second.of("AGENT_STARTED") and len(setups(tmp_path)) == 3, trace(tmp_path)
    assert "worker w1 says the previous coordinator" in Path(second.log.name).read_text()


def test_a_coordinator_started_again_binds_and_adopts_though_a_fork_of_the_crashed_one_lives(cluster, tmp_path,
                                                                                            scripts):
    """The crashed script's forked child held a copy of the coordinator's listening sockets: the
    script started again could not bind its address ("Address already in use") while the child
    lived, and its workers' leases ran out."""
    scripts.workers("w1")
    first = scripts.run("first", agents=3, ending="fork")
    forked = tmp_path / "forked.pid"
    wait_for(lambda: len(setups(tmp_path)) == 3 and forked.exists() and forked.read_text(), 30, "3 agents and the fork")
    child = int(forked.read_text())
    try:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = scripts.run("second", agents=3)
        wait_for(lambda: len(second.of("AGENT_ADOPTED")) == 3 or second.proc.poll() is not None, 30,
                 "3 agents to be adopted")
        assert second.proc.poll() is None, (tmp_path / "coordinator-second.log").read_text()[-1500:]
        assert len(setups(tmp_path)) == 3 and not [line for line in trace(tmp_path) if line.startswith("close")]
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


FORK_SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from agents import Quick
from pyorchestrate import Orchestrator, RunMode

o = Orchestrator("forks", address={address!r}, run_mode=RunMode.DAEMON, min_workers=0)
o.start()
pid = os.fork()
if pid == 0:
    try:
        o.register_agent(Quick, "from-the-fork")
        print("registered in the fork", flush=True)
    except RuntimeError as exc:
        print("refused in the fork:", exc, flush=True)
    try:
        o.join(timeout=5)
    except RuntimeError:
        print("join refused in the fork", flush=True)
    sys.exit(0)  # the fork's exit runs the script's atexit hooks too
started = time.monotonic()
os.waitpid(pid, 0)
print(f"the fork exited after {{time.monotonic() - started:.2f}} s", flush=True)
o.stop()
"""


def test_a_fork_of_the_script_cannot_drive_its_orchestrator_and_exits_at_once(tmp_path):
    """A fork has none of the coordinator's threads: what it asked was never done (a register
    went into a mailbox nobody reads), and its exit waited 22 s for a loop that was not there."""
    path = tmp_path / "forks.py"
    path.write_text(FORK_SCRIPT.format(tests=TESTS, address=f"tcp://127.0.0.1:{free_port()}"))
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "refused in the fork: register_agent: orchestrator 'forks' runs in process" in out, out
    assert "join refused in the fork" in out, out
    took = float(out.split("the fork exited after ")[1].split()[0])
    assert took < 5.0, out  # no wait: 22 s before
    assert "stopping its agents" not in out, out


MOVING_SCRIPT = """
import os, time
from pyorchestrate import Orchestrator, RunMode

o = Orchestrator("mover", address={address!r}, run_mode=RunMode.DAEMON, min_workers=0)
o.start()
os.makedirs("elsewhere", exist_ok=True)
os.chdir("elsewhere")  # the script's own business
o.stop()
"""


def test_a_clean_end_is_known_to_the_next_start_though_the_script_changed_directory(tmp_path):
    """With a relative ``$PYORCHESTRATE_STATE_DIR``, the ``clean`` marker written at the end went
    into the directory the script had moved to: the next start took the clean end for a crash and
    held every agent for the adoption window."""
    path = tmp_path / "mover.py"
    path.write_text(MOVING_SCRIPT.format(address=f"tcp://127.0.0.1:{free_port()}"))
    env = {**os.environ, "PYORCHESTRATE_STATE_DIR": "state"}
    runs = [subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "did not end cleanly" not in runs[1].stderr, runs[1].stderr


def test_a_changed_agent_waits_for_its_old_copy_however_long_that_copy_ignores_its_stop(cluster, tmp_path, scripts):
    """A restarted script changed an agent: its old copy is told to stop, and it is a thread stuck
    in its cycle for 8 s, far past its 1 s stop timeout.  Its worker is alive and says the copy still
    runs, so the new copy waits for the old one's end, however long: never two at once."""
    scripts.workers("w1", "w2")
    stuck = {"deaf": 8.0, "stop_timeout": 1.0}
    first = scripts.run("first", agents=1, workers=2, agent_config=stuck)
    wait_for(lambda: len(setups(tmp_path)) == 1, 30, "the agent to start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    second = scripts.run("second", agents=1, workers=2, versions={0: 2}, agent_config=stuck)
    wait_for(lambda: "setup agent0 2" in trace(tmp_path), 40, "the changed agent to start")
    lines = trace(tmp_path)
    assert lines.index("close agent0") < lines.index("setup agent0 2"), lines


@pytest.mark.parametrize("ending", ["sigterm", "sigint", "exception"])
def test_a_script_that_ends_without_stop_stops_its_agents_and_the_next_run_is_untouched(cluster, tmp_path, scripts,
                                                                                       ending):
    scripts.workers("w1")
    first = scripts.run("first", ending=ending)
    wait_for(lambda: len(setups(tmp_path)) == 3, 30, "3 agents to start")
    if ending != "exception":
        first.proc.send_signal(signal.SIGTERM if ending == "sigterm" else signal.SIGINT)
    first.proc.wait(30)
    # stopped the way stop() stops them, before the script was gone
    assert sorted(line for line in trace(tmp_path) if line.startswith("close")) == [f"close agent{i}" for i in range(3)]
    wait_for(lambda: "finished; stopping its agents" in cluster.log_of("w1"), 10, "the worker to be released")

    # the next run of the same script (same names, its epochs start at 1 again) is not confused
    # with the previous one: its agents start once, and nothing ends them
    second = scripts.run("second")
    wait_for(lambda: len(second.of("AGENT_READY")) == 3, 30, "the next run's agents to be READY")
    time.sleep(1.0)
    assert not second.of("AGENT_TERMINATED") and not second.of("AGENT_ADOPTED")
    assert len(setups(tmp_path)) == 6


def test_a_stalled_coordinator_loses_no_worker_and_fails_no_agent(cluster, tmp_path, scripts):
    scripts.workers("w1", "w2")
    script = scripts.run("stalled", agents=4, workers=2)
    wait_for(lambda: len(script.of("AGENT_READY")) == 4, 30, "4 agents READY")
    script.proc.send_signal(signal.SIGSTOP)
    time.sleep(1.5)  # 3x the liveness window (0.1 s x 5)
    script.proc.send_signal(signal.SIGCONT)
    time.sleep(2.0)
    assert not script.of("WORKER_LOST") and not script.of("AGENT_ERROR") and not script.of("AGENT_TERMINATED")
    # the workers noticed the silence and kept their agents (restart="never": on_disconnect="keep")
    assert "lease ran out" not in cluster.log_of("w1") + cluster.log_of("w2")
    assert len(setups(tmp_path)) == 4 and not [line for line in trace(tmp_path) if line.startswith("close")]
    assert script.proc.poll() is None


def test_a_burst_of_one_shot_agents_that_log_runs_each_exactly_once(cluster, tmp_path):
    """The reproduction scaled to the suite: many workers with a capacity, agents that log and
    publish, registered all at once; each must run exactly once (restart="never")."""
    from agents import CountedOnce


    runs = tmp_path / "runs.txt"
    workers = [f"w{i}" for i in range(6)]
    orch = cluster.orchestrator(min_workers=len(workers))
    orch.start()
    for name in workers:
        cluster.worker(orch.address, name, "--capacity", "5")
    names = [f"m{i}" for i in range(300)]
    for name in names:
        orch.register_agent(CountedOnce, name, CountedOnce.Config(runs=str(runs)))
    assert orch.join(timeout=120)
    executed = runs.read_text().split()
    assert sorted(executed) == sorted(names), (len(executed), len(set(executed)))
    status = orch.status()
    assert all(a["state"] == "TERMINATED" and not a["failed"] for a in status["agents"].values())
    assert all(not w["agents"] for w in status["workers"].values())


def test_a_long_daemon_run_forgets_finished_agents_and_frees_their_names(cluster):
    from agents import Quick

    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON,
                                finished_agents_max=5)
    orch.start()
    cluster.worker(orch.address, "w1")
    for i in range(20):
        orch.register_agent(Quick, f"q{i}")
    wait_for(lambda: orch.status()["forgotten_agents"] == 15, 30, "15 finished agents to be forgotten")
    status = orch.status()
    assert len(status["agents"]) == 5 and all(a["state"] == "TERMINATED" for a in status["agents"].values())
    forgotten = next(f"q{i}" for i in range(20) if f"q{i}" not in status["agents"])
    orch.register_agent(Quick, forgotten)  # a forgotten name is free again
    wait_for(lambda: orch.status()["agents"].get(forgotten, {}).get("state") == "TERMINATED", 30,
             f"{forgotten} to run again")
