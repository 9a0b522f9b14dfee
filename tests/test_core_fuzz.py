"""The cluster core against workers that say odd things: frames that pass protocol.py's schema but
make little sense (events of other runs, of copies another worker runs, out of order, with fields
of the wrong type; registrations listing copies in made-up states).  Seeded and bounded: the same
seed replays the same frames.

What must hold after every frame: nothing but a ProtocolError escapes the core (anything else
would leave its state half changed), the state index agrees with every record, a copy the core
counts as running is in its worker's list and nowhere else, a run's STARTED, READY and end are
each published once at most, and a report from a worker that does not run the copy, or about
another run or epoch of it, changes nothing about it.

Its power was checked by breaking the core on purpose: it fails when agent_event stops checking
the reporting worker or the epoch, or stops refusing a second STARTED or READY of a run, or says
READY again at a folded end after it was said."""

from __future__ import annotations

import logging
import random

import pytest
from test_core import Harness

from pyorchestrate import AgentState, protocol

S = AgentState
RUNNING = (S.ASSIGNED, S.STARTED, S.READY)
EVENTS = ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", "AGENT_ERROR", "AGENT_HEARTBEAT", "NO_SUCH_EVENT"]
ODD_VALUES = [None, True, False, 0, -1, 2**40, 1.5, "", "READY", "STARTED", "x", [], {}, [1], {"a": 1}, b"b"]
FIELD_NAMES = ["ok", "reached", "folded", "bus_publisher", "bus_incarnation", "bus_seq", "recoverable",
               "error_message", "traceback", "final", "exit_code", "agent_name", "worker", "epoch", "host",
               "event_date", "event_time", "recovered", "state", "event", "seq", "publisher"]


def _odd_fields(rng: random.Random) -> dict:
    fields = {name: rng.choice(ODD_VALUES) for name in rng.sample(FIELD_NAMES, rng.randint(0, 6))}
    if rng.random() < 0.5:  # half of them as a worker would send them, so the odd ones meet real states
        fields.update(ok=rng.random() < 0.7, reached=rng.choice(["READY", "STARTED"]), folded=rng.random() < 0.5)
    return fields


def _broken_invariant(h: Harness) -> str | None:
    core = h.core
    said = set()
    for publish in h.published:  # each run's STARTED, READY and end: said once at most
        if publish.event.value in ("AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"):
            key = (publish.subject, publish.fields.get("epoch"), publish.event.value)
            if key in said:
                return f"{publish.event.value} of {publish.subject} (epoch {key[1]}) said twice"
            said.add(key)
    for record in core.agents.values():
        if record.name not in core.states._by_state[record.state]:
            return f"{record.name} is {record.state.name} but not indexed so"
        if record.state in RUNNING:
            worker = core.workers.get(record.worker or "")
            if worker is None or record.name not in worker.agents:
                return f"{record.name} is {record.state.name} on {record.worker} but not in its worker's list"
    for worker in core.workers.values():
        for name in worker.agents:
            record = core.agents.get(name)
            if record is not None and record.state in RUNNING and record.worker != worker.name:
                return f"{name} is listed on {worker.name} but runs on {record.worker}"
    return None


def _one_frame(h: Harness, rng: random.Random, records: list, workers: list[bytes]) -> None:
    record = rng.choice(records)
    identity = rng.choice(workers)
    roll = rng.random()
    if roll < 0.6:
        run = record.run if rng.random() < 0.8 else "another-run"
        epoch = record.epoch if rng.random() < 0.8 else rng.choice([0, record.epoch + 1, -5])
        items = [protocol.agent_event(record.name, run, epoch, rng.choice(EVENTS), _odd_fields(rng))
                 for _ in range(rng.randint(1, 3))]
        frame = protocol.decode(protocol.encode("agent_events", n=0, events=items))
        # not its worker, or not its current run: nothing about the copy may change
        stale = record.state in RUNNING and (record.worker != identity.decode() or (run, epoch) != (record.run, record.epoch))
        before = (record.state, record.worker, record.run, record.epoch, record.error)
        h.core.control(identity, frame, h.now)
        if stale:
            assert (record.state, record.worker, record.run, record.epoch, record.error) == before, \
                f"{identity.decode()} changed {record.name} (run {run}, epoch {epoch}): it was {before}"
    elif roll < 0.75:
        listed = {"agent": record.name, "run": record.run if rng.random() < 0.8 else "another-run",
                  "epoch": record.epoch, "state": rng.choice(["READY", "STARTED", "TERMINATED", "NO_SUCH_STATE", ""]),
                  "coordinator": rng.choice(["c", "another-coordinator"]),
                  "definition": record.definition if rng.random() < 0.8 else "another-definition"}
        other = rng.choice(records)
        delivered = [protocol.agent_event(other.name, other.run, other.epoch, rng.choice(EVENTS), _odd_fields(rng))
                     for _ in range(rng.randint(0, 2))]
        h.register(identity.decode(), identity=identity, agents=[listed] * rng.randint(0, 2), events=delivered,
                   seen=rng.choice([0, 1, 5, 1000]), conn=rng.choice([1, 2]),
                   incarnation=rng.choice(["w-inc", "w-inc", "w-restarted"]))
    elif roll < 0.85:
        h.beat(identity, running=rng.choice([-1, 0, 1, 5]), read=rng.choice([-1, 0, 3, 100]))
    elif roll < 0.9:
        h.core.control(identity, protocol.decode(protocol.encode("goodbye", n=0)), h.now)
    else:
        h.step(rng.choice([0.0, 0.5, 3.0]))


@pytest.mark.parametrize("block", range(4))
def test_odd_but_well_formed_frames_from_workers_never_break_the_core(block, caplog):
    caplog.set_level(logging.CRITICAL)  # the core says a lot about such workers; not the point here
    for seed in range(block * 60, block * 60 + 60):
        rng = random.Random(seed)
        h = Harness()
        workers = [h.register(f"w{i}") for i in range(2)]
        records = [h.add(f"a{i}", restart=rng.choice(["never", "on-failure", "always"])) for i in range(4)]
        h.step()
        for step in range(60):
            try:
                _one_frame(h, rng, records, workers)
            except protocol.ProtocolError:
                pass
            h.flush()
            h.step()
            broken = _broken_invariant(h)
            assert broken is None, f"seed {seed}, frame {step}: {broken}"
