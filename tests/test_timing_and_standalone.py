"""Timing claims, measured by tolerance, and every behaviour run standalone (no orchestrator)."""

from __future__ import annotations

import time

import pytest
from behaviours import (CONDITIONAL, DEFERRED, EVENTDRIVEN, METRONOME, ONESHOT, PERIODIC, POOL, RECOVERY, STALLING,
                        TRIGGERED, WAITS_FOREVER)
from conftest import start_daemon, wait_for

from pyorchestrate.agents.looping import catch_up


def ticks(path):
    return [float(line.split()[0]) for line in path.read_text().splitlines() if line.split()[1] == "tick"]


def lateness(starts, interval):
    """How late each start is against a fixed schedule from the first one."""
    return [t - (starts[0] + i * interval) for i, t in enumerate(starts)]


@pytest.mark.parametrize("where", ["standalone", "thread", "process"])
def test_delay_compensation_keeps_20_cycles_on_schedule_and_plain_intervals_drift(cluster, tmp_path, where):
    interval = 0.05
    runs = {}
    for compensate in (True, False):
        out = tmp_path / f"out-{compensate}"
        mode = "thread" if where == "standalone" else where
        cfg = METRONOME[mode].Config(out=str(out), execution_interval=interval, limit=20,
                                     delay_compensation=compensate)
        if where == "standalone":
            agent = METRONOME[mode](config=cfg)
            agent.start()
            assert agent.join(20)
        else:
            if not runs:
                orch, events = start_daemon(cluster, ("w1",))
            name = f"metronome-{compensate}"
            orch.register_agent(METRONOME[mode], name, cfg)
            events.wait("AGENT_TERMINATED", name, timeout=30)
        runs[compensate] = lateness(ticks(out), interval)
    assert len(runs[True]) == len(runs[False]) == 20
    # compensated: the 20th start stays on the schedule (2 cores under test load: generous bound)
    assert abs(runs[True][-1]) < 0.15, runs[True]
    # plain: each wait starts after the 20 ms run, so the 20th start is about 19 x 20 ms late
    assert runs[False][-1] > 0.3, runs[False]
    # and the interval itself is kept: starts are at least one interval apart, on average not much more
    gaps = [b - a for a, b in zip(runs[False], runs[False][1:])]
    assert min(gaps) > -0.005 and sum(gaps) / len(gaps) < 0.05


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_waits_of_any_length_wait_until_the_stop(tmp_path, mode):
    """``wait_stop(float("inf"))``, or a 1e10 s ``execution_interval``, ended the agent at once
    with OverflowError ("timestamp out of range for platform time_t"; a process agent's
    process-shared event: OSError for inf) instead of waiting for the stop."""
    words = {}
    agents = {}
    for kind, cls, settings in (("inf", WAITS_FOREVER[mode], {}),
                                ("1e10", METRONOME[mode], {"execution_interval": 1e10})):
        out = tmp_path / kind
        agents[kind] = cls(config=cls.Config(out=str(out), **settings))
        agents[kind].start()
        words[kind] = out
    # its first cycle begun (a process agent starts in seconds on a busy machine), then a moment
    # for the wait that raised at once to end the agent
    wait_for(lambda: all(out.exists() for out in words.values()), 60, "each agent's first cycle")
    time.sleep(0.5)
    for kind, agent in agents.items():
        assert agent.is_alive(), f"{kind}: {words[kind].read_text()}"
        agent.stop()
        assert agent.join(20), kind
    assert [line.split()[1] for line in words["inf"].read_text().splitlines()] == ["waiting", "stopped"]
    assert [line.split()[1] for line in words["1e10"].read_text().splitlines()] == ["tick"]


def test_catch_up_moves_a_late_run_to_the_latest_slot_due_and_no_further():
    assert catch_up(1.0, 1.0, 0.5) == 1.0  # early: the slot it waits for
    assert catch_up(1.0, 1.0, 1.9) == 1.0  # late, but no later slot has come: it is this one's run
    assert catch_up(1.0, 1.0, 2.0) == 2.0 and catch_up(1.0, 1.0, 3.5) == 3.0  # slots 1 (and 2) skipped
    assert catch_up(1.0, 0.0, 50.0) == 1.0  # no interval: nothing to skip


@pytest.mark.parametrize("family", ["Periodic", "Pool"])
def test_delay_compensation_skips_the_runs_a_stall_missed_instead_of_running_them_at_once(tmp_path, family):
    """A run (or a stall of the machine) 10 intervals long made the next 10 runs start back to
    back, within a few ms, to catch up; now the latest missed one runs, late, and the schedule
    goes on from it."""
    interval, out = 0.05, tmp_path / "out"
    cls = STALLING[family]["thread"]
    agent = cls(config=cls.Config(out=str(out), execution_interval=interval, limit=14, delay_compensation=True,
                                  **({"pool_size": 1} if family == "Pool" else {})))
    agent.start()
    assert agent.join(30)
    starts = ticks(out)
    assert len(starts) == 14 and starts[3] - starts[2] >= 0.5
    after = [t - starts[3] for t in starts[3:]]
    # the late run, then the schedule: at most the one late run and two slots in 0.1 s
    assert sum(t < 2 * interval for t in after) <= 3, after
    # the 9 slots the long run covered are skipped, not run: the 14 runs span 22 intervals, not 13
    assert starts[-1] - starts[0] > 20 * interval, starts


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_every_behaviour_runs_standalone(tmp_path, mode):
    def run(cls, **settings):
        out = tmp_path / f"{cls.__name__}.out"
        agent = cls(config=cls.Config(out=str(out), **settings))
        agent.start()
        return agent, out

    def lines(out):
        return [line.split()[1] for line in out.read_text().splitlines()] if out.exists() else []

    started = [
        run(ONESHOT[mode]),
        run(DEFERRED[mode], delay=0.2),
        run(RECOVERY[mode], max_retries=3, backoff=(0.01, 0.05, 0.0)),
        run(POOL[mode], pool_size=2, execution_interval=0.01, limit=4),
        run(PERIODIC[mode], execution_interval=0.01, limit=3),
    ]
    conditional, cond_out = run(CONDITIONAL[mode], poll_interval=0.02)
    (tmp_path / f"{CONDITIONAL[mode].__name__}.out.go").touch()
    for agent, _ in started + [(conditional, cond_out)]:
        assert agent.join(30), agent
    outs = [out for _, out in started]
    assert lines(outs[0]) == ["ran"] and lines(outs[1]) == ["ran"]
    assert lines(outs[2]) == ["try", "try", "try"]
    assert lines(outs[3]).count("end") == 4 and lines(outs[4]) == ["run", "run", "run"]
    assert lines(cond_out) == ["ran"]
    if mode == "thread":  # deliveries standalone: straight into the agent
        trig, trig_out = run(TRIGGERED[mode])
        trig.deliver("trigger", {"go": 1})
        listener, listener_out = run(EVENTDRIVEN[mode], limit=1)
        listener.deliver("message", "hi")
        assert trig.join(10) and listener.join(10)
        assert lines(trig_out) == ["payload"] and lines(listener_out) == ["MESSAGE"]
