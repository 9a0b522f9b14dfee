"""How the cluster core carries out what the user's thread asks (the commands of
:mod:`pyorchestrate.commands`).  Part of the pure core: it only changes state and queues actions."""

from __future__ import annotations

import logging
from typing import Any

from . import commands as cmd
from .commands import handles
from .dependencies import check_graph
from .events import OrchestratorEvent
from .records import AgentRecord, WorkerRecord
from .snapshots import capture_agents
from .states import RUNNING, AgentState, plain_members

S = plain_members(AgentState)  # S.READY is AgentState.READY, read faster (see plain_members)
E = plain_members(OrchestratorEvent)
log = logging.getLogger("pyorchestrate.coordinator")


def _not_read(name: str, agent_class: type, kind: str) -> str:
    """Why ``send`` (kind "message") or ``trigger`` to an agent that does not take it is refused."""
    call = "send" if kind == "message" else "trigger"
    what = f"{call}: agent {name!r} is a {agent_class.__name__}, which does not take {call}()"
    if "trigger" in getattr(agent_class, "_reads", ()):
        return f"{what}: it runs once on a trigger; use orchestrator.trigger({name!r}, payload)"
    return (f"{what}: nothing in it reads its messages, which would wait unread. send() is for EventDriven "
            "agents (on_event gets each), trigger() for Triggered ones (execute(payload) runs once)")


