"""Agent scheduling on the coordinator: placement, the concurrency cap, dependencies, restarts,
draining and runtime control.  Runs on the coordinator's loop thread (mixed into Coordinator)."""

from __future__ import annotations

import collections
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from .dependencies import check_graph
from .events import OrchestratorEvent
from .placement import choose
from .restart import RestartPolicy

log = logging.getLogger("pyorchestrate.coordinator")

TERMINAL = "TERMINATED"
RUNNING = ("ASSIGNED", "STARTED", "READY")


@dataclass
class AgentRecord:
    """What the coordinator knows of one registered agent."""

    name: str
    agent_class: type
    config: Any
    class_id: str
    class_blob: bytes
    config_blob: bytes
    mode: str
    pin: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    state: str = "PENDING"
    worker: str | None = None
    epoch: int = 0
    error: str | None = None
    failed: bool = False
    started_at: float | None = None
    restarts: int = 0
    pending_reason: str = ""
    restart_at: float = 0.0
    stop_requested: bool = False  #: stopped on purpose: never restarted
    run_errored: bool = False  #: the current run reported AGENT_ERROR
    one_shot: bool = True  #: runs once (Base agents), as opposed to Looping/Periodic
    then: str | None = None  #: after this run: "move" (drain) or "restart" (restart_agent)
    index: StateIndex | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "state":
            index = self.__dict__.get("index")
            if index is not None:
                index.moved(self, self.__dict__["state"], value)
        object.__setattr__(self, key, value)


class StateIndex:
    """The coordinator's agents grouped by state, kept current as states change, so its loop asks
    "which are pending?" or "have all finished?" without scanning every agent on every turn
    (which made a cluster with thousands of agents quadratic).  Within a state, agents are in
    the order they entered it: FIFO for placement."""

    def __init__(self) -> None:
        self._by_state: dict[str, dict[str, AgentRecord]] = collections.defaultdict(dict)

    def add(self, record: AgentRecord) -> None:
        record.index = self
        self._by_state[record.state][record.name] = record

    def moved(self, record: AgentRecord, old: str, new: str) -> None:
        del self._by_state[old][record.name]
        self._by_state[new][record.name] = record

    def count(self, *states: str) -> int:
        return sum(len(self._by_state[s]) for s in states)

    def of(self, state: str) -> list[AgentRecord]:
        """The agents in ``state`` now (a copy: the caller may change their states)."""
        return list(self._by_state[state].values())


