"""A kept copy (on_disconnect="keep") that the coordinator gives up on (disconnect_timeout) is
replaced once its cut-off worker's orphan timeout and its stop timeout have passed: by then the
copy must be gone, as a copy stopped at the lease's end is.  It was still "kept" on its worker,
so nothing held it to that: a thread agent lingering in ``on_stop`` and a thread an agent left
running ran on beside the replacement (for good), a process agent deaf to SIGTERM for 0.8 s.

The cut: the worker reaches the coordinator through a relay (relay.py), SIGSTOPped."""

from __future__ import annotations

import os
import signal
import time

import pytest
import relay
from agents import CopyTracer, CopyTracerProcess, ThreadLeaver
from conftest import EventLog, wait_for

from pyorchestrate import RunMode

KINDS = {
    # a thread agent that lingers 30 s in on_stop (its stop timeout: 1 s)
    "lingering thread": (CopyTracer, dict(linger=30.0), ""),
    # a thread agent that stops at once but leaves a thread of its own running
    "thread left running": (ThreadLeaver, {}, "-helper"),
    # a process agent that lingers in on_stop and ignores SIGTERM
    "process deaf to SIGTERM": (CopyTracerProcess, dict(linger=30.0, deaf_to_sigterm=True), ""),
}


def lines(trace) -> list[list[str]]:
    return [line.split() for line in trace.read_text().splitlines()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_kept_copy_given_up_on_is_gone_when_its_replacement_starts(cluster, tmp_path, kind):
    cls, settings, follow = KINDS[kind]
    trace = tmp_path / "trace.txt"
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_liveness=10, disconnect_timeout=1.0)
    events = EventLog(orch)
    orch.start()
    cut, address = relay.start(orch.address)
    try:
        cluster.worker(address, "w1", "--orphan-timeout", "2")
        events.wait("WORKER_JOINED", "w1")
        orch.register_agent(cls, "k", cls.Config(trace=str(trace), stop_timeout=1.0, **settings),
                            restart="always", on_disconnect="keep")
        events.wait("AGENT_READY", "k")
        old = [w for kind_, w, *_ in lines(trace) if kind_ == "start"][0]
        wait_for(lambda: sum(1 for line in lines(trace) if line[:2] == ["alive", old + follow]) >= 3, 30,
                 "the copy at work")
        cluster.worker(orch.address, "w2")
        events.wait("WORKER_JOINED", "w2")
        cut.send_signal(signal.SIGSTOP)
        # lost after 1 s, given up 1 s later, replaced after the orphan timeout (2 s) and its stop timeout
        assert events.wait("AGENT_READY", "k", count=2, timeout=30)[-1]["worker"] == "w2"
        started = float([when for kind_, w, when in lines(trace) if kind_ == "start" and w != old][0])
        time.sleep(3.0)
        late = [float(when) - started for kind_, w, when in lines(trace)
                if kind_ == "alive" and w == old + follow and float(when) > started]
        assert not late, f"the old copy ran on beside its replacement: {len(late)} line(s), the last {max(late):.2f} s after"
        assert "(orphan timeout): stopping 1 agent(s)" in cluster.log_of("w1")
    finally:
        os.kill(cut.pid, signal.SIGKILL)
        cut.wait(10)
