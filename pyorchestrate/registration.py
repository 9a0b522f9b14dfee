"""A worker registers: how the cluster core reconciles what it reports (the copies it runs, the
reports it kept while it had no coordinator) with what the core believes.  Part of the pure core.

The register carries the reports first, then the list of running copies; a worker lists a copy
only until its last report is queued, so together they are complete: whatever we had on that
worker that is in neither has ended or never arrived (and which, the frame numbers tell).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from . import protocol
from .actions import Send
from .events import OrchestratorEvent
from .flow import SendWindow
from .records import EARLIER_CONNECTIONS, AgentRecord, WorkerRecord
from .states import LIVE, RUNNING, AgentState, plain_members
from .versions import compare, table

log = logging.getLogger("pyorchestrate.coordinator")

S = plain_members(AgentState)  # S.READY is AgentState.READY, read faster (see plain_members)
E = plain_members(OrchestratorEvent)


def holds_token(worker: WorkerRecord, message: dict[str, Any]) -> bool:
    """Does this register show the secret this worker's process showed in its first register?"""
    # as bytes: compare_digest refuses str that is not ASCII (anyone can send that)
    return bool(worker.token) and hmac.compare_digest(str(message.get("token", "")).encode(), worker.token.encode())


def _own_register(message: dict[str, Any]):
    """Does a register come from the process of this worker record (its incarnation and token)?"""
    return lambda worker: worker.incarnation == message["incarnation"] and holds_token(worker, message)


def _accounted(existing: WorkerRecord, message: dict[str, Any]) -> dict[int, int]:
    """What a worker process that registers again (``message``) sent on its earlier connections,
    as far as it has been taken: read there, or taken now from the register's ``unread``."""
    upto = dict(existing.read_before)
    upto[existing.conn] = max(upto.get(existing.conn, 0), existing.recv_n)
    if message["unread"] and message["unread_conn"] in upto:
        conn = message["unread_conn"]
        upto[conn] = max(upto[conn], max(frame["n"] for frame in message["unread"]))
    upto.pop(message["conn"], None)  # (a register on the same connection: that one goes on)
    return dict(list(upto.items())[-EARLIER_CONNECTIONS:])


