"""``pyorchestrate-worker --nice N`` (worker/priority.py): the worker and every agent it runs give
up CPU priority to the coordinator beside them; a worker that leads its session lowers the
session's autogroup too (else nice would only rank it within its session), never a session it
shares; its pulse keeps the normal priority.  Real processes, values read back from /proc."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest
from conftest import live_children, start_daemon, wait_for

from pyorchestrate import BaseProcessAgent, BaseThreadAgent, ConfigValidationError, Orchestrator, RunMode
from pyorchestrate_worker import priority

#: for a child to print its own session's autogroup nice: "None" where there is no autogroup, and
#: where its session is in the root group (sessions of init's, as CI's runner is: the kernel then
#: prints an empty /proc/self/autogroup)
_OWN_AUTOGROUP = ("((lambda t: t.split()[-1] if t.strip() else None)(open('/proc/self/autogroup').read()) "
                  "if __import__('os').path.exists('/proc/self/autogroup') else None)")


@functools.lru_cache(maxsize=1)
def _autogroup_settable() -> bool:
    """Can a session leader set its session's autogroup nice here (kernel with autogroup, and a
    /proc that lets it)?  Where not, only the process nice is checked."""
    code = f"from pyorchestrate_worker import priority; priority.lower(1); print({_OWN_AUTOGROUP})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         start_new_session=True).stdout.strip()
    return out == "1"


def _nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19: nice


def _autogroup_nice(pid: int) -> int | None:
    """The autogroup nice of ``pid``'s session (None: no autogroup here, or no such process)."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().rsplit("nice", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def _is_pulse(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"pulse" in f.read()
    except OSError:  # gone meanwhile
        return False


class SaysItsNiceT(BaseThreadAgent):
    def execute(self):
        self.logger.info("nice=%d", os.getpriority(os.PRIO_PROCESS, 0))


class SaysItsNiceP(BaseProcessAgent):
    def execute(self):
        self.logger.info("nice=%d", os.getpriority(os.PRIO_PROCESS, 0))


def test_a_niced_worker_runs_its_agents_niced_and_its_pulse_at_normal_priority(cluster):
    orch, events = start_daemon(cluster, ("w1", "--nice", "7", "--pulse", "always"))
    worker = cluster.workers["w1"]
    assert _nice_of(worker.pid) == 7
    if _autogroup_settable():  # it leads its session (start_new_session): its session's group is niced too
        assert _autogroup_nice(worker.pid) == 7
    orch.register_agent(SaysItsNiceT, "t")
    orch.register_agent(SaysItsNiceP, "p")
    ended = events.wait("AGENT_TERMINATED", count=2, timeout=30)
    assert all(e["ok"] for e in ended), ended
    def said():
        return {e["agent_name"]: int(m.group(1)) for e in events.of("AGENT_LOG")
                if (m := re.search(r"nice=(\d+)", e["message"]))}

    wait_for(lambda: len(said()) == 2, 15, "both agents' log lines")
    assert said() == {"t": 7, "p": 7}
    pulses = wait_for(lambda: [p for p in live_children(worker.pid) if _is_pulse(p)], 15, "the pulse process")
    pulse = pulses[0]
    assert os.getsid(pulse) != os.getsid(worker.pid)  # a session (a scheduler group) of its own
    if _autogroup_settable():
        assert _autogroup_nice(pulse) == 0


@pytest.mark.parametrize("own_session", [True, False])
def test_lower_touches_the_session_only_if_the_worker_leads_it(own_session):
    """Started from a shell, a worker shares the shell's session: lowering the session's group
    would lower the user's terminal; only the process is niced then."""
    code = ("import os; from pyorchestrate_worker import priority; done = priority.lower(4); "
            f"print(os.getpriority(os.PRIO_PROCESS, 0), {_OWN_AUTOGROUP}, done)")
    before = _autogroup_nice(os.getpid())
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           start_new_session=own_session)
    assert child.returncode == 0, child.stderr
    out = child.stdout.split(maxsplit=2)
    assert int(out[0]) == 4
    if _autogroup_settable():
        assert out[1] == str(4 if own_session else before)  # "None" for a session in the root group
        assert _autogroup_nice(os.getpid()) == before  # ours is never touched


def test_local_workers_take_the_configured_nice():
    orch = Orchestrator("nice", config=Orchestrator.Config(local_worker_nice=5, run_mode=RunMode.DAEMON))
    orch.start()
    try:
        workers = wait_for(lambda: orch.status()["workers"] or None, 30, "the local worker")
        (worker,) = workers.values()
        assert _nice_of(worker["pid"]) == 5
        if _autogroup_settable():
            assert _autogroup_nice(worker["pid"]) == 5
    finally:
        orch.stop(timeout=10)


@pytest.mark.parametrize("value", [-1, 20, 2.5, True, "5"])
def test_a_nice_out_of_range_is_refused_with_what_to_use(value):
    with pytest.raises(ValueError, match="whole number from 0"):
        priority.check(value)
    with pytest.raises(ConfigValidationError, match="local_worker_nice"):  # at start, with every finding
        Orchestrator("bad", config=Orchestrator.Config(local_worker_nice=value)).start()
    if isinstance(value, int) and not isinstance(value, bool):
        cli = subprocess.run([sys.executable, "-m", "pyorchestrate_worker", "--coordinator", "tcp://127.0.0.1:1",
                              "--nice", str(value)], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 2 and "--nice" in cli.stderr and "from 0" in cli.stderr, cli.stderr
