"""The seed example, as a user runs it: embedded, and across two workers started by hand."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from conftest import REPO, free_port, run_script, wait_for

from pyorchestrate import protocol

SEED = REPO / "examples" / "seed"


def placements(stderr: str) -> dict[str, str]:
    return dict(re.findall(r"agent (\w+) started on (\S+)", stderr))


def test_seed_runs_on_the_embedded_default():
    result = run_script(["main.py"], cwd=SEED, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "published 5 readings" in result.stderr
    assert result.stderr.count("processing a batch") == 3
    assert set(placements(result.stderr)) == {"Publisher", "Subscriber"}
    for agent in ("Publisher", "Subscriber"):
        assert f"agent {agent} terminated" in result.stderr
    assert "ERROR" not in result.stderr


def test_seed_across_two_workers_started_first_from_another_directory(cluster, tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # workers first: they wait for the coordinator, retrying with backoff
    w1 = cluster.worker(address, "w1")
    w2 = cluster.worker(address, "w2")
    wait_for(lambda: "no coordinator at" in cluster.log_of("w1"), 10, "w1 to report it is waiting")
    # the workers cannot import the user's package from where they run
    probe = run_script(["-c", "import my_project"], cwd=tmp_path / "worker-w1")
    assert probe.returncode != 0 and "No module named 'my_project'" in probe.stderr

    first = run_script(["main.py", address], cwd=SEED, timeout=60)
    assert first.returncode == 0, first.stderr
    assert sorted(placements(first.stderr).values()) == ["w1", "w2"], "two agents spread over two workers"
    # the workers print their agents' lines from their log threads: they may come a moment later
    wait_for(lambda: "published 5 readings" in cluster.log_of("w1") + cluster.log_of("w2")
             and (cluster.log_of("w1") + cluster.log_of("w2")).count("processing a batch") == 3, 10,
             "the agents' lines in the workers' logs")

    # the same workers serve the next script
    second = run_script(["main.py", address], cwd=SEED, timeout=60)
    assert second.returncode == 0, second.stderr
    assert sorted(placements(second.stderr).values()) == ["w1", "w2"]

    for worker in (w1, w2):
        worker.send_signal(signal.SIGTERM)
    assert w1.wait(15) == 0 and w2.wait(15) == 0


def test_process_agent_defined_in_main(tmp_path):
    script = tmp_path / "script.py"
    out = tmp_path / "out.txt"
    script.write_text(
        "import os, sys\n"
        "from pyorchestrate import Orchestrator, BaseProcessAgent, OrchestratorEvent\n"
        "class InMain(BaseProcessAgent):\n"
        "    class Config(BaseProcessAgent.Config):\n"
        "        out = ''\n"
        "    def execute(self):\n"
        "        with open(self.config.out, 'w') as f:\n"
        "            f.write(f'{os.getpid()} {__name__}')\n"
        "if __name__ == '__main__':\n"
        "    seen = []\n"
        # default liveness: what this test is about is the agent class defined in __main__, not
        # how fast a fault is noticed (at 0.1 s the worker's first process-agent start, then on
        # its loop, once cost it its liveness beside 4 CPU burners; that start is off the loop now)
        "    o = Orchestrator('main-test')\n"
        "    for e in (OrchestratorEvent.AGENT_STARTED, OrchestratorEvent.AGENT_READY,\n"
        "              OrchestratorEvent.AGENT_ERROR, OrchestratorEvent.AGENT_TERMINATED):\n"
        "        o.register_event(e, lambda event: seen.append(event))\n"
        f"    o.register_agent(InMain, 'in-main', InMain.Config(out={str(out)!r}))\n"
        "    o.start(); o.join()\n"
        "    print(' '.join(seen), os.getpid())\n")
    result = run_script([str(script)], cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    events, script_pid = result.stdout.split()[:-1], result.stdout.split()[-1]
    assert events == ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"]
    agent_pid, module = out.read_text().split()
    assert agent_pid != script_pid


def test_worker_cli_help_version_and_bad_arguments(tmp_path):
    def worker(*args):
        return subprocess.run([sys.executable, "-m", "pyorchestrate_worker", *args], capture_output=True,
                              text=True, timeout=30, cwd=tmp_path)

    help_text = worker("--help")
    assert help_text.returncode == 0
    for option in ("--coordinator", "--name", "--labels", "--capacity", "--version"):
        assert option in help_text.stdout
    version = worker("--version")
    assert version.returncode == 0 and f"protocol={protocol.PROTOCOL_VERSION}" in version.stdout and "cloudpickle=" in version.stdout
    bad_labels = worker("--coordinator", "tcp://127.0.0.1:1", "--labels", "gpu")
    assert bad_labels.returncode == 2 and "key=value" in bad_labels.stderr
    bad_address = worker("--coordinator", "localhost:5555")
    assert bad_address.returncode == 2 and "tcp://HOST:PORT" in bad_address.stderr
    bad_capacity = worker("--coordinator", "tcp://127.0.0.1:1", "--capacity", "lots")
    assert bad_capacity.returncode == 2 and "whole number" in bad_capacity.stderr


def test_waiting_worker_exits_0_on_sigterm(cluster):
    worker = cluster.worker(f"tcp://127.0.0.1:{free_port()}", "idle")
    wait_for(lambda: "no coordinator at" in cluster.log_of("idle"), 10, "worker to wait")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 0


def test_writing_agents_example_runs_every_behaviour():
    result = run_script([str(REPO / "examples" / "writing_agents.py")], cwd=REPO, timeout=90)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for expected in ("hello, once", "sum of squares", "half a second after READY", "condition met after 3 polls",
                     "deploying version 1.2", "try 1: service unavailable", "connected on try 3", "says"):
        assert expected in err, expected
    # each agent line shows once: embedded workers do not print what the coordinator re-emits
    assert err.count("fetched") == 6 and err.count("cycle [") == 3
    for agent in ("Hello", "Crunch", "Reminder", "WhenReady", "Deploy", "Flaky", "Counter", "Sampler", "Dashboard",
                  "Fetcher"):
        assert f"agent {agent} terminated" in err, agent


def test_readme_scripts_run_as_written(tmp_path):
    """Every Python block of the README that is a whole script (it has a __main__ guard) runs."""
    import re

    blocks = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S) if "__main__" in b]
    assert blocks, "the README has no runnable script"
    for i, block in enumerate(blocks):
        script = tmp_path / f"readme_{i}.py"
        script.write_text(block)
        done = run_script([str(script)], cwd=tmp_path, timeout=90)
        assert done.returncode == 0, f"README script {i}:\n{block}\n{done.stderr[-2000:]}"