class CommandHandlers:
    """Mixed into :class:`pyorchestrate.core.ClusterCore`: one handler per command type."""

    @handles(cmd.AddAgent)
    def _add(self, c: cmd.AddAgent, now: float) -> None:
        record = c.record
        if record.depends_on and not c.graph_checked:
            # nothing can depend on a new agent yet, so it closes no cycle (unless it names itself):
            # checking its own dependencies is enough, and keeps adding O(1) however many agents run
            check_graph({record.name: record.depends_on, **{d: [] for d in record.depends_on if d in self.agents}})
        self.agents[record.name] = record
        self.states.add(record)
        if record.depends_on:  # Counter.update is Python-level: ~1 us an agent for nothing
            self._depended.update(record.depends_on)
        self._dirty = True
        foreign = self.predecessor.foreign.pop(record.name, None)
        if foreign is not None:
            worker_name, report, _ = foreign
            worker = self.workers.get(worker_name)
            if worker is None or not worker.alive:
                return
            worker.agents.discard(record.name)
            stop: list[dict[str, Any]] = []
            if not self._take_report(worker, report, now, stop):
                for item in stop:
                    self.stop_stale(worker, item["agent"], item["run"], item["epoch"], now)

    @handles(cmd.AddDependency)
    def _add_dependency(self, c: cmd.AddDependency, now: float) -> None:
        record = self._record(c.name)
        # only what the new edges reach: the graph was acyclic, so a cycle they close runs through
        # this agent, reached from its dependencies (the whole graph, each call: 1,000 calls among
        # 20,000 agents took 11.7 s of the loop; 0.3 s now, the chain they made included)
        graph = {c.name: list(dict.fromkeys(record.depends_on + c.deps))}
        reach = list(graph[c.name])
        while reach:
            name = reach.pop()
            if name not in graph and name in self.agents:  # (one not registered: check_graph names it)
                graph[name] = self.agents[name].depends_on
                reach.extend(graph[name])
        check_graph(graph)
        self._depended.update(d for d in graph[c.name] if d not in record.depends_on)
        record.depends_on = graph[c.name]
        if record.state is S.PENDING:
            self.states.pending.gained_dependencies(record)
        self._dirty = True

    @handles(cmd.StartAgent)
    def _start_agent(self, c: cmd.StartAgent, now: float) -> None:
        record = self._record(c.name)
        if record.state is not S.TERMINATED:
            raise ValueError(f"agent {c.name!r} is {record.state.value}, not terminated; use restart_agent to restart it")
        record.stop_requested = False
        record.restarts = record.streak = 0
        record.error = None
        self.states.move(record, S.PENDING)
        self._dirty = True

    def _live_worker(self, record: AgentRecord) -> WorkerRecord | None:
        worker = self.workers.get(record.worker or "")
        return worker if record.state in RUNNING and worker is not None and worker.alive else None

    @handles(cmd.Deliver)
    def _deliver(self, c: cmd.Deliver, now: float) -> None:
        record = self._record(c.name)
        reads = getattr(record.agent_class, "_reads", None)
        if reads is not None and c.kind not in reads:
            raise ValueError(_not_read(c.name, record.agent_class, c.kind))
        worker = self._live_worker(record)
        if worker is None:
            raise ValueError(f"agent {c.name!r} is not running (state {record.state.value}); nothing to deliver to")
        if worker.leaving or record.then is not None or record.stop_requested:
            # its copy is stopping and reads no more: what was sent to it was lost, unsaid (a
            # Triggered agent moved off a worker that shut down waited on for a trigger it was sent)
            why = (f"its worker {worker.name!r} is shutting down" if worker.leaving else
                   "it is moving to another worker" if record.then == "move" else
                   "it is restarting" if record.then == "restart" else "it was asked to stop")
            raise ValueError(f"agent {c.name!r} is stopping ({why}): nothing delivered; send it again once it runs")
        record.sent += c.kind != "execute"  # (what goes to its inbox: see Core._count_lost_messages)
        self._send(worker, "deliver", agent=c.name, run=record.run, epoch=record.epoch, kind=c.kind, payload=c.payload)

    @handles(cmd.Execute)
    def _execute(self, c: cmd.Execute, now: float) -> None:
        records = [self._record(c.name)] if c.name is not None else list(self.agents.values())
        for record in records:
            worker = self._live_worker(record)
            if worker is not None:
                record.executed = True
                self._send(worker, "deliver", agent=record.name, run=record.run, epoch=record.epoch,
                           kind="execute", payload=None)
            elif record.state is S.DISCONNECTED:
                record.executed = True  # said when its worker is back (see Registration.register)
            elif c.name is not None:
                raise ValueError(f"agent {c.name!r} is not running (state {record.state.value})")

    @handles(cmd.StopAgent)
    def _stop_agent(self, c: cmd.StopAgent, now: float) -> None:
        record = self._record(c.name)
        record.stop_requested = True
        self._stop_record(record, c.timeout, "stopped", now)

    @handles(cmd.RestartAgent)
    def _restart_agent(self, c: cmd.RestartAgent, now: float) -> None:
        record = self._record(c.name)
        if record.state in RUNNING:
            record.then = "restart"
            record.stop_requested = False
            self._send_stop(record, c.timeout)
        elif record.state is S.TERMINATED:
            self._start_agent(cmd.StartAgent(c.name), now)
        elif record.state is S.RESTARTING:
            self.states.move(record, S.PENDING)
            record.stop_requested = False
            self._dirty = True
        else:
            record.stop_requested = False
            self._dirty = True

    def _stop_record(self, record: AgentRecord, timeout: float, reason: str, now: float) -> None:
        if record.state in (S.PENDING, S.RESTARTING):
            self._run_over(record, ok=True, fields={"reason": f"{reason} before it started"}, now=now, final=True)
        elif record.state in RUNNING:
            self._send_stop(record, timeout)
        elif record.state is S.DISCONNECTED:
            # its worker cannot hear us; when it comes back, the copy is stopped as stale.  Till
            # then it runs on there: a start_agent later waits for it (see _fence_lost_copy)
            worker = self.workers.get(record.worker or "")
            if worker is not None:
                self._fence_lost_copy(record, worker, True)
            self._fail_run(record, f"{reason} while its worker {record.worker!r} was unreachable", now, final=True)

    def _send_stop(self, record: AgentRecord, timeout: float) -> None:
        worker = self._live_worker(record)
        if worker is not None:
            self._send(worker, "stop", agent=record.name, run=record.run, epoch=record.epoch, timeout=float(timeout))

    @handles(cmd.StopAll)
    def _stop_all(self, c: cmd.StopAll, now: float) -> None:
        self._stopping_deadline = now + self.limits.stop_deadline(c.timeout)
        for record in list(self.agents.values()):
            record.stop_requested = True
            self._stop_record(record, c.timeout, "stopped", now)

    @handles(cmd.DrainWorker)
    def _drain_worker(self, c: cmd.DrainWorker, now: float) -> None:
        worker = self.workers.get(c.name)
        if worker is None or not worker.alive:
            known = ", ".join(sorted(n for n, w in self.workers.items() if w.alive)) or "none"
            raise ValueError(f"no live worker named {c.name!r} (live: {known})")
        worker.draining = True
        self.draining_workers.add(worker.name)
        log.info("draining worker %s: moving %d agent(s) off it", c.name, len(worker.agents))
        for agent_name in sorted(worker.agents):
            record = self.agents.get(agent_name)
            if record is not None and record.policy.mode != "never" and record.state in RUNNING:
                record.then = "move"
                self._send_stop(record, self.config.stop_timeout)
        self._dirty = True

    def release_drained(self, now: float) -> None:
        # asked every loop turn: only the workers asked to drain are looked at (all of them were:
        # a few lines a worker a turn, 200+ lines a turn with 100 workers)
        if not self.draining_workers:
            return
        for name in list(self.draining_workers):
            worker = self.workers.get(name)
            if worker is None or not worker.alive or not worker.draining:  # gone, or back anew
                self.draining_workers.discard(name)
                continue
            # the stale copies it is stopping too: their ends are reported to us only while it is ours,
            # and an agent waits for them (released with one, its agent waited for ever)
            if not worker.agents and not worker.stopping:
                self.draining_workers.discard(name)
                self._send(worker, "release", drain=True)
                worker.alive = False
                worker.released = True
                worker.gone_at = now
                self._publish(E.WORKER_LEFT, worker.name, {"worker": worker.name, "host": worker.host,
                                                           "reason": "drained", "agents": []})

    @handles(cmd.Join)
    def _join(self, c: cmd.Join, now: float) -> None:
        self.joined = True

    @handles(cmd.RequestStop)
    def _request_stop(self, c: cmd.RequestStop, now: float) -> None:
        self.stop_requested = True

    @handles(cmd.Snapshot)
    def snapshot(self, c: Any, now: float) -> dict[str, Any]:
        # tens of thousands of agents, on the loop thread while status() waits: only a capture here,
        # the rows are built in the caller's thread (snapshots.expand)
        self.explain_waits()
        return {
            "agent_rows": capture_agents(self.agents.values()),
            "workers": {w.name: {
                "name": w.name, "host": w.host, "pid": w.pid, "labels": dict(w.labels), "capacity": w.capacity,
                "alive": w.alive, "draining": w.draining, "agents": list(w.agents), "running": len(w.agents),
                "since_heartbeat": round(now - w.last_seen, 3), "orphan_timeout": w.orphan_timeout,
                "dropped": dict(w.dropped)}
                for w in self.workers.values()},
            "incarnation": self.incarnation,
            "forgotten_agents": self.forgotten,
            "class_blobs_sent": self.class_blobs_sent,
        }

    @handles(cmd.Close)
    def close(self, c: Any, now: float) -> None:
        for worker in self.workers.values():
            if worker.alive:
                self._send(worker, "release")
        self._publish(E.SHUTDOWN, self.name, {"coordinator": self.name})