class Scheduling:
    """Decides what runs where and what happens when a run ends."""

    agents: dict[str, AgentRecord]
    states: StateIndex
    workers: dict[str, Any]
    config: Any
    min_workers: int
    _rng = random.Random()

    # ------------------------------------------------------------------ placement

    def _place_pending(self) -> None:
        if not self._dirty or self._stopping_deadline is not None:
            return
        self._dirty = False
        now = time.monotonic()
        if not self._workers_ready:
            if sum(w.alive for w in self.workers.values()) < max(1, self.min_workers):
                for record in self.states.of("PENDING"):
                    record.pending_reason = f"waiting for min_workers={self.min_workers} worker(s) to join"
                return
            self._workers_ready = True
        for record in self.states.of("RESTARTING"):
            if now >= record.restart_at:
                record.state = "PENDING"
        cap = self.config.max_workers
        running = self.states.count(*RUNNING)
        for record in self.states.of("PENDING"):
            if record.state != "PENDING":  # failed meanwhile, as a dependent of one that failed
                continue
            verdict, detail = self._dependency_state(record)
            if verdict == "failed":
                self._fail_run(record, f"dependency {detail} failed", final=True)
                continue
            if verdict == "wait":
                record.pending_reason = f"waiting for dependency {detail}"
                continue
            if cap and running >= cap:
                record.pending_reason = f"waiting for a slot: max_workers={cap} agents are running"
                continue
            worker, why = choose(self.workers.values(), record.pin, record.labels)
            if worker is None:
                record.pending_reason = why
                continue
            self._assign(record, worker)
            running += 1

    def _dependency_state(self, record: AgentRecord) -> tuple[str, str]:
        # a long-running dependency (Looping/Periodic) must be READY; a one-shot one (a migration,
        # say) must have finished without error
        for name in record.depends_on:
            dep = self.agents[name]
            if (dep.state == "READY" and not dep.one_shot) or (dep.state == TERMINAL and not dep.failed):
                continue
            if dep.state == TERMINAL:
                return "failed", name
            return "wait", f"{name} ({dep.state})"
        return "ok", ""

    def _assign(self, record: AgentRecord, worker: Any) -> None:
        record.epoch += 1
        record.worker = worker.name
        record.state = "ASSIGNED"
        record.pending_reason = ""
        record.started_at = time.time()
        worker.agents.add(record.name)
        first = record.class_id not in worker.sent_classes
        worker.sent_classes.add(record.class_id)
        self.class_blobs_sent += first
        self._send(worker, protocol.encode(
            "start", agent=record.name, epoch=record.epoch, class_id=record.class_id,
            class_blob=record.class_blob if first else None, config=record.config_blob, mode=record.mode,
            stop_timeout=float(getattr(record.config, "stop_timeout", 10.0)), hold=bool(self.config.hold_after_ready)))

    # ------------------------------------------------------------------ the end of a run

    def _fail_run(self, record: AgentRecord, reason: str, *, final: bool = False) -> None:
        """End the current run (or the wait for one) as failed, with an AGENT_ERROR first."""
        record.error = reason
        self._publish_agent(record, OrchestratorEvent.AGENT_ERROR, {"error_message": reason, "traceback": ""})
        self._run_over(record, ok=False, fields={"reason": reason}, final=final)

    def _run_over(self, record: AgentRecord, ok: bool, fields: dict[str, Any], *, final: bool = False) -> None:
        """Publish AGENT_TERMINATED for the run that ended and decide what happens next."""
        worker = self.workers.get(record.worker or "")
        if worker is not None:
            worker.agents.discard(record.name)
        record.failed = not ok
        then, record.then = record.then, None
        policy = record.policy
        if final or record.stop_requested:
            nxt = "final"
        elif then in ("move", "restart"):
            nxt = "again"
        elif policy.wants_restart(failed=not ok):
            nxt = "give_up" if policy.exhausted(record.restarts) else "restart"
        else:
            nxt = "final"
        record.state = TERMINAL
        self._publish_agent(record, OrchestratorEvent.AGENT_TERMINATED,
                            {**fields, "ok": ok, "final": nxt == "final"}, worker)
        self._dirty = True
        if nxt == "again":
            record.state = "PENDING"
        elif nxt == "restart":
            record.restarts += 1
            delay = policy.delay(record.restarts, self._rng)
            record.state = "RESTARTING"
            record.restart_at = time.monotonic() + delay
            reason = record.error if not ok else "finished (restart=always)"
            record.pending_reason = f"restarting in {delay:.2f} s"
            self._publish_agent(record, OrchestratorEvent.AGENT_RESTARTING, {
                "attempt": record.restarts, "delay": round(delay, 3), "reason": reason or "failed"})
        elif nxt == "give_up":
            record.failed = True
            message = f"gave up after {record.restarts} restart(s); last run: {record.error or 'finished'}"
            record.error = message
            self._publish_agent(record, OrchestratorEvent.AGENT_ERROR, {"error_message": message, "traceback": ""})
            self._publish_agent(record, OrchestratorEvent.AGENT_TERMINATED, {"ok": False, "final": True})

    # ------------------------------------------------------------------ commands (from Orchestrator)

    def _record(self, name: str) -> AgentRecord:
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            raise ValueError(f"unknown agent {name!r} (registered: {known})") from None

    def _cmd_add(self, record: AgentRecord) -> None:
        # nothing can depend on a new agent yet, so it closes no cycle (unless it names itself):
        # checking its own dependencies is enough, and keeps adding O(1) however many agents run
        check_graph({record.name: record.depends_on, **{d: [] for d in record.depends_on if d in self.agents}})
        self.agents[record.name] = record
        self.states.add(record)
        self._dirty = True

    def _cmd_add_dependency(self, name: str, deps: list[str]) -> None:
        record = self._record(name)
        graph = {n: r.depends_on for n, r in self.agents.items()}
        graph[name] = list(dict.fromkeys(record.depends_on + deps))
        check_graph(graph)
        record.depends_on = graph[name]
        self._dirty = True

    def _cmd_start_agent(self, name: str) -> None:
        record = self._record(name)
        if record.state != TERMINAL:
            raise ValueError(f"agent {name!r} is {record.state}, not terminated; use restart_agent to restart it")
        record.stop_requested = False
        record.restarts = 0
        record.error = None
        record.state = "PENDING"
        self._dirty = True

    def _cmd_deliver(self, name: str, kind: str, payload: Any) -> None:
        record = self._record(name)
        worker = self.workers.get(record.worker or "")
        if record.state not in RUNNING or worker is None or not worker.alive:
            raise ValueError(f"agent {name!r} is not running (state {record.state}); nothing to deliver to")
        self._send(worker, protocol.encode("deliver", agent=name, epoch=record.epoch, kind=kind, payload=payload))

    def _cmd_execute(self, name: str | None) -> None:
        records = [self._record(name)] if name is not None else list(self.agents.values())
        for record in records:
            worker = self.workers.get(record.worker or "")
            if record.state in RUNNING and worker is not None and worker.alive:
                self._send(worker, protocol.encode("deliver", agent=record.name, epoch=record.epoch,
                                                   kind="execute", payload=None))
            elif name is not None:
                raise ValueError(f"agent {name!r} is not running (state {record.state})")

    def _cmd_stop_agent(self, name: str, timeout: float) -> None:
        record = self._record(name)
        record.stop_requested = True
        self._stop_record(record, timeout, reason="stopped")

    def _cmd_restart_agent(self, name: str, timeout: float) -> None:
        record = self._record(name)
        if record.state in RUNNING:
            record.then = "restart"
            record.stop_requested = False
            self._send_stop(record, timeout)
        elif record.state == TERMINAL:
            self._cmd_start_agent(name)
        else:
            record.state = "PENDING"
            record.stop_requested = False
            self._dirty = True

    def _stop_record(self, record: AgentRecord, timeout: float, reason: str) -> None:
        if record.state in ("PENDING", "RESTARTING"):
            self._run_over(record, ok=True, fields={"reason": f"{reason} before it started"}, final=True)
        elif record.state in RUNNING:
            self._send_stop(record, timeout)

    def _send_stop(self, record: AgentRecord, timeout: float) -> None:
        worker = self.workers.get(record.worker or "")
        if worker is not None and worker.alive:
            self._send(worker, protocol.encode("stop", agent=record.name, epoch=record.epoch, timeout=float(timeout)))

    def _cmd_stop_all(self, timeout: float) -> None:
        self._stopping_deadline = time.monotonic() + timeout + self.config.heartbeat_interval * 2
        for record in self.agents.values():
            record.stop_requested = True
            self._stop_record(record, timeout, reason="stopped")

    def _cmd_drain_worker(self, name: str) -> None:
        worker = self.workers.get(name)
        if worker is None or not worker.alive:
            known = ", ".join(sorted(n for n, w in self.workers.items() if w.alive)) or "none"
            raise ValueError(f"no live worker named {name!r} (live: {known})")
        worker.draining = True
        log.info("draining worker %s: moving %d agent(s) off it", name, len(worker.agents))
        for agent_name in sorted(worker.agents):
            record = self.agents[agent_name]
            if record.policy.mode != "never" and record.state in RUNNING:
                record.then = "move"
                self._send_stop(record, self.config.stop_timeout)
        self._dirty = True

    def _release_drained(self) -> None:
        for worker in self.workers.values():
            if worker.alive and worker.draining and not worker.agents:
                self._send(worker, protocol.encode("release", drain=True))
                worker.alive = False
                self._publish(OrchestratorEvent.WORKER_LEFT, worker.name,
                              {"worker": worker.name, "host": worker.host, "reason": "drained", "agents": []})

    def _cmd_snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "agents": {r.name: {
                "name": r.name, "state": r.state, "worker": r.worker, "restarts": r.restarts, "last_error": r.error,
                "failed": r.failed, "started_at": r.started_at, "epoch": r.epoch, "pending_reason": r.pending_reason,
                "restart": r.policy.mode, "depends_on": list(r.depends_on)} for r in self.agents.values()},
            "workers": {w.name: {
                "name": w.name, "host": w.host, "pid": w.pid, "labels": dict(w.labels), "capacity": w.capacity,
                "alive": w.alive, "draining": w.draining, "agents": sorted(w.agents), "running": len(w.agents),
                "since_heartbeat": round(now - w.last_seen, 3)} for w in self.workers.values()},
            "addresses": {"control": self.address, "events": self.events_address, "bus": self.bus_address},
            "dropped": dict(self.dropped.counts),
            "lost_events": self.lost_events,
            "class_blobs_sent": self.class_blobs_sent,
        }