class Registration:
    """Mixed into :class:`pyorchestrate.core.ClusterCore`."""

    def register(self, identity: bytes, message: dict[str, Any], now: float) -> None:
        """A worker registers (first time, after a reconnect, or after we restarted)."""
        name = message["name"]
        if identity in self.closed_connections:
            # written before its connection closed (its process died?): a live worker opens a
            # new connection and registers there
            self.actions.append(Send(identity, protocol.encode("refused", reason="connection closed", retry=True)))
            self.drop("register_on_closed_connection", name)
            self._ends_in_register(self.workers.get(name), message, now)
            return
        if not protocol.is_worker_name(name):  # a worker of ours refuses such a --name itself
            reason = f"{name!r} is not a worker's name: printable characters without spaces or '/'"
            log.error("refused a worker: %s", reason)
            self.actions.append(Send(identity, protocol.encode("refused", reason=reason)))
            return
        errors, warnings = compare(self.versions, message["versions"])
        if errors:
            reason = "incompatible versions (" + "; ".join(errors) + "):\n" + table(self.versions, message["versions"])
            log.error("refused worker %s: %s", name, reason)
            self.actions.append(Send(identity, protocol.encode("refused", reason=reason)))
            return
        existing = self.workers.get(name)
        if self.incarnation in message["drained_by"] or (existing is not None and existing.released
                                                         and existing.incarnation == message["incarnation"]):
            # drained from this coordinator: it waits for the next one.  (Or written before it read
            # our release: it answered "register again"s to heartbeats we read late.  Taken, that
            # made it ours again while it waited elsewhere, and lost 5 s later: simulation seed 392)
            self.actions.append(Send(identity, protocol.encode("refused", reason="drained", retry=True)))
            return
        if existing is not None and existing.alive and existing.incarnation != message["incarnation"]:
            # maybe a restarted worker whose old self is not declared lost yet: let it retry
            reason = (f"a live worker named {name!r} is already registered (host {existing.host}, pid "
                      f"{existing.pid}); give each worker a unique --name (retrying until the old one is gone)")
            log.warning("worker %s: %s", name, reason)
            # what it runs is no run of ours (the live one holds the name; a lost one's copies were
            # given up or replaced, and block their agents until they have certainly stopped):
            # stopped now, not left running until its orphan timeout (its word that they ended is
            # not taken, so their agents still wait for that deadline)
            stop = [{"agent": r["agent"], "run": r["run"], "epoch": r["epoch"],
                     "timeout": self._stop_timeout_of(r["agent"])} for r in message["agents"]]
            self.actions.append(Send(identity, protocol.encode("refused", reason=reason, retry=True, stop=stop)))
            self._ends_in_register(existing, message, now)
            return
        if existing is not None and existing.incarnation == message["incarnation"] and not holds_token(existing, message):
            # its name and incarnation without the secret its process showed us: not that process
            # (both are on the bus for anyone to read); the real one always shows the same secret
            reason = (f"worker {name!r} (incarnation {message['incarnation']}) is registered with another token: "
                      "another process is using this worker's name and incarnation")
            log.warning("refused a register: %s", reason)
            self.drop("register_without_token", name)
            self.actions.append(Send(identity, protocol.encode("refused", reason=reason)))
            return
        same_process = existing is not None and existing.alive
        same_connection = same_process and existing.identity == identity
        # a stale snapshot: from a connection it has since replaced, or written on this one before
        # it read our welcome (it answered several "reregister"s at once, and we welcomed the
        # first): that one knows nothing of what we sent since, and its ``seen`` counts another
        # numbering; taken at face value it made us start an agent again while the first copy ran
        # (simulation seed 2097)
        if ((existing is not None and existing.incarnation == message["incarnation"] and message["conn"] < existing.conn)
                or (same_connection and message["seen_session"] not in (None, self.incarnation))):
            self.drop("stale_register", name)
            self._ends_in_register(existing, message, now)
            return
        unread = self._unread_reports(existing, message)
        if existing is not None:
            if existing.starting:  # decided before this register: sent as they would have been
                self._send_starts(existing)
            self.by_identity.pop(existing.identity, None)
        self._order += 1
        worker = WorkerRecord(
            name=name, identity=identity, incarnation=message["incarnation"], host=message["host"],
            pid=message["pid"], labels=dict(message["labels"]), capacity=message["capacity"],
            versions=message["versions"], order=self._order, last_seen=now, last_t=float(message["t"]),
            recv_n=message["n"], conn=message["conn"], window=SendWindow(self.limits.lease, *self.window_limits))
        if existing is not None and existing.incarnation == worker.incarnation:
            # its earlier connections: ends still arriving on one are its own (see stranger())
            worker.past_identities = [*existing.past_identities, existing.identity][-16:]
            worker.read_before = _accounted(existing, message)
        worker.window.opening = True  # (a new connection's: until the register is answered, below)
        if same_process:
            worker.agents, worker.order = existing.agents, existing.order
            if same_connection:  # it answered "register again": what we sent it still arrives in order
                worker.sent_classes, worker.sent_n = existing.sent_classes, existing.sent_n
                worker.window = existing.window  # (frames waiting for room go on it, in order)
        worker.token = message["token"]
        if message["orphan_timeout"] is not None and message["orphan_timeout"] >= 0:  # (negative: the default)
            worker.orphan_timeout = float(message["orphan_timeout"])
        self.workers[name] = worker
        self.by_identity[identity] = name
        if self.predecessor.crash_window and self._left_by_predecessor(message) and self.predecessor.crash_reported():
            log.warning("worker %s says the previous coordinator %r left it without saying it finished (a crash): "
                        "waiting for its workers to report what it left running (adoption window)", name, self.name)
            self._holding = self._dirty = True
        # what happened while it was away comes first, then the list of what runs there now: a
        # worker lists copies only after queueing their last reports, so together they are complete
        for item in [*unread, *message["events"]]:  # (in the order they happened)
            self.agent_event(worker, item, now)
        stop: list[dict[str, Any]] = []
        reported = set()
        for report in message["agents"]:
            if self._take_report(worker, report, now, stop):
                reported.add(report["agent"])
        if self.predecessor.old_copies:
            self.predecessor.worker_listed(name, message["incarnation"],
                                           {(r["agent"], r["run"], r["epoch"]) for r in message["agents"]})
        self._send(worker, "welcome", coordinator=self.name, session=self.incarnation,
                   heartbeat_interval=float(self.config.heartbeat_interval),
                   heartbeat_liveness=int(self.config.heartbeat_liveness),
                   bus_port=self.bus_port, events_port=self.events_port, stop=stop, warnings=warnings,
                   echo=float(message["t"]), max_message_size=int(self.config.max_message_size),
                   pulse_port=self.pulse_port)
        for agent_name in sorted(reported):  # a release (execute) lost with a connection: said again
            record = self.agents.get(agent_name)
            if record is not None and record.executed and record.worker == name and record.state in RUNNING:
                self._send(worker, "deliver", agent=agent_name, run=record.run, epoch=record.epoch, kind="execute",
                           payload=None)
        seen = message["seen"] if same_connection else -1  # on a new connection nothing unseen arrives
        for agent_name in sorted(worker.agents - reported):
            record = self.agents.get(agent_name)
            if record is None:
                worker.agents.discard(agent_name)
            elif not (record.state is S.ASSIGNED and record.start_n > seen >= 0):
                self._not_reported(worker, record, now)  # else its start is still on its way
        # a copy we kept for it while it was silent, that it does not run any more, is gone; unless
        # another process registers under its name (a rescheduled container keeps it): that one
        # cannot say what the lost one, maybe only cut off, still runs, so the copy blocks a new
        # one until it has certainly stopped
        same_incarnation = existing is not None and existing.incarnation == message["incarnation"]
        for record in list(self.states.of(S.DISCONNECTED)):
            if record.worker != name or record.name in reported:
                continue
            if (same_incarnation and record.said_before is S.ASSIGNED
                    and not (existing.identity == identity and record.start_n > message["seen"])):
                # its start never arrived (lost with a connection): it never ran there, so sending
                # it again cannot make it run twice. Failing it, as before, meant a restart="never"
                # agent never ran at all (a register delivered late at start-up, its welcome lost)
                log.info("agent %s: its start never reached worker %s; sent again", record.name, name)
                self._assign(record, worker, now)
            elif same_incarnation or existing is None:
                self._fail_run(record, f"worker {name!r} came back without agent {record.name!r}", now)
            else:
                self._fence_lost_copy(record, existing, keeps=True)
                self._fail_run(record, f"another process registered as worker {name!r}: agent {record.name!r}, "
                                       "kept on the lost one, is given up (it runs there until that one's orphan "
                                       "timeout)", now)
        worker.window.opening = False
        self._dirty = True
        if not same_process:
            log.info("worker %s joined%s (host %s, pid %d, labels %s, capacity %s)", name,
                     " again" if existing else "", worker.host, worker.pid, worker.labels or "{}",
                     worker.capacity or "unlimited")
            self._publish(E.WORKER_JOINED, name, {
                "worker": name, "host": worker.host, "pid": worker.pid, "labels": worker.labels,
                "capacity": worker.capacity, "rejoined": existing is not None})

    def _ends_in_register(self, existing: WorkerRecord | None, message: dict[str, Any], now: float) -> None:
        """A register we refuse: the ends in it are taken still (see ends_from_anywhere), from
        what it carries again and we never read as from what happened since."""
        unread = self._unread_reports(existing, message, count=False)
        self.ends_from_anywhere([*unread, *message["events"]], now, _own_register(message))

    def _unread_reports(self, existing: WorkerRecord | None, message: dict[str, Any],
                        count: bool = True) -> list[dict[str, Any]]:
        """The reports in a register's ``unread`` frames that we never read.  Those frames went on
        the connection ``unread_conn``, and we never said we read them: lost on the way (a gap),
        or still on their way on a connection that is no longer the worker's when they come (then
        only their ends are taken: see stranger()).  Seen beside 4 CPU burners: a worker whose
        lease ran out behind 100 long error reports registered again on a new connection, and
        the 14 errors still on the old one were lost (their ends came, repeated in the register).
        We know how far we read on that connection if it is this process's current one, or an
        earlier one of it we remember; else (a coordinator started since, or a connection long
        gone) whether they were read is not known, and the reports other than ends (which every
        register repeats) are counted as maybe lost (``count``: not for a register we refuse,
        which the worker sends again)."""
        frames = message["unread"]
        if not frames:
            return []
        conn = message["unread_conn"]
        if existing is not None and existing.incarnation == message["incarnation"]:
            if conn == existing.conn:
                lost, upto = existing.lost, existing.recv_n
                return [item for frame in frames
                        if frame["n"] > upto or any(a <= frame["n"] <= b for a, b in lost) for item in frame["events"]]
            if conn in existing.read_before:
                upto = existing.read_before[conn]
                return [item for frame in frames if frame["n"] > upto for item in frame["events"]]
        unsure = sum(1 for frame in frames for item in frame["events"] if item["event"] != "AGENT_TERMINATED")
        if unsure and count:
            self.drop("report_maybe_lost", f"worker {message['name']}: sent on a connection we cannot tell we read",
                      count=unsure, what="report")
        return []

    def _left_by_predecessor(self, message: dict[str, Any]) -> bool:
        """Does a register show that a coordinator of our name left this worker without saying it
        finished: it says so, or it runs a copy of that one's that is not stopping (a clean end
        stops them)?"""
        return ((message["left_by"] == self.name and message["left_session"] not in ("", self.incarnation))
                or any(r["run"] != self.incarnation and r["coordinator"] == self.name and not r["stopping"]
                       for r in message["agents"]))

    def _take_report(self, worker: WorkerRecord, report: dict[str, Any], now: float,
                     stop: list[dict[str, Any]]) -> bool:
        """One copy a registering worker runs: ours (keep it), a previous coordinator's (adopt it
        or stop it), or stale (stop it).  True if it stays as the current run."""
        name, run, epoch = report["agent"], report["run"], report["epoch"]
        record = self.agents.get(name)
        from_predecessor = run != self.incarnation and report["coordinator"] == self.name
        # a copy stopping is ending, and may be one the previous coordinator had replaced already
        # (its worker was frozen or cut off past its lease): not adopted, and not taken for the
        # only copy there is (see Predecessor.hold_until); blocked until it has ended, below
        adoptable = from_predecessor and not report["stopping"]
        if adoptable:
            self.predecessor.found.add(name)
        if record is not None and record.worker == worker.name and (record.run, record.epoch) == (run, epoch):
            if record.state in RUNNING:
                worker.agents.add(name)
                if record.stop_requested or record.then:  # the stop may have been lost: say it again
                    self._send(worker, "stop", agent=name, run=run, epoch=epoch, timeout=record.stop_timeout)
                # its STARTED / READY reports may have been lost with a connection: catch up
                for state, event in ((S.STARTED, E.AGENT_STARTED), (S.READY, E.AGENT_READY)):
                    if record.state is S.ASSIGNED or (state is S.READY and report["state"] == "READY"
                                                      and record.state is S.STARTED):
                        self.states.move(record, state)
                        self._publish_agent(record, event, {"recovered": True})
                        self._dirty = True
                return True
            if record.state is S.DISCONNECTED:
                self._reconnect(record, worker, report, "its worker is back")
                return True
        elif adoptable and self.config.on_restart == "adopt":
            if record is None:
                # the script may register it in a moment: hold it (running) for the adoption window
                self.predecessor.hold_foreign(name, worker.name, report, now)
                worker.agents.add(name)
                return True
            if record.state is S.PENDING and record.definition == report["definition"] and not self.predecessor.waits_for(name):
                # take over a copy a previous coordinator (same name, same definition) started
                record.worker, record.run, record.epoch = worker.name, run, epoch
                record.executed = False
                record.sent = 0  # (what its predecessor sent it is not known)
                record.started_at = self.wall()
                record.run_since = now  # (how long it ran before is not known here: counted from now)
                self._reconnect(record, worker, report, "still running from a previous coordinator")
                return True
        # an older copy (a previous coordinator's with another definition, a stale one of ours):
        # stopped, and no new copy of its agent starts before it has ended
        timeout = self.stop_stale(worker, name, run, epoch, now, send=False)
        stop.append({"agent": name, "run": run, "epoch": epoch, "timeout": timeout})
        return False

    def _reconnect(self, record: AgentRecord, worker: WorkerRecord, report: dict[str, Any], reason: str,
                   reported: OrchestratorEvent | None = None) -> None:
        """Take ``record``'s running copy on ``worker`` (as ``report`` describes it) as its current
        run.  ``reported``: the lifecycle event that brought it back (published by the caller)."""
        said = record.said_before if record.state is S.DISCONNECTED else None
        self.states.move(record, S.READY if report["state"] == "READY" else S.STARTED)
        if record.state is S.READY:  # said before it was cut off, by the coordinator that started it, or just below
            record.ready_said = True
        worker.agents.add(record.name)
        self._publish_agent(record, E.AGENT_ADOPTED, {"reason": reason, "state": record.state.value})
        if said is None:
            return
        # cut off before its STARTED (or READY) report came: said now, once, so every run's
        # callbacks see STARTED before READY
        missing = []
        if said is S.ASSIGNED:
            missing.append(E.AGENT_STARTED)
        if said in (S.ASSIGNED, S.STARTED) and record.state is S.READY:
            missing.append(E.AGENT_READY)
        for event in missing:
            if event is not reported:
                self._publish_agent(record, event, {"recovered": True})

    def _not_reported(self, worker: WorkerRecord, record: AgentRecord, now: float) -> None:
        """A re-registering worker does not list an agent we had there, and its reports (which
        come first and are complete) did not end it."""
        worker.agents.discard(record.name)
        if record.state is S.ASSIGNED:
            # the start went to its old socket and never arrived: it never ran, so sending it
            # again cannot make it run twice
            self._assign(record, worker, now)
        elif record.state in LIVE:
            self._fail_run(record, f"worker {worker.name!r} no longer runs agent {record.name!r} "
                                   "and its end was not reported", now)

