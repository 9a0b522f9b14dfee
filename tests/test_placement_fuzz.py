"""Placement against a reference that looks at every pending agent in every pass.

placement keeps pending agents apart by kind and leaves a kind out of a pass once it has no room
(pending.py), parks agents waiting for a dependency, and says the reason of those it left out only
when a snapshot asks.  None of that may change a decision.  Seeded clusters of workers with and
without capacities and labels, agents that may go anywhere, pinned (to present and missing
workers), labelled, with dependencies, one-shot and long-running, some restarted after a failure,
some under max_workers, go through random registrations, runs that end well or badly, workers that
join and time that passes (restarts come due).  Before each placement the core is copied and
the copy placed the plain way: every pending agent, oldest first, in every pass.  After both have
settled (more passes while either has more to do), every agent's state, worker, failure and, while
pending, the reason a snapshot shows must agree, and the pending line's own bookkeeping must hold
together (sim.line_problems: it fails when an agent's watch on a dependency outlives its wait).

Its power was checked by breaking placement on purpose: it fails when the agents bound for
particular workers are left out once no worker has room (those bound for a missing worker were told
of room), when agents parked on a dependency are not woken when it changes state, or are woken out
of their place in the line, when the reason of the agents left out is not given, and when those
that may go anywhere are told of the slot when there is no room either; and (with long-running
agents and restarts, added later) when agents settled with their dependencies met are not woken
when one of them changes state, or are not put back in their place, or when a parked agent is
woken only by the one dependency it was found waiting for (it did not fail at once when another,
met before, failed: a bug this found).  (It forces a pass after
every change, so the pass a wake asks for is test_core's to check.)"""

from __future__ import annotations

import copy
import random

import pytest
from sim import line_problems
from test_core import Harness

from pyorchestrate import AgentState, commands
from pyorchestrate.placement import Free, choose
from pyorchestrate.states import LIVE

S = AgentState


def reference_place(core, now: float) -> bool:
    """One pass the plain way; whether it changed any agent's state."""
    before = {name: r.state for name, r in core.agents.items()}
    for record in sorted(core.states.of(S.RESTARTING), key=lambda r: r.restart_at):
        if record.restart_at <= now:  # its restart is due: back in the line, soonest first
            core.states.move(record, S.PENDING)
    free = Free(core.workers.values())
    cap = core.config.max_workers
    running = core.states.count(*LIVE) if cap else 0
    for record in core.states.of(S.PENDING):
        if record.state is not S.PENDING:
            continue
        anywhere = record.pin is None and not record.labels
        if record.depends_on:
            verdict, dependency = core._dependency_state(record)
            if verdict == "failed":
                core._fail_run(record, f"dependency {dependency} failed", now, final=True)
                continue
            if verdict == "wait":
                record.pending_reason = f"waiting for dependency {dependency} ({core.agents[dependency].state.value})"
                continue
        if anywhere and not free:
            record.pending_reason = free.why_none()
            continue
        if cap and running >= cap:
            record.pending_reason = f"waiting for a slot: max_workers={cap} agents are running"
            continue
        worker, why = (free.pop(), "") if anywhere else choose(core.workers.values(), record.pin, record.labels)
        if worker is None:
            record.pending_reason = why
            continue
        core._assign(record, worker, now)
        free.update(worker)
        running += 1
    return before != {name: r.state for name, r in core.agents.items()}


def seen(core, explain: bool) -> dict[str, tuple]:
    if explain:
        core.explain_waits()
    return {name: (r.state.value, r.worker if r.state is not S.PENDING else None, r.failed,
                   r.pending_reason if r.state is S.PENDING else "")
            for name, r in core.agents.items()}


def settle(h: Harness, step: int) -> None:
    """Both place until a pass changes no agent's state (ours: nor wakes one), then compare what
    that quiet pass says: which pass a reason was written in must not matter."""
    twin = copy.deepcopy(h.core)
    for _ in range(20):
        if not reference_place(twin, h.now):
            break
    for _ in range(20):
        before = {name: r.state for name, r in h.core.agents.items()}
        h.core._dirty = True  # a pass even when nothing asks for one: the quiet pass compared
        h.core.place(h.now)
        woke, h.core.states.pending.woke = h.core.states.pending.woke, False
        if before == {name: r.state for name, r in h.core.agents.items()} and not woke:
            break
    h.flush()
    assert not line_problems(h.core), line_problems(h.core)
    ours, plain = seen(h.core, True), seen(twin, False)
    assert ours == plain, (step, {name: (ours[name], plain[name]) for name in ours if ours[name] != plain[name]})


@pytest.mark.parametrize("seed", range(150))
def test_placement_decides_as_a_pass_over_every_pending_agent_would(seed):
    rng = random.Random(seed)
    h = Harness(max_workers=rng.choice([None, None, 2, 4]))
    workers = []

    def join() -> None:
        name = f"w{len(workers) + 1}"
        h.register(name)
        record = h.core.workers[name]
        record.capacity = rng.choice([0, 1, 1, 2, 3])
        record.labels = rng.choice([{}, {}, {"gpu": "1"}])
        workers.append(name)

    for _ in range(rng.randint(1, 3)):
        join()
    names: list[str] = []
    for step in range(60):
        roll = rng.random()
        if roll < 0.3:
            for _ in range(rng.randint(1, 6)):
                name = f"a{len(names)}"
                fields: dict = {}
                kind = rng.random()
                if kind < 0.2:
                    fields["pin"] = rng.choice(workers + ["w9"])
                elif kind < 0.3:
                    fields["labels"] = {"gpu": "1"}
                if names and rng.random() < 0.35:
                    fields["depends_on"] = rng.sample(names, min(len(names), rng.randint(1, 2)))
                if rng.random() < 0.3:  # long-running: READY is what its dependents wait for
                    fields["one_shot"] = False
                # restarted after a failure: a dependency that was met is not for a while
                h.add(name, restart="on-failure" if rng.random() < 0.2 else "never", **fields)
                names.append(name)
        elif roll < 0.85:
            live = [r for r in h.core.agents.values() if r.state in (S.ASSIGNED, S.STARTED, S.READY)]
            for record in rng.sample(live, min(len(live), rng.randint(1, 4))):
                identity = record.worker.encode()
                if record.state is S.ASSIGNED:
                    h.report(identity, record, "AGENT_STARTED")
                elif record.state is S.STARTED and rng.random() < 0.7:
                    h.report(identity, record, "AGENT_READY")
                elif rng.random() < 0.7:
                    h.report(identity, record, "AGENT_TERMINATED", reached=record.state.value)
                else:
                    h.report(identity, record, "AGENT_ERROR", error_message="x", traceback="")
                    h.report(identity, record, "AGENT_TERMINATED", ok=False)
        elif roll < 0.92 and len(workers) < 6:
            join()
        elif roll < 0.93:
            h.now += rng.uniform(0.2, 5.0)  # restarts come due (no tick: no worker is judged)
        elif names and roll < 0.96:
            name = rng.choice(names)
            if h.core.agents[name].state is S.PENDING and names.index(name) > 0:
                deps = rng.sample(names[:names.index(name)], 1)
                h.core.command(commands.AddDependency(name, deps), h.now)
        settle(h, step)
