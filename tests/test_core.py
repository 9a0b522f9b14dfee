"""The cluster core, driven directly: no sockets, no threads, a clock that only moves when told."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from sim import SimConfig

from pyorchestrate import AgentState, commands, flow, protocol
from pyorchestrate.core import ClusterCore, Forget, Publish, Send
from pyorchestrate.dependencies import check_graph
from pyorchestrate.placement import choose
from pyorchestrate.records import AgentRecord
from pyorchestrate.restart import RestartPolicy
from pyorchestrate.states import TRANSITIONS, IllegalTransition, StateIndex

S = AgentState


class Harness:
    """A core, a clock, and helpers that speak for workers."""

    def __init__(self, *, adopt_window: float = 0.0, strict_hold: bool = False, crash_window: float = 0.0,
                 **config) -> None:
        self.now = 100.0
        self.config = SimConfig(**config)
        self.core = ClusterCore("c", "inc1", self.config, now=self.now, rng=random.Random(1), wall=lambda: self.now,
                                drop=lambda kind, detail, **_: None, adopt_window=adopt_window, strict_hold=strict_hold,
                                crash_window=crash_window)
        self.sent: list[tuple[bytes, dict]] = []
        self.published: list[Publish] = []
        self.forgotten: list[str] = []

    def flush(self) -> None:
        for action in self.core.take():
            if isinstance(action, Send):
                self.sent.append((action.identity, protocol.decode(action.frame)))
            elif isinstance(action, Publish):
                self.published.append(action)
            elif isinstance(action, Forget):
                self.forgotten.append(action.name)

    def events(self, event: str) -> list[Publish]:
        return [p for p in self.published if p.event.value == event]

    def to(self, identity: bytes, kind: str) -> list[dict]:
        """Messages of ``kind`` sent to ``identity``; ``"start"``: each agent of the starts frames."""
        if kind == "start":
            return [{**item, "n": m["n"]} for i, m in self.sent if i == identity and m["type"] == "starts"
                    for item in m["agents"]]
        return [m for i, m in self.sent if i == identity and m["type"] == kind]

    def register(self, name: str, *, identity: bytes | None = None, agents=(), events=(), incarnation="w-inc",
                 conn=1, seen=0, token=None, seen_session=None, n=1, **told) -> bytes:
        identity = identity or name.encode()
        if token is None:  # the worker process itself: its own secret
            token = f"secret-{incarnation}"
        frame = protocol.encode("register", n=n, name=name, incarnation=incarnation, host="h", pid=1, labels={},
                                capacity=0, versions={}, agents=list(agents), events=list(events), t=self.now,
                                conn=conn, seen=seen, token=token,
                                **({} if seen_session is None else {"seen_session": seen_session}), **told)
        self.core.control(identity, protocol.decode(frame), self.now)
        self.flush()
        return identity

    def add(self, name: str, restart: str = "never", **fields) -> AgentRecord:
        record = AgentRecord(name=name, agent_class=object, config=None, class_id="c",
                             class_blob=fields.pop("class_blob", b""), config_blob=fields.pop("config_blob", b""),
                             mode="thread", policy=fields.pop("policy", RestartPolicy(restart, -1, 0.5, 4.0)),
                             definition=f"d-{name}", stop_timeout=fields.pop("stop_timeout", 1.0), **fields)
        self.core.command(commands.AddAgent(record), self.now)
        self.flush()
        return record

    def assigned(self, worker: str = "w1", agent: str = "a") -> tuple[bytes, AgentRecord]:
        """A registered worker and an agent placed on it whose start it has not answered yet."""
        identity = self.register(worker)
        record = self.add(agent)
        self.step()
        assert record.state is S.ASSIGNED
        return identity, record

    def ready(self, agent: str = "a", worker: str = "w1", **fields) -> tuple[bytes, AgentRecord]:
        """A registered worker running an agent it reported STARTED and READY."""
        identity = self.register(worker)
        record = self.add(agent, **fields)
        self.step()
        self.report(identity, record, "AGENT_STARTED", "AGENT_READY")
        return identity, record

    @staticmethod
    def running_report(record: AgentRecord, state: str = "READY") -> dict:
        """How a registering worker lists a copy it runs."""
        return {"agent": record.name, "run": record.run, "epoch": record.epoch, "state": state, "coordinator": "c",
                "definition": record.definition}

    def step(self, seconds: float = 0.0) -> None:
        self.now += seconds
        self.core.tick(self.now)
        self.core.place(self.now)
        self.flush()

    def listen(self, seconds: float) -> None:
        """Let ``seconds`` pass while we listen and every live worker beats: ticks a quarter second
        apart (one long :meth:`step` is a stall of ours, which the adoption window does not count)."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            for worker in list(self.core.workers.values()):
                if worker.alive:
                    self.beat(worker.identity)
            self.step(min(0.25, end - self.now))

    def report(self, identity: bytes, record: AgentRecord, *events: str, n: int = 0, **fields) -> None:
        items = [protocol.agent_event(record.name, record.run, record.epoch, e, dict(fields)) for e in events]
        self.core.control(identity, protocol.decode(protocol.encode("agent_events", n=n, events=items)), self.now)
        self.flush()

    def beat(self, identity: bytes, running: int = -1, read: int = -1, **told) -> None:
        frame = protocol.encode("heartbeat", t=self.now, running=running, read=read, **told)
        self.core.control(identity, protocol.decode(frame), self.now)
        self.flush()

    def read_all(self, identity: bytes, seconds: float = 0.01) -> int:
        """The worker reads what was sent to it, ``seconds`` apart, until nothing waits for room
        (flow.py): how many reads that took."""
        reads = 0
        while True:
            numbered = [m["n"] for i, m in self.sent if i == identity and m["n"]]
            worker = self.core.worker_of(identity)
            if worker is None or not worker.window.held:
                return reads
            self.now += seconds
            self.core.control(identity, protocol.decode(protocol.encode("read", read=max(numbered))), self.now)
            self.flush()
            reads += 1


# ---------------------------------------------------------------------------- states


def test_every_state_has_transitions_and_an_illegal_one_raises():
    assert set(TRANSITIONS) == set(AgentState)
    index = StateIndex()
    record = SimpleNamespace(name="a", state=S.TERMINATED, pin=None, labels={}, depends_on=[])
    index.add(record)
    with pytest.raises(IllegalTransition, match="TERMINATED -> READY"):
        index.move(record, S.READY)
    assert record.state is S.TERMINATED and index.of(S.TERMINATED) == [record]


def test_state_index_keeps_entry_order_within_a_state():
    index = StateIndex()
    records = [SimpleNamespace(name=f"a{i}", state=S.PENDING, pin=None, labels={}, depends_on=[]) for i in range(5)]
    for record in records:
        index.add(record)
    index.move(records[1], S.ASSIGNED)
    assert [r.name for r in index.of(S.PENDING)] == ["a0", "a2", "a3", "a4"]
    assert index.count(S.PENDING, S.ASSIGNED) == 5


def test_state_index_hands_out_a_state_oldest_first_while_the_caller_moves_them():
    """``oldest_first`` copies a slice, then the rest: every agent once, in order, whichever the
    caller moved meanwhile."""
    index = StateIndex()
    records = [SimpleNamespace(name=f"a{i}", state=S.PENDING, pin=None, labels={}, depends_on=[]) for i in range(600)]
    for record in records:
        index.add(record)
    seen = []
    for record in index.oldest_first(S.PENDING):
        seen.append(record.name)
        if record.state is S.PENDING and int(record.name[1:]) % 2 == 0:
            index.move(record, S.ASSIGNED)  # moved while going through them
    assert seen == [f"a{i}" for i in range(600)]
    assert [r.name for r in index.of(S.PENDING)] == [f"a{i}" for i in range(1, 600, 2)]
    assert list(index.oldest_first(S.READY)) == []


def test_the_pending_line_keeps_kinds_apart_and_merges_them_back_oldest_first():
    """pending.PendingLine: agents that may go anywhere, those bound for the same pin and labels,
    and those with dependencies, each kind left out as a whole when told, the rest in the order
    they entered the line; an agent that leaves and comes back goes to the end."""
    index = StateIndex()

    def agent(i: int) -> SimpleNamespace:
        return SimpleNamespace(name=f"a{i}", state=S.PENDING, pin="w1" if i % 3 == 0 else None,
                               labels={"gpu": "1"} if i % 5 == 0 else {}, depends_on=["x"] if i % 7 == 0 else [],
                               parked_on=None, settled=False)

    records = [agent(i) for i in range(30)]
    for record in records:
        index.add(record)
    line = index.pending
    everyone = [r.name for r in line.for_placement(lambda: False, lambda bound_for: False)]
    with_deps_twice = [f"a{i}" for i in range(30) for _ in range(2 if i % 7 == 0 and (i % 3 == 0 or i % 5 == 0) else 1)]
    assert everyone == with_deps_twice  # oldest first; bound with dependencies: in two kinds
    no_anywhere = [r.name for r in line.for_placement(lambda: True, lambda bound_for: False)]
    # (each kind hands out its first before it is asked whether to stop)
    assert "a1" in no_anywhere and "a2" not in no_anywhere and "a3" in no_anywhere and "a7" in no_anywhere
    w1_full = [r.name for r in line.for_placement(lambda: False, lambda bound_for: bound_for == ("w1", ()))]
    assert "a3" in w1_full and "a6" not in w1_full and "a21" in w1_full  # a21: waits for x too
    index.move(records[1], S.ASSIGNED)
    index.move(records[1], S.TERMINATED)
    index.move(records[1], S.PENDING)  # back, at the end
    index.remove(records[3])
    names = [r.name for r in line.for_placement(lambda: False, lambda bound_for: False)]
    assert names[-1] == "a1" and "a3" not in names and len(names) == len(everyone) - 1
    records[2].depends_on = ["x"]  # given a dependency while pending (add_dependency): keeps its place
    line.gained_dependencies(records[2])
    names = [r.name for r in line.for_placement(lambda: True, lambda bound_for: True)]
    assert [r.name for r in line.waiting.values()][:3] == ["a0", "a2", "a7"] and "a2" not in line.anywhere
    assert "a2" in names and "a8" not in names  # it comes, though the agents that may go anywhere do not (a4: the first)
    for record in list(index.of(S.PENDING)):
        index.move(record, S.ASSIGNED)
    assert not line.anywhere and not line.bound and not line.waiting


# ---------------------------------------------------------------------------- placement, restarts, graphs


def test_placement_prefers_the_least_loaded_eligible_worker_and_says_why_not():
    def worker(name, load, **kw):
        return SimpleNamespace(name=name, alive=True, draining=False, labels=kw.get("labels", {}),
                               capacity=kw.get("capacity", 0), agents=set(range(load)), order=0)

    workers = [worker("a", 3), worker("b", 1, labels={"gpu": "1"}), worker("c", 2, capacity=2)]
    assert choose(workers, None, {})[0].name == "b"
    assert choose(workers, "a", {})[0].name == "a"
    assert choose(workers, None, {"gpu": "2"}) == (None, "no live worker has labels gpu=2")
    assert choose(workers, "c", {}) == (None, "every eligible worker is at capacity")
    assert choose(workers, "z", {}) == (None, "waiting for worker 'z' to join")


def test_restart_backoff_grows_within_bounds_and_replays_from_its_seed():
    policy = RestartPolicy("always", -1, 0.5, 4.0)
    first = [policy.delay(n, random.Random(7)) for n in range(1, 8)]
    assert first == [policy.delay(n, random.Random(7)) for n in range(1, 8)]
    for n, delay in enumerate(first, 1):
        base = min(4.0, 0.5 * 2 ** (n - 1))
        assert base <= delay <= min(4.0, base * 1.25)
    # jittered below the cap (restarts of many agents that failed together spread out), capped at it
    assert all(delay > min(4.0, 0.5 * 2 ** (n - 1)) for n, delay in enumerate(first[:3], 1)) and first[-1] == 4.0


def test_restart_backoff_stays_at_its_maximum_for_ever_however_many_restarts():
    """``initial * 2 ** (attempt - 1)`` raised OverflowError from the 1,025th restart on."""
    for initial, maximum in ((0.5, 4.0), (1e-300, 30.0), (1e300, 1e308)):
        policy = RestartPolicy("always", -1, initial, maximum)
        assert [policy.delay(n, random.Random(3)) for n in (1025, 4097, 10**9)] == [maximum] * 3
    smallest = RestartPolicy("always", -1, 5e-324, 1.0)  # doubles 1,074 times before it reaches 1.0
    assert smallest.delay(1025, random.Random(3)) < 1e-15
    assert [smallest.delay(n, random.Random(3)) for n in (1076, 4097, 10**9)] == [1.0] * 3


def test_an_unlimited_restarter_restarts_past_its_thousandth_restart():
    """A crash-looping ``restart="always", max_restarts=-1`` agent stopped being restarted at its
    1,025th restart: the backoff raised, the loop counted a handler error, and the agent stayed
    TERMINATED (``final`` false) with no error said, for good."""
    h = Harness()
    identity = h.register("w1")
    record = h.add("a", restart="always")
    for attempt in range(1, 1031):
        h.step(4.0 * 1.25)  # the policy's maximum delay, jitter included
        assert record.state is S.ASSIGNED, (attempt, record.state)
        h.report(identity, record, "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
        assert record.state is S.RESTARTING and record.restarts == attempt
        h.published.clear()
        h.sent.clear()


def test_restarts_in_a_row_and_their_backoff_start_over_after_a_run_of_restart_reset_seconds():
    h = Harness()
    identity = h.register("w1")
    record = h.add("a", policy=RestartPolicy("on-failure", 2, 0.5, 4.0, reset_after=60.0))

    def fail_after(seconds: float) -> dict:
        h.step(5.0)  # past any delay of the policy
        assert record.state is S.ASSIGNED
        h.report(identity, record, "AGENT_STARTED", "AGENT_READY")
        h.step(seconds)
        h.report(identity, record, "AGENT_ERROR", error_message="x", traceback="")
        h.report(identity, record, "AGENT_TERMINATED", ok=False)
        return h.events("AGENT_RESTARTING")[-1].fields if record.state is S.RESTARTING else {}

    assert fail_after(1.0)["attempt"] == 1
    assert fail_after(1.0)["attempt"] == 2
    assert fail_after(61.0)["attempt"] == 1  # a healthy run: forgiven, the first delay again
    assert fail_after(1.0)["attempt"] == 2 and fail_after(1.0) == {}  # two in a row: given up
    assert "gave up after 2 restart(s) in a row" in record.error and record.restarts == 4
    h.core.command(commands.StartAgent("a"), h.now)  # started by hand: counted from 0
    h.flush()
    assert record.streak == record.restarts == 0 and fail_after(1.0)["attempt"] == 1


def _restarting_one_after_the_other(first: str, second: str) -> tuple[Harness, bytes, AgentRecord, AgentRecord]:
    """A worker and agents "a" and "b" (restart="always") whose runs ended 0.1 s apart, ``first``
    first: both RESTARTING."""
    h = Harness()
    identity = h.register("w1")
    records = {"a": h.add("a", restart="always"), "b": h.add("b", restart="always")}
    h.step()
    h.report(identity, records[first], "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    h.now += 0.1
    h.report(identity, records[second], "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    return h, identity, records["a"], records["b"]


def test_a_restart_is_placed_once_its_backoff_ends_without_waiting_for_a_tick():
    h, identity, a, b = _restarting_one_after_the_other("a", "b")
    assert a.state is b.state is S.RESTARTING and h.core.next_restart == a.restart_at < b.restart_at
    h.core.restarts_due(a.restart_at - 0.001)  # not yet: nothing changes
    assert h.core.next_restart == a.restart_at
    h.now = a.restart_at
    h.core.restarts_due(h.now)  # what the loop calls after each turn, tick or not
    h.core.place(h.now)
    h.flush()
    assert a.state is S.ASSIGNED and b.state is S.RESTARTING and h.core.next_restart == b.restart_at
    h.core.command(commands.StopAgent("b", 1.0), h.now)  # leaves RESTARTING another way
    h.flush()
    h.now = b.restart_at
    h.core.restarts_due(h.now)  # a wake for nothing, once: then none is due
    h.core.place(h.now)
    assert h.core.next_restart == float("inf")


def test_a_restart_scheduled_again_is_not_placed_at_the_time_first_scheduled():
    """Restarts are kept soonest first (placement and the tick looked at every agent RESTARTING in
    each pass); an agent restarted by hand and scheduled again is placed at its new time, not at
    the first one, which is still in that queue behind another agent's sooner restart."""
    h, identity, a, b = _restarting_one_after_the_other("b", "a")
    first = a.restart_at
    assert b.restart_at < first
    h.core.command(commands.RestartAgent("a", 1.0), h.now)  # at once, by hand
    h.step()
    assert a.state is S.ASSIGNED and b.state is S.RESTARTING
    h.report(identity, a, "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    assert a.state is S.RESTARTING and a.restart_at > first  # a longer backoff: the second in a row
    h.now = first
    h.core.restarts_due(h.now)
    h.step()
    assert b.state is S.ASSIGNED  # its time came before
    assert a.state is S.RESTARTING and h.core.next_restart == a.restart_at
    h.now = a.restart_at
    h.core.restarts_due(h.now)
    h.step()
    assert a.state is S.ASSIGNED and h.core.next_restart == float("inf")


def test_a_draining_worker_gets_no_new_agent_even_when_it_is_the_least_loaded():
    h = Harness()
    h.register("w1")
    h.register("w2")
    stay = h.add("stay", pin="w1")  # restart="never": it stays on w1 while w1 drains
    for i in range(2):
        h.add(f"busy{i}", pin="w2")
    h.step()
    assert stay.worker == "w1" and len(h.core.workers["w2"].agents) == 2
    h.core.command(commands.DrainWorker("w1"), h.now)
    h.flush()
    new = h.add("new")
    h.step()
    assert new.worker == "w2" and stay.worker == "w1" and h.core.workers["w1"].draining


def test_a_released_worker_is_not_taken_back_by_a_register_it_wrote_before_reading_its_release():
    """Heartbeats read late (after a stall of ours) each got "register again"; the worker answered
    them before it read our release.  Those registers must not make it ours again: it waits for
    another coordinator, and was declared lost 5 s later (simulation seed 392)."""
    h = Harness()
    identity = h.register("w1")
    h.core.command(commands.DrainWorker("w1"), h.now)
    h.flush()
    h.core.release_drained(h.now)
    h.flush()
    assert h.to(identity, "release") and not h.core.workers["w1"].alive
    h.register("w1", seen_session="inc1")  # written before the release was read: no drained_by
    assert h.to(identity, "refused")[-1]["reason"] == "drained" and not h.core.workers["w1"].alive
    assert not h.events("WORKER_JOINED")[1:]  # (its first join only)
    h.register("w1", incarnation="w-new")  # the same name, a process started anew: welcome
    assert h.core.workers["w1"].alive


@pytest.mark.parametrize("restart", ["on-failure", "always", "never"])
def test_a_worker_shutting_down_gets_nothing_new_and_the_agents_it_stops_move(restart):
    """A worker that shuts down (SIGTERM) says so in its heartbeats and stops its copies, whose ends
    say why. Such an end is not the agent's own: restart="on-failure" took it for done, "always"
    counted a restart and waited its back-off. They move at once, as after a drain, to a worker that
    is not leaving; a restart="never" agent ends; an agent we had asked to stop stays stopped."""
    h = Harness()
    w1, record = h.ready("svc", restart=restart, one_shot=False)
    asked = h.add("asked", restart="always", pin="w1", one_shot=False)
    h.step()
    h.report(w1, asked, "AGENT_STARTED", "AGENT_READY")
    h.register("w2", identity=b"w2")
    h.beat(w1, leaving=True)
    assert h.core.workers["w1"].draining
    new = h.add("new")
    h.step()
    assert new.worker == "w2", "placed on a worker that is shutting down"
    h.core.command(commands.StopAgent("asked", 1.0), h.now)
    h.flush()
    h.report(w1, record, "AGENT_TERMINATED", worker_leaving=True, reached="READY")
    h.report(w1, asked, "AGENT_TERMINATED", worker_leaving=True, reached="READY")
    h.step()
    (end,) = [p for p in h.events("AGENT_TERMINATED") if p.subject == "svc"]
    assert end.fields["reason"] == "stopped by the shutdown of worker 'w1'" and "worker_leaving" not in end.fields
    assert asked.state is S.TERMINATED
    if restart == "never":
        assert record.state is S.TERMINATED and end.fields["final"]
    else:
        assert record.state is S.ASSIGNED and record.worker == "w2" and record.restarts == 0
    assert not h.events("WORKER_LOST") and not h.events("AGENT_ERROR")


@pytest.mark.parametrize("how", ["drained", "leaving"])
@pytest.mark.parametrize("not_run", [False, True])
def test_a_one_shot_agent_moved_off_a_worker_runs_again_only_if_its_work_had_not_begun(how, not_run):
    """A drain, or its worker's shutdown, stops a one-shot agent so that it moves. Its execute()
    need not look at the stop: one whose work had begun finished it, and moved it ran a second
    time. Its end is its own (done, for restart="on-failure"). One stopped before its work began
    (a Deferred agent before its time, say: its end says not_run) is started elsewhere."""
    h = Harness()
    w1, record = h.ready("job", restart="on-failure")
    h.register("w2", identity=b"w2")
    if how == "drained":
        h.core.command(commands.DrainWorker("w1"), h.now)
        h.flush()
        assert [m["agent"] for m in h.to(w1, "stop")] == ["job"]
    else:
        h.beat(w1, leaving=True)
    h.report(w1, record, "AGENT_TERMINATED", reached="READY",
             **({"worker_leaving": True} if how == "leaving" else {}), **({"not_run": True} if not_run else {}))
    h.step()
    if not_run:
        assert record.state is S.ASSIGNED and record.worker == "w2" and record.restarts == 0
    else:
        assert record.state is S.TERMINATED and not record.failed
    assert [p.fields.get("not_run") for p in h.events("AGENT_TERMINATED")] == [None]


@pytest.mark.parametrize("gap", [False, True])
def test_an_agent_whose_start_a_worker_shutting_down_never_read_is_placed_again(gap):
    """A start sent as a worker began to shut down goes unread. Its goodbye came after every
    report of what it did run: an agent still ASSIGNED never started there. It was failed as if it
    had run ("agent 'a' was running there"): a restart="never" agent never ran at all. Only when
    frames from it were lost on the way (a gap before the goodbye) can a STARTED have gone missing:
    then it is failed as before."""
    h = Harness()
    w1, record = h.assigned("w1", "a")  # restart="never"
    h.register("w2", identity=b"w2")
    n = h.core.workers["w1"].recv_n + (2 if gap else 1)
    h.core.control(w1, protocol.decode(protocol.encode("goodbye", n=n)), h.now)
    h.flush()
    h.step()
    if gap:
        assert record.state is S.TERMINATED and record.failed
    else:
        assert record.state is S.ASSIGNED and record.worker == "w2" and record.epoch == 2
        assert not h.events("AGENT_ERROR") and not h.events("AGENT_TERMINATED")
    assert [p.subject for p in h.events("WORKER_LEFT")] == ["w1"]


@pytest.mark.parametrize("how", ["leaving", "drained", "restarting", "stopped"])
def test_nothing_is_delivered_to_a_copy_that_is_stopping(how):
    """A trigger or message sent to a copy that is stopping is never read: it was lost, unsaid (a
    Triggered agent moved off a worker shutting down waited on elsewhere for a trigger it had been
    sent). Now the caller is told, and can send it again once the agent runs."""
    h = Harness()
    w1, record = h.ready("t", restart="on-failure", one_shot=False)
    h.core.command(commands.Deliver("t", "trigger", 1), h.now)  # running: delivered
    h.flush()
    assert [m["kind"] for m in h.to(w1, "deliver")] == ["trigger"]
    if how == "leaving":
        h.beat(w1, leaving=True)
    elif how == "drained":
        h.core.command(commands.DrainWorker("w1"), h.now)
    elif how == "restarting":
        h.core.command(commands.RestartAgent("t", 1.0), h.now)
    else:
        h.core.command(commands.StopAgent("t", 1.0), h.now)
    h.flush()
    with pytest.raises(ValueError, match="is stopping .*nothing delivered; send it again once it runs"):
        h.core.command(commands.Deliver("t", "trigger", 2), h.now)
    assert len(h.to(w1, "deliver")) == 1


def test_dependency_cycles_and_missing_agents_are_named():
    with pytest.raises(ValueError, match="a -> b -> a"):
        check_graph({"a": ["b"], "b": ["a"]})
    with pytest.raises(ValueError, match="a -> nope"):
        check_graph({"a": ["nope"]})
    with pytest.raises(ValueError, match="dependency cycle: a -> a"):
        check_graph({"a": ["a"]})
    with pytest.raises(ValueError, match="dependency cycle: b -> c -> d -> b"):
        check_graph({"a": ["b"], "b": ["c"], "c": ["d", "e"], "d": ["b"], "e": []})


def test_a_long_chain_of_dependencies_is_checked_without_recursion():
    """Each of 5,000 agents depending on the next (registered first to last) passed Python's
    recursion limit in the check: RecursionError instead of a start or a named cycle."""
    chain = {f"a{i}": [f"a{i + 1}"] for i in range(5000)} | {"a5000": []}
    check_graph(chain)
    chain["a5000"] = ["a0"]
    with pytest.raises(ValueError, match=r"dependency cycle: a0 -> a1 -> .* -> a5000 -> a0$"):
        check_graph(chain)
    diamond = {"top": ["l", "r"], "l": ["base"], "r": ["base"], "base": []}
    check_graph(diamond)  # two ways to one agent is no cycle


def test_every_command_has_a_handler():
    assert {c for c in vars(commands).values()
            if isinstance(c, type) and issubclass(c, commands.Command) and c is not commands.Command} \
        == set(commands.HANDLERS)


# ---------------------------------------------------------------------------- liveness


def test_what_a_worker_dropped_is_kept_as_its_heartbeats_say_within_bounds():
    """A worker counts what it drops (deliveries to copies that ended, reports while it had no
    coordinator, bad frames); its heartbeats carry the counts so far, which status() shows.
    Counts that are not a map of str to int are a bad frame; odd entries are left out."""
    from pyorchestrate.core import WORKER_DROP_REASONS_MAX

    h = Harness()
    w1 = h.register("w1")
    assert h.core.snapshot(None, h.now)["workers"]["w1"]["dropped"] == {}
    h.beat(w1, dropped={"deliver_to_unknown_agent": 3})
    h.beat(w1)  # (a heartbeat without: nothing new dropped since the start, the counts stay)
    h.beat(w1, dropped={"deliver_to_unknown_agent": 5, "bad_frame": 1, "x" * 65: 1, "negative": -1})
    assert h.core.snapshot(None, h.now)["workers"]["w1"]["dropped"] == {"bad_frame": 1, "deliver_to_unknown_agent": 5}
    h.beat(w1, dropped={f"r{i:03}": i for i in range(1000)})
    assert len(h.core.workers["w1"].dropped) == WORKER_DROP_REASONS_MAX
    for bad in ({"a": "1"}, {"a": 1.5}, {"a": True}, [1]):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(protocol.encode("heartbeat", t=h.now, dropped=bad))


def test_a_stall_of_the_coordinator_itself_gives_every_worker_a_fresh_window():
    h = Harness()
    w = h.register("w1")
    h.step(10.0)  # we were not listening for 10 s (SIGSTOP): nobody's silence counts
    assert not h.events("WORKER_LOST")
    h.beat(w)
    for _ in range(30):  # but real silence, while we listen, does
        h.step(0.25)
    assert [p.subject for p in h.events("WORKER_LOST")] == ["w1"]


def _w1_silent_until_lost(stop_timeout: float) -> tuple[Harness, bytes, AgentRecord, float]:
    """Agent "db" (restart="always") READY on w1, which falls silent while w2 beats, until w1 is
    lost: the harness, w2, the record and when w1 was last heard."""
    h = Harness()
    w1, record = h.ready("db", restart="always", stop_timeout=stop_timeout)
    last_heard = h.now
    w2 = h.register("w2", identity=b"w2")
    while not h.events("WORKER_LOST"):
        h.step(0.25)
        h.beat(w2)
    return h, w2, record, last_heard


def test_a_silent_worker_agents_are_replaced_only_after_its_lease_and_the_stop_timeout():
    h, w2, record, last_heard = _w1_silent_until_lost(stop_timeout=2.0)
    assert record.state is S.RESTARTING
    limits = h.core.limits
    while record.state is not S.ASSIGNED:
        h.step(0.25)
        h.beat(w2)
        if record.state is S.PENDING:  # its restart's backoff is over, the old copy's wait is not
            assert record.pending_reason == "waiting for the previous copy on w1 to stop"
        assert h.now < last_heard + 30
    assert h.now >= last_heard + limits.lease + 2.0 and record.worker == "w2"


def test_a_silent_worker_back_without_its_copy_lets_the_replacement_start_at_once():
    # a worker stalled past its window (SIGSTOP, a VM's pause) stopped the copy when its lease ran
    # out; once it registers again without it, nothing is left to wait for: the replacement waited
    # out the lease and the stop timeout all the same (10 s by default), with no copy running
    h, w2, record, last_heard = _w1_silent_until_lost(stop_timeout=10.0)
    while record.state is S.RESTARTING:  # the policy's backoff
        h.step(0.25)
        h.beat(w2)
    assert record.state is S.PENDING and record.pending_reason == "waiting for the previous copy on w1 to stop"
    h.register("w1", identity=b"w1-again", agents=[], conn=2)
    h.beat(w2)
    h.step(0.25)
    assert record.state is S.ASSIGNED
    assert h.now < last_heard + h.core.limits.lease + 10.0


def test_a_lost_workers_copy_is_no_longer_the_current_run_on_the_bus():
    h = Harness()
    w1, record = h.ready("db", restart="always")
    assert h.core.bus_accepts("db", "w1", record.tag)
    while not h.events("WORKER_LOST"):
        h.step(0.25)
    assert record.state is S.RESTARTING and record.tag.endswith(".1")  # not yet replaced...
    assert not h.core.bus_accepts("db", "w1", record.tag)  # ...but what the cut-off copy sends is stale


def test_a_kept_agent_survives_its_workers_silence_and_is_taken_back_when_it_returns():
    h = Harness()
    w1, record = h.ready("svc")  # restart="never": kept
    while not h.events("WORKER_LOST"):
        h.step(0.25)
    assert record.state is S.DISCONNECTED and h.events("AGENT_DISCONNECTED")
    h.register("w1", identity=b"w1-again", agents=[h.running_report(record)], conn=2)
    assert record.state is S.READY and record.worker == "w1"
    assert [p.fields["reason"] for p in h.events("AGENT_ADOPTED")] == ["its worker is back"]
    assert not h.events("AGENT_TERMINATED")


@pytest.mark.parametrize("how", ["listed", "reported"])
def test_a_copy_cut_off_before_its_started_came_is_said_started_when_taken_back(how):
    """ASSIGNED -> DISCONNECTED -> back: its STARTED and READY were never published (they went
    with the old connection): they are, once, before it counts as READY; a late STARTED report
    for the same run does not say it twice."""
    h = Harness()
    w1, record = h.assigned(agent="svc")  # restart="never": kept
    while not h.events("WORKER_LOST"):
        h.step(0.25)
    assert record.state is S.DISCONNECTED and not h.events("AGENT_STARTED")
    if how == "listed":  # its registration lists the copy running, READY
        h.register("w1", identity=b"w1-again", agents=[h.running_report(record)], conn=2)
    else:  # its READY report travels with the registration (its STARTED went with the old connection)
        ready = protocol.agent_event("svc", record.run, record.epoch, "AGENT_READY", {})
        h.register("w1", identity=b"w1-again", events=[ready], agents=[h.running_report(record)], conn=2)
    assert record.state is S.READY
    order = [p.event.value for p in h.published if p.event.value.startswith("AGENT_")]
    assert order == ["AGENT_DISCONNECTED", "AGENT_ADOPTED", "AGENT_STARTED", "AGENT_READY"], order
    h.report(b"w1-again", record, "AGENT_STARTED")
    assert len(h.events("AGENT_STARTED")) == 1 and len(h.events("AGENT_READY")) == 1


def test_a_copy_cut_off_before_its_started_came_that_ended_meanwhile_is_said_started_then_terminated():
    h = Harness()
    w1, record = h.assigned(agent="svc")
    while not h.events("WORKER_LOST"):
        h.step(0.25)
    end = protocol.agent_event("svc", record.run, record.epoch, "AGENT_TERMINATED", {"ok": True})
    h.register("w1", identity=b"w1-again", events=[end], conn=2)
    h.step(1.0)
    assert record.state is S.TERMINATED and not record.failed
    order = [p.event.value for p in h.published if p.event.value.startswith("AGENT_")]
    assert order == ["AGENT_DISCONNECTED", "AGENT_STARTED", "AGENT_TERMINATED"], order


# ---------------------------------------------------------------------------- at most once, run identity


@pytest.mark.parametrize("reached", ["READY", "STARTED"])
def test_an_end_whose_started_went_on_an_old_connection_is_said_after_started(reached):
    """The worker registered again on a new connection while its reports of a run (STARTED,
    READY, TERMINATED) were still in the old one: the registration repeats the end, which says how
    far the run got.  Callbacks still see STARTED (and READY, if it got there) before the end,
    once: the old connection's reports arriving afterwards say nothing twice."""
    h = Harness()
    w1, record = h.assigned(agent="job")
    run, epoch = record.run, record.epoch
    end = protocol.agent_event("job", run, epoch, "AGENT_TERMINATED", {"ok": True, "reached": reached})
    h.register("w1", identity=b"w1-again", events=[end], conn=2)
    assert record.state is S.TERMINATED and not record.failed
    said = [p for p in h.published if p.event.value.startswith("AGENT_")]
    wanted = ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"] if reached == "READY" else \
        ["AGENT_STARTED", "AGENT_TERMINATED"]
    assert [p.event.value for p in said] == wanted
    assert all(p.fields.get("recovered") for p in said[:-1]) and "reached" not in said[-1].fields
    old = [protocol.agent_event("job", run, epoch, e, {"ok": True} if e == "AGENT_TERMINATED" else {})
           for e in ("AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED")]
    h.core.control(w1, protocol.decode(protocol.encode("agent_events", n=5, events=old)), h.now)
    h.flush()
    assert [p.event.value for p in h.published if p.event.value.startswith("AGENT_")] == wanted
    assert not h.to(b"w1-again", "start")  # ended: never started again


def test_a_register_written_before_our_welcome_does_not_make_us_start_an_agent_again():
    """A worker asked to register again several times (its heartbeats reached a coordinator that
    did not know it) answers each on the same connection.  We welcome the first and place an agent
    on it; the next ones were written before it read our welcome: their ``seen`` counts the old
    coordinator's frames, and they cannot list a copy our start made.  Taken at face value, the
    start looked acted on and the copy gone, and we sent it again: two live copies (seed 2097 of the
    simulation).  Now such a register is stale; one written after our welcome is read as before."""
    h = Harness()
    w1 = h.register("w1", seen=6, seen_session="old-coordinator")  # the first: it joins
    record = h.add("job")
    h.step()
    assert record.state is S.ASSIGNED and len(h.to(w1, "start")) == 1
    epoch = record.epoch
    h.register("w1", seen=6, seen_session="old-coordinator")  # written before our welcome
    h.step()
    assert record.state is S.ASSIGNED and record.epoch == epoch and len(h.to(w1, "start")) == 1
    h.register("w1", seen=1, seen_session="inc1")  # after our welcome (frame 1), before the start
    h.step()
    assert record.state is S.ASSIGNED and record.epoch == epoch and len(h.to(w1, "start")) == 1


def test_an_end_reported_with_the_registration_is_not_mistaken_for_a_lost_agent():
    h = Harness()
    w1, record = h.ready("once")
    # it re-registers on a new connection: the agent finished meanwhile, its end travels along
    end = protocol.agent_event("once", record.run, record.epoch, "AGENT_TERMINATED", {"ok": True})
    h.register("w1", identity=b"w1-new", events=[end], conn=2)
    h.step(1.0)
    assert record.state is S.TERMINATED and not record.failed
    assert len(h.to(b"w1-new", "start")) == 0 and len(h.events("AGENT_TERMINATED")) == 1


def test_a_start_still_on_its_way_is_not_sent_again():
    h = Harness()
    w1, record = h.assigned()
    # it registers again on the same connection before it read the start (seen < the start's n)
    h.register("w1", identity=w1, seen=0, conn=1)
    h.step()
    assert len(h.to(w1, "start")) == 1 and record.epoch == 1
    # on a new connection, what it never saw is lost: the start goes again (it never ran)
    h.register("w1", identity=b"w1-2", conn=2)
    assert len(h.to(b"w1-2", "start")) == 1 and record.epoch == 2


def test_reports_and_registrations_of_another_run_or_an_older_connection_are_ignored():
    h = Harness()
    w1 = h.register("w1", conn=2)
    record = h.add("a")
    h.step()
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    # a copy of another run with the same name and epoch (a previous script's, whose epochs also
    # started at 1) reports: it is not this run
    for event in ("AGENT_READY", "AGENT_TERMINATED"):
        stale = protocol.agent_event("a", "previous-coordinator", record.epoch, event, {"ok": False})
        h.core.control(w1, protocol.decode(protocol.encode("agent_events", events=[stale])), h.now)
        h.flush()
    assert record.state is S.READY and not h.events("AGENT_TERMINATED")
    stops = h.to(w1, "stop")
    assert len(stops) == 1 and stops[0]["run"] == "previous-coordinator"  # the running stale copy is stopped
    h.register("w1", identity=b"old-socket", conn=1)  # a snapshot from its older connection
    assert record.state is S.READY and h.core.workers["w1"].identity == w1


def test_a_stale_copy_being_stopped_counts_as_running_until_its_end_and_asks_no_reregistration():
    """A copy of another run that a worker still runs is told to stop; until its end is reported
    the worker's count of copies includes it, which is no reason to make it register again."""
    h = Harness()
    w1, record = h.ready(agent="a", worker="w1")
    stale = protocol.agent_event("a", "previous-coordinator", 1, "AGENT_READY", {})
    h.core.control(w1, protocol.decode(protocol.encode("agent_events", events=[stale])), h.now)
    h.flush()
    assert len(h.to(w1, "stop")) == 1
    read = h.core.workers["w1"].sent_n
    for _ in range(4):  # everything read, two copies running: ours and the one stopping
        h.beat(w1, running=2, read=read)
    assert not h.to(w1, "reregister")
    ended = protocol.agent_event("a", "previous-coordinator", 1, "AGENT_TERMINATED", {"ok": True})
    h.core.control(w1, protocol.decode(protocol.encode("agent_events", events=[ended])), h.now)
    h.flush()
    for _ in range(4):  # it has ended: one copy now, and two would be a real difference
        h.beat(w1, running=1, read=read)
    assert not h.to(w1, "reregister") and record.state is S.READY
    for _ in range(3):
        h.beat(w1, running=2, read=read)
    assert len(h.to(w1, "reregister")) == 1


def test_a_connection_the_worker_closes_on_purpose_is_no_death():
    """A worker that says it is closing its connection (to register on a new one) is judged by
    its silence, not by the close: a new register that takes longer than the reconnect grace
    (a busy machine) must not make it lost."""
    h = Harness()
    w1 = h.register("w1")
    h.core.control(w1, protocol.decode(protocol.encode("closing")), h.now)
    h.core.disconnected(w1, h.now)  # the monitor saw the close
    h.flush()
    for _ in range(int((h.core.limits.reconnect_grace + 0.5) / 0.1)):  # past the grace, within its silence
        h.step(0.1)
    assert h.core.workers["w1"].alive and not h.events("WORKER_LOST")
    for _ in range(int(h.core.limits.silence / 0.1)):  # and silence still counts: one that never comes back is lost
        h.step(0.1)
    assert not h.core.workers["w1"].alive and h.events("WORKER_LOST")


def test_a_close_seen_before_the_closing_frame_is_read_is_no_death_either():
    """The coordinator reads its connections and the monitor of their closes separately: with
    frames queued (a busy loop reads a bounded slice a turn), the close of a connection can be seen
    before the "closing" frame the worker sent on it first. Its worker is still judged by silence."""
    h = Harness()
    w1 = h.register("w1")
    h.core.disconnected(w1, h.now)  # the monitor's report came first
    h.core.control(w1, protocol.decode(protocol.encode("closing")), h.now)
    h.flush()
    for _ in range(int((h.core.limits.reconnect_grace + 0.5) / 0.1)):
        h.step(0.1)
    assert h.core.workers["w1"].alive and not h.events("WORKER_LOST")


def test_lost_frames_from_a_worker_make_it_register_again():
    h = Harness()
    w1 = h.register("w1")
    h.core.control(w1, protocol.decode(protocol.encode("heartbeat", n=2)), h.now)
    h.core.control(w1, protocol.decode(protocol.encode("heartbeat", n=5)), h.now)
    h.flush()
    assert len(h.to(w1, "reregister")) == 1


# ---------------------------------------------------------------------------- memory


def test_finished_agents_and_departed_workers_are_forgotten():
    h = Harness(finished_agents_max=3, worker_retention=10.0)
    w1 = h.register("w1")
    records = [h.add(f"a{i}") for i in range(6)]
    h.step()
    for record in records:
        h.report(w1, record, "AGENT_STARTED", "AGENT_TERMINATED", ok=True)
    h.step()
    assert sorted(h.core.agents) == ["a3", "a4", "a5"] and h.forgotten == ["a0", "a1", "a2"]
    h.core.control(w1, protocol.decode(protocol.encode("goodbye")), h.now)
    h.step(11.0)
    assert "w1" not in h.core.workers


def test_a_worker_whose_welcome_cannot_be_delivered_is_joined_then_lost_never_half_alive():
    h = Harness()
    w1 = h.register("w1")
    assert [p.subject for p in h.events("WORKER_JOINED")] == ["w1"]
    h.core.disconnected(w1, h.now)  # the loop's send found no route (EHOSTUNREACH)
    h.step(h.core.limits.reconnect_grace + 0.01)
    assert [p.event.value for p in h.published] == ["WORKER_JOINED", "WORKER_LOST"]
    record = h.add("a")
    h.step()
    assert record.state is S.PENDING and record.worker is None  # nothing is placed on it


def test_twenty_thousand_registrations_leave_nothing_behind():
    h = Harness(worker_retention=10.0)
    for conn in range(1, 20_001):
        identity = f"w1/{conn}".encode()
        h.register("w1", identity=identity, conn=conn)
        h.core.disconnected(f"w1/{conn - 1}".encode(), h.now)  # its previous connection closes
        h.sent.clear()
    assert len(h.core.workers) == 1 and len(h.core.by_identity) == 1
    assert len(h.core.closed_connections) <= 10_000
    for i in range(200):  # and workers that come and go are forgotten after the retention
        w = h.register(f"tmp{i}", identity=f"tmp{i}".encode(), incarnation=f"i{i}")
        h.core.control(w, protocol.decode(protocol.encode("goodbye")), h.now)
    h.step(11.0)
    assert sorted(h.core.workers) == ["w1"]


def test_the_oldest_end_is_forgotten_first_even_after_an_agent_ran_again():
    h = Harness(finished_agents_max=2)
    w1 = h.register("w1")
    a0, a1 = h.add("a0"), h.add("a1")
    h.step()
    h.report(w1, a0, "AGENT_STARTED", "AGENT_TERMINATED", ok=True)
    h.report(w1, a1, "AGENT_STARTED", "AGENT_TERMINATED", ok=True)
    h.core.command(commands.StartAgent("a0"), h.now)  # a0 runs again and ends last
    h.step()
    h.report(w1, a0, "AGENT_STARTED", "AGENT_TERMINATED", ok=True)
    h.add("a2")
    h.step()
    h.report(w1, h.core.agents["a2"], "AGENT_STARTED", "AGENT_TERMINATED", ok=True)
    h.step()
    assert h.forgotten == ["a1"] and sorted(h.core.agents) == ["a0", "a2"]


def test_starts_in_flight_explain_a_count_difference_and_no_reregistration_is_asked():
    h = Harness()
    w1 = h.register("w1")
    for i in range(5):
        h.add(f"a{i}")
    h.step()
    sent = h.core.workers["w1"].sent_n
    # a burst: the worker has read only the welcome so far, its count lags for many heartbeats
    for _ in range(6):
        h.beat(w1, running=0, read=1)
    assert not h.to(w1, "reregister")
    # with everything read and the count still wrong, a start or a report was really lost
    for _ in range(3):
        h.beat(w1, running=0, read=h.core.workers["w1"].sent_n)
    # welcome, then one starts frame with all five (echoes are not numbered: flow.py)
    assert sent == 2 and len(h.to(w1, "start")) == 5 and len(h.to(w1, "reregister")) == 1


def test_starts_frames_stay_under_the_workers_frame_limit_whatever_the_configs_weigh():
    """Agents placed together travel in one starts frame, but a frame over the worker's limit
    costs its connection: 30 agents of 3 MiB made one 90 MiB frame and the worker was lost with
    all of them.  The frames split by bytes, keep their order, and carry the class once."""
    h = Harness()
    w1 = h.register("w1")
    h.sent.clear()
    for i in range(30):
        h.add(f"a{i:02}", class_blob=bytes(2**20) if i == 0 else b"", config_blob=bytes(3 * 2**20))
    h.core.workers["w1"].window.credit = flow.CEILING  # (a fast link: the frames' own limit cuts them)
    h.now += 0.1
    h.core.tick(h.now)
    h.core.place(h.now)
    frames = [a.frame for a in h.core.take() if isinstance(a, Send) and a.identity == w1]
    while h.core.workers["w1"].window.held:  # the worker reads them: what waited for room goes (flow.py)
        h.core.control(w1, protocol.decode(protocol.encode("read", read=protocol.decode(frames[-1])["n"])), h.now)
        frames += [a.frame for a in h.core.take() if isinstance(a, Send) and a.identity == w1]
    # they cross in parts (flow.py), which the worker puts together again: the frames are those
    whole, parts = [], flow.Reassembly()
    for frame in frames:
        message = protocol.decode(frame)
        if message["type"] != "part":
            whole.append(frame)
        elif (frame := parts.add(message["data"], message["last"], protocol.DEFAULT_MAX_MESSAGE_SIZE)) is not None:
            whole.append(frame)
            assert protocol.decode(frame)["n"] == 0  # (it takes the last part's number)
    frames = whole
    starts = [m for m in map(protocol.decode, frames) if m["type"] == "starts"]
    assert len(starts) > 1
    # each under the worker's limit with room to spare, and the agents in the order decided
    assert max(map(len, frames)) <= protocol.STARTS_FRAME_BYTES + 64 * 1024 < protocol.DEFAULT_MAX_MESSAGE_SIZE
    items = [item for m in starts for item in m["agents"]]
    assert [item["agent"] for item in items] == [f"a{i:02}" for i in range(30)]
    assert [len(item["class_blob"] or b"") for item in items] == [2**20] + [0] * 29
    assert all(len(item["config"]) == 3 * 2**20 for item in items)


def _burst(h: Harness, w1: bytes, count: int = 40) -> None:
    """``count`` agents of 10 kB configs placed on w1 in separate passes (a starts frame each)."""
    for i in range(count):
        h.add(f"b{i:02}", config_blob=bytes(10_000))
        h.step()


def test_frames_past_a_workers_credit_wait_in_order_and_its_echoes_do_not():
    """A burst to one worker: what its connection's credit does not cover waits here (flow.py),
    and goes, in number order, as the worker says it read; echoes never wait behind it, and say
    how far the frames sent before them go."""
    h = Harness(heartbeat_interval=0.4, heartbeat_liveness=5)  # a 2 s lease: credit floor 64 KiB
    w1 = h.register("w1")
    _burst(h, w1)
    window = h.core.workers["w1"].window
    sent = [m["n"] for i, m in h.sent if i == w1 and m["n"]]
    assert sent == list(range(1, len(sent) + 1)) and 5 <= len(sent) <= 9  # the welcome and 64 KiB of starts
    assert len(window.held) == 41 - len(sent) and window.in_flight >= flow.FLOOR
    h.beat(w1)  # (echoed at once, and again at the tick)
    h.step(0.4)
    echo = h.to(w1, "heartbeat_reply")[-1]
    assert echo["n"] == 0 and echo["sent"] == sent[-1]
    assert h.read_all(w1) >= 2
    numbered = [m["n"] for i, m in h.sent if i == w1 and m["n"]]
    assert numbered == list(range(1, 42)) and len(h.to(w1, "start")) == 40
    assert [item["agent"] for item in h.to(w1, "start")] == [f"b{i:02}" for i in range(40)]


def test_a_workers_late_lease_makes_us_send_it_less_at_a_time():
    """Our echoes wait behind what we send it: a worker starved of the CPU reads in bursts and
    looks faster than its link, and its lease runs late; its heartbeats say how late (lease_age),
    and our credit to it halves each time until one says it is quick again (flow.py)."""
    h = Harness(heartbeat_interval=0.4, heartbeat_liveness=5)  # a 2 s lease
    w1 = h.register("w1")
    window = h.core.workers["w1"].window
    window.credit = 1_000_000  # (as a fast reader made it)
    h.beat(w1, lease_age=0.5)  # within the cadence and a tenth of the lease: quick
    assert window.credit == 1_000_000
    h.beat(w1, lease_age=1.3)  # 0.9 s late: over a fifth of the lease
    h.beat(w1, lease_age=1.7)
    assert window.credit == 250_000
    _burst(h, w1, count=80)  # 800 kB of starts: most wait for room
    assert window.held
    h.read_all(w1, seconds=0.11)  # 250 kB read in 0.11 s (a backlog, say): the rate no longer raises it
    assert window.credit == 250_000


def test_a_big_payload_crosses_in_parts_and_echoes_pass_between_them():
    h = Harness(heartbeat_interval=0.4, heartbeat_liveness=5)
    w1, record = h.ready("inboxed")
    payload = bytes(300_000)  # five parts: the credit (64 KiB) lets the first go
    h.core.command(commands.Deliver("inboxed", "message", payload), h.now)
    h.flush()
    window = h.core.workers["w1"].window
    assert [m["type"] for i, m in h.sent if i == w1][-1] == "part" and len(window.held) == 4
    h.beat(w1)
    h.step(0.4)
    assert h.to(w1, "heartbeat_reply")  # not behind the parts
    h.read_all(w1)
    parts = [m for i, m in h.sent if i == w1 and m["type"] == "part"]
    assert [m["last"] for m in parts] == [False] * 4 + [True]
    assert [m["n"] for m in parts] == list(range(parts[0]["n"], parts[0]["n"] + 5))
    message = protocol.decode(b"".join(m["data"] for m in parts))
    assert message["type"] == "deliver" and message["payload"] == payload and message["agent"] == "inboxed"


def test_a_register_on_the_same_connection_keeps_the_frames_that_wait():
    h = Harness(heartbeat_interval=0.4, heartbeat_liveness=5)
    w1 = h.register("w1")
    _burst(h, w1)
    held = len(h.core.workers["w1"].window.held)
    h.register("w1", identity=w1, seen=1, conn=1)  # it answers a "reregister": what we sent still arrives
    window = h.core.workers["w1"].window
    assert len(window.held) == held + 1  # and its welcome waits behind them, in order
    h.read_all(w1)
    numbered = [m["n"] for i, m in h.sent if i == w1 and m["n"]]
    assert numbered == list(range(1, len(numbered) + 1)) and len(h.to(w1, "start")) == 40
    # on a new connection, what waited for the old one is moot: its welcome goes at once (the
    # register's own frames never wait: the worker says how far it read only once welcomed)
    w2 = h.register("w1", identity=b"w1-2", conn=2)
    assert [(m["type"], m["n"]) for i, m in h.sent if i == w2][:1] == [("welcome", 1)]


def test_the_frames_answering_a_register_never_wait_for_room():
    """A worker says how far it read only once welcomed: a welcome held behind the stops its own
    register called for (past a small credit) never came, and it registered again for ever."""
    h = Harness()
    h.core.window_limits = (50, 100)  # bytes: one stop frame fills it
    ghosts = [protocol.agent_event(f"ghost{i}", "old-run", 1, "AGENT_READY", {}) for i in range(3)]
    w1 = h.register("w1", events=ghosts)
    assert [m["type"] for i, m in h.sent if i == w1] == ["stop", "stop", "stop", "welcome"]
    # once welcomed, the credit counts again
    record = h.add("a", config_blob=bytes(200))
    h.step()
    assert not h.to(w1, "start") and h.core.workers["w1"].window.held
    h.read_all(w1)
    assert len(h.to(w1, "start")) == 1 and record.state is S.ASSIGNED


def test_a_heartbeat_says_how_far_the_workers_frames_go_and_a_gap_is_repaired():
    """A worker's heartbeats are not numbered (they never wait behind its reports: flow.py); each
    says its last numbered frame, which the core has read by then unless it was lost."""
    h = Harness()
    w1, record = h.assigned()
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY", n=2)
    h.beat(w1, running=1, read=2, sent=2)
    assert not h.to(w1, "reregister")
    h.beat(w1, running=1, read=2, sent=4)  # frames 3 and 4 never came, and nothing after them shows it
    assert len(h.to(w1, "reregister")) == 1
    h.beat(w1, running=1, read=2, sent=4)  # (asked once)
    assert len(h.to(w1, "reregister")) == 1


def test_reports_a_worker_holds_back_explain_a_count_difference():
    h = Harness()
    w1, _ = h.ready()
    sent = h.core.workers["w1"].sent_n
    for _ in range(6):  # it ended there, and its end waits for room: its count says 0, ours 1
        h.beat(w1, running=0, read=sent, waiting=True)
    assert not h.to(w1, "reregister")
    for _ in range(3):
        h.beat(w1, running=0, read=sent)
    assert len(h.to(w1, "reregister")) == 1


def test_the_core_says_how_far_it_read_a_workers_frames_between_heartbeats():
    h = Harness()
    w1, record = h.assigned()
    h.sent.clear()
    frame = protocol.encode("agent_events", n=2, events=[
        protocol.agent_event("a", record.run, record.epoch, "AGENT_STARTED", {"pad": "p" * 6000})])
    for n in range(2, 5):  # 3 x 6 kB: past flow.SAY_READ_EVERY at the third
        message = protocol.decode(frame)
        message["n"] = n
        h.core.control(w1, message, h.now, len(frame))
        h.flush()
    replies = h.to(w1, "heartbeat_reply")
    assert len(replies) == 1 and replies[0]["read"] == 4 and replies[0]["n"] == 0


@pytest.mark.parametrize("reached", ["READY", "STARTED"])
def test_a_folded_end_says_its_run_started_as_reported_in_order(reached):
    """A worker that had a short run's STARTED, READY and end in one report sends the end alone,
    folded (protocol 9): the same events are published, in order, as reported (not recovered),
    and the end's fields carry nothing of the folding."""
    h = Harness()
    w1, record = h.assigned(agent="job")
    h.report(w1, record, "AGENT_TERMINATED", n=0, ok=True, reached=reached, folded=True)
    said = [p for p in h.published if p.event.value.startswith("AGENT_")]
    wanted = ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"] if reached == "READY" else \
        ["AGENT_STARTED", "AGENT_TERMINATED"]
    assert [p.event.value for p in said] == wanted
    assert not any(p.fields.get("recovered") for p in said)
    assert "folded" not in said[-1].fields and "reached" not in said[-1].fields and said[-1].fields["ok"] is True
    assert record.state is S.TERMINATED and not record.failed


def test_a_lifecycle_event_is_published_once_even_when_a_registration_recovered_it_first():
    h = Harness()
    w1, record = h.assigned()
    # it registers again (same connection, start read) listing the copy before its reports arrive
    h.register("w1", identity=w1, agents=[h.running_report(record)], seen=5)
    assert record.state is S.READY
    assert [p.fields.get("recovered") for p in h.events("AGENT_STARTED")] == [True]
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    assert len(h.events("AGENT_STARTED")) == 1 and len(h.events("AGENT_READY")) == 1
    assert record.state is S.READY



def test_a_register_speaking_for_a_live_worker_from_another_connection_needs_its_token():
    h = Harness()
    w1, record = h.ready("a")
    token = h.core.workers["w1"].token
    assert token == "secret-w-inc"
    # impostors read the name, the incarnation and the run off the bus: they claim the worker runs
    # nothing now, and carry a forged end of the agent's run
    end = protocol.agent_event("a", record.run, record.epoch, "AGENT_TERMINATED", {"ok": False})
    h.register("w1", identity=b"evil", token="", events=[end])
    h.register("w1", identity=b"evil2", token="guess", events=[end])
    h.register("w1", identity=b"evil4", token="sécret", events=[end])
    h.register("w1", identity=b"evil3", incarnation="another", events=[end])
    assert all(len(h.to(e, "refused")) == 1 and not h.to(e, "welcome") for e in (b"evil", b"evil2", b"evil3", b"evil4"))
    assert record.state is S.READY and h.core.workers["w1"].identity == w1
    assert not h.events("AGENT_TERMINATED") and not h.events("AGENT_ERROR")
    # the worker itself, on a new connection, shows its token: taken back with its agent, same token
    h.register("w1", identity=b"w1-new", conn=2, agents=[h.running_report(record)])
    assert h.core.workers["w1"].identity == b"w1-new" and h.core.workers["w1"].token == token
    assert record.state is S.READY and not h.events("AGENT_TERMINATED")


# ---------------------------------------------------------------------------- the pulse


def _pulse(h: Harness, name: str = "w1", token: str = "secret-w-inc") -> None:
    frame = protocol.encode("pulse", name=name, token=token, t=h.now)
    h.core.control(b"pulse-conn", protocol.decode(frame), h.now)
    h.flush()


def test_a_worker_whose_loop_is_silent_but_whose_pulse_goes_on_is_busy_until_the_cap():
    """Its process is alive and not stopped (the pulse process says so, with the worker's secret):
    not lost at the silence limit, lost at busy_cap; its agents' replacement waits for the lease
    the pulse echoes renewed."""
    h = Harness()
    identity, record = h.ready("a", restart="always")  # replaced when its worker is lost
    limits = h.core.limits
    silent_from = h.now
    while h.now - silent_from < limits.busy_cap - limits.interval:
        h.step(limits.interval / 2)
        _pulse(h)
        assert not h.events("WORKER_LOST"), f"lost after {h.now - silent_from:.1f} s of a pulse"
    assert [m["echo"] for m in h.to(b"pulse-conn", "pulse_reply")][-1] == h.now
    assert record.state is S.READY
    while not h.events("WORKER_LOST") and h.now - silent_from < limits.busy_cap + 2 * limits.interval:
        h.step(limits.interval / 2)
        _pulse(h)
    lost = h.events("WORKER_LOST")
    assert lost and "its loop has been silent" in lost[0].fields["reason"]
    assert record.state is not S.READY
    # the replacement may start only when the lease its last pulse echo renewed has run out
    [until] = h.core.predecessor.old_copies["a"].values()
    assert until >= limits.replace_after(h.now, record.stop_timeout) - limits.interval


def test_a_closed_connection_with_the_pulse_going_on_is_no_certain_death():
    """A connection can close with its worker alive (a reset), and a busy worker may not reconnect
    and speak within the reconnect grace. Its pulse after the close shows its process lives: it is
    judged by its silence (busy while the pulse goes on), its agents kept, not replaced at once;
    without a pulse the close is taken for its process's death."""
    h = Harness()
    identity, record = h.ready("a", restart="always")
    h.core.disconnected(identity, h.now)
    for _ in range(int((h.core.limits.reconnect_grace + 1.0) / 0.1)):
        h.step(0.1)
        _pulse(h)
    assert not h.events("WORKER_LOST") and record.state is S.READY
    h2 = Harness()
    identity, record = h2.ready("a", restart="always")
    h2.core.disconnected(identity, h2.now)
    for _ in range(int((h2.core.limits.reconnect_grace + 0.2) / 0.1)):
        h2.step(0.1)
    assert h2.events("WORKER_LOST") and "connection closed" in h2.events("WORKER_LOST")[0].fields["reason"]


def test_a_pulse_without_the_workers_secret_or_for_a_lost_worker_counts_for_nothing():
    h = Harness()
    dropped = []
    h.core.drop = lambda kind, detail: dropped.append(kind)
    identity, record = h.ready()
    silent_from = h.now
    while not h.events("WORKER_LOST"):
        h.step(h.core.limits.interval / 2)
        _pulse(h, token="guessed")
        assert h.now - silent_from < h.core.limits.silence + 2 * h.core.limits.interval
    assert "pulse_not_from_worker" in dropped and not h.to(b"pulse-conn", "pulse_reply")
    _pulse(h)  # the right secret, too late: the worker is lost
    assert not h.to(b"pulse-conn", "pulse_reply")


def test_a_report_cannot_rename_the_event_or_its_number_and_publisher():
    """The coordinator names what it publishes (event, seq, publisher, incarnation): a worker's
    report carrying those fields has them dropped and counted, the rest of it kept."""
    h = Harness()
    drops: list[str] = []
    h.core.drop = lambda kind, detail: drops.append(kind)
    w1, record = h.assigned(agent="job")
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    h.report(w1, record, "AGENT_TERMINATED", ok=True, event="AGENT_READY", seq=0, publisher="evil",
             incarnation="x", exit_code=3)
    end = h.events("AGENT_TERMINATED")[-1].fields
    assert not {"event", "seq", "publisher", "incarnation"} & end.keys()
    assert end["exit_code"] == 3 and end["agent_name"] == "job" and record.state is S.TERMINATED
    assert drops == ["publisher_field_in_report"]


def test_an_end_counts_the_messages_its_run_never_handled_and_keeps_them_in_the_event():
    """A run's end says how many messages its full inbox refused and how many it left waiting
    (agents/inbox.py): each is counted in ``dropped`` and stays in the published end; a count
    that is not a positive int is not believed (dropped from the end, nothing counted)."""
    h = Harness()
    drops: list[tuple[str, int]] = []
    h.core.drop = lambda kind, detail, count=1, what="frame": drops.append((kind, count, what))
    for name, fields in (("job", {"messages_dropped": 79, "messages_unhandled": 20}),
                         ("liar", {"messages_dropped": "79", "messages_unhandled": -3}),
                         ("zero", {"messages_dropped": 0, "messages_unhandled": True})):
        w1, record = h.ready(agent=name, worker="w1")
        h.report(w1, record, "AGENT_TERMINATED", ok=True, **fields)
        end = h.events("AGENT_TERMINATED")[-1].fields
        assert end["agent_name"] == name and record.state is S.TERMINATED
        kept = {k: v for k, v in fields.items() if type(v) is int and v > 0}
        assert {k: end[k] for k in fields if k in end} == kept, end
    assert drops == [("agent_inbox_full", 79, "message"), ("agent_ended_with_messages", 20, "message")]


def test_what_a_run_was_sent_and_neither_took_nor_dropped_is_counted_as_lost_wherever_it_was():
    """A run's end counts what waited in its inbox; messages still in a process agent's pipe, on
    the wire, or reaching its worker after the end went uncounted.  The coordinator knows what it
    sent the run (messages and triggers, not execute): what the end does not say it took or
    dropped is counted as unhandled.  An end that cannot say what it took (an agent host that
    died) keeps its own counts, and each run counts what was sent to it alone."""
    h = Harness()
    drops: list[tuple[str, int]] = []
    h.core.drop = lambda kind, detail, count=1, what="frame": drops.append((kind, count))
    cases = (("pipe", {"messages_taken": 6, "messages_dropped": 1, "messages_unhandled": 1}, 3),  # 10 - 6 - 1
             ("inbox", {"messages_taken": 2, "messages_unhandled": 8}, 8),  # its own count is all of them
             ("host_died", {"messages_unhandled": 1}, 1),
             ("liar", {"messages_taken": "2"}, None),
             ("took_all", {"messages_taken": 10}, None))
    for name, fields, unhandled in cases:
        w1, record = h.ready(agent=name, worker="w1")
        for i in range(10):
            h.core.command(commands.Deliver(name, ("message", "trigger")[i % 2], i), h.now)
        h.core.command(commands.Execute(name), h.now)
        h.flush()
        h.report(w1, record, "AGENT_TERMINATED", ok=True, **fields)
        end = h.events("AGENT_TERMINATED")[-1].fields
        assert end["agent_name"] == name and end.get("messages_unhandled") == unhandled, end
        assert end.get("messages_taken") == (fields["messages_taken"] if name in ("pipe", "inbox", "took_all")
                                             else None), end
    assert drops == [("agent_inbox_full", 1), ("agent_ended_with_messages", 3), ("agent_ended_with_messages", 8),
                     ("agent_ended_with_messages", 1)]
    # started again: its new run was sent 2, took 2, and nothing of the run before counts
    record = h.core.agents["took_all"]
    h.core.command(commands.StartAgent("took_all"), h.now)
    h.step()
    w1 = h.core.workers["w1"].identity
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    for i in range(2):
        h.core.command(commands.Deliver("took_all", "message", i), h.now)
    h.report(w1, record, "AGENT_TERMINATED", ok=True, messages_taken=2)
    assert "messages_unhandled" not in h.events("AGENT_TERMINATED")[-1].fields and len(drops) == 4


def test_messages_sent_to_a_run_whose_worker_was_lost_are_said_unaccounted_in_its_end():
    """Its worker lost, a run never says what it took of what it was sent: at most all of it was
    lost.  Its end says how many (``messages_unaccounted``), and ``dropped`` counts them; its next
    run counts anew."""
    h = Harness()
    drops: list[tuple[str, int]] = []
    h.core.drop = lambda kind, detail, count=1, what="frame": drops.append((kind, count))
    w1, record = h.ready("db", restart="always")
    for i in range(4):
        h.core.command(commands.Deliver("db", "message", i), h.now)
    w2 = h.register("w2", identity=b"w2")
    while not h.events("WORKER_LOST"):
        h.step(0.25)
        h.beat(w2)
    end = next(p.fields for p in h.events("AGENT_TERMINATED") if p.subject == "db")
    assert end["messages_unaccounted"] == 4 and ("agent_lost_with_messages", 4) in drops, end
    assert record.sent == 0  # (its end said them: a failure before its next run, a dependency's, says none)
    h.listen(h.core.limits.lease + 5.0)  # replaced on w2 once the lost copy has certainly stopped
    assert record.worker == "w2" and record.sent == 0
    h.report(w2, record, "AGENT_STARTED", "AGENT_READY")
    h.core.command(commands.Deliver("db", "message", 9), h.now)
    h.report(w2, record, "AGENT_TERMINATED", ok=True, messages_taken=1)
    assert "messages_unhandled" not in h.events("AGENT_TERMINATED")[-1].fields
    assert [d for d in drops if d[0] != "bad_frame"] == [("agent_lost_with_messages", 4)], drops


def test_a_message_or_trigger_to_an_agent_that_does_not_take_it_is_refused_saying_what_to_do():
    """A Looping agent reads no messages (they waited unread in its inbox, up to its bound), and a
    Triggered one took a message and ignored it (lost, uncounted): the caller is told at once."""
    from pyorchestrate import EventDrivenThreadAgent, LoopingProcessAgent, TriggeredThreadAgent

    h = Harness()
    w1 = h.register("w1")
    for name, cls in (("loop", LoopingProcessAgent), ("trig", TriggeredThreadAgent), ("ev", EventDrivenThreadAgent)):
        record = h.add(name)
        record.agent_class = cls
        h.step()
        h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    for name, kind, why in (("loop", "message", r"send: agent 'loop' is a LoopingProcessAgent, which does not take "
                                                r"send\(\): nothing in it reads its messages"),
                            ("loop", "trigger", r"trigger: .* does not take trigger\(\): nothing in it reads"),
                            ("trig", "message", r"runs once on a trigger; use orchestrator.trigger\('trig', payload\)")):
        with pytest.raises(ValueError, match=why):
            h.core.command(commands.Deliver(name, kind, 1), h.now)
    for name, kind in (("trig", "trigger"), ("ev", "message"), ("ev", "trigger")):
        h.core.command(commands.Deliver(name, kind, 1), h.now)
    h.flush()
    assert [(m["agent"], m["kind"]) for m in h.to(w1, "deliver")] == [("trig", "trigger"), ("ev", "message"),
                                                                       ("ev", "trigger")]
    assert (h.core.agents["loop"].sent, h.core.agents["trig"].sent, h.core.agents["ev"].sent) == (0, 1, 2)


def test_a_worker_cannot_report_for_a_copy_another_worker_runs():
    """Runs and epochs are on the bus for anyone to read: a report naming the right run and epoch
    still counts only from the worker that copy runs on.  Another worker's STARTED, READY or end
    for it changes nothing and publishes nothing."""
    h = Harness()
    w1, record = h.ready(agent="job", worker="w1")
    w2 = h.register("w2")
    published = len(h.published)
    h.report(w2, record, "AGENT_TERMINATED", ok=False)
    h.report(w2, record, "AGENT_ERROR", error_message="made up")
    h.report(w2, record, "AGENT_STARTED", "AGENT_READY")
    h.step()
    assert record.state is S.READY and record.worker == "w1" and record.error is None
    assert [p.event.value for p in h.published[published:] if p.subject == "job"] == []
    h.report(w1, record, "AGENT_TERMINATED", ok=True)  # its own worker's end still counts
    assert record.state is S.TERMINATED and h.events("AGENT_TERMINATED")[-1].fields["ok"] is True


# ---------------------------------------------------------------------------- a previous coordinator's copies


def _predecessor_copy(agent: str, definition: str | None = None, run: str = "inc0", epoch: int = 1) -> dict:
    """How a registering worker lists a copy the coordinator before us (same name, run ``inc0``) started."""
    return {"agent": agent, "run": run, "epoch": epoch, "state": "READY", "coordinator": "c",
            "definition": definition or f"d-{agent}"}


def _ended(identity: bytes, h: Harness, copy: dict) -> None:
    item = protocol.agent_event(copy["agent"], copy["run"], copy["epoch"], "AGENT_TERMINATED", {"ok": True})
    h.core.control(identity, protocol.decode(protocol.encode("agent_events", events=[item])), h.now)
    h.flush()


def test_a_copy_reported_before_the_script_registers_its_agent_is_kept_running_and_adopted():
    """Workers can report a previous coordinator's copies before the restarted script has
    registered its agents (it registers them after start(), or slowly).  Such a copy is held,
    running, for the adoption window and a heartbeat silence after it: registered within that, it
    is adopted, neither stopped nor started again."""
    h = Harness(adopt_window=2.0)
    w1 = h.register("w1", agents=[_predecessor_copy("a")])
    h.step(2.0 + h.core.limits.silence - 0.5)  # the window is over, the hold not yet
    assert not h.to(w1, "stop")
    record = h.add("a")
    h.step()
    assert record.state is S.READY and record.run == "inc0" and record.worker == "w1"
    assert len(h.events("AGENT_ADOPTED")) == 1 and not h.to(w1, "start") and not h.to(w1, "stop")


def test_a_copy_nobody_registers_is_stopped_once_its_hold_is_over():
    h = Harness(adopt_window=2.0)
    w1 = h.register("w1", agents=[_predecessor_copy("a")])
    h.step(2.0 + h.core.limits.silence + 0.1)
    assert [(m["agent"], m["run"]) for m in h.to(w1, "stop")] == [("a", "inc0")]


def test_a_held_copy_that_ends_before_its_agent_is_registered_is_not_adopted():
    """The held copy ended (a one-shot agent finishing, a crash): registering its agent then starts
    it anew.  Adopting the report would take a copy that no longer runs for the running one, and
    the agent would never run again."""
    h = Harness(adopt_window=2.0)
    copy = _predecessor_copy("a")
    w1 = h.register("w1", agents=[copy])
    _ended(w1, h, copy)
    record = h.add("a")
    h.listen(2.1)  # past the window: it may start
    assert not h.events("AGENT_ADOPTED")
    assert record.state is S.ASSIGNED and record.run == "inc1" and len(h.to(w1, "start")) == 1


def test_an_agent_starts_only_after_every_old_copy_being_stopped_has_ended():
    """Two workers still run older copies of an agent (a changed definition: stopped, not
    adopted).  Its new copy starts when both have ended, not when the first has: never two
    live copies."""
    h = Harness(adopt_window=1.0)
    record = h.add("a")
    old1, old2 = _predecessor_copy("a", "d-old", epoch=1), _predecessor_copy("a", "d-old", epoch=2)
    w1 = h.register("w1", agents=[old1])
    w2 = h.register("w2", agents=[old2])
    assert [m["stop"] for _, m in h.sent if m["type"] == "welcome"] == [
        [{"agent": "a", "run": "inc0", "epoch": 1, "timeout": 1.0}],
        [{"agent": "a", "run": "inc0", "epoch": 2, "timeout": 1.0}]]
    h.listen(1.5)  # past the adoption window
    assert record.state is S.PENDING and "previous copy" in record.pending_reason
    _ended(w1, h, old1)
    h.step()
    assert record.state is S.PENDING and "previous copy on w2" in record.pending_reason
    _ended(w2, h, old2)
    h.step()
    assert record.state is S.ASSIGNED and record.run == "inc1"


def _restarted(marker: str, **told) -> tuple[Harness, AgentRecord, AgentRecord, bytes]:
    """A coordinator (automatic window) started where the run marker says ``marker`` ("clean", or
    "none": not there); agents a and b registered; w1 registers, saying ``told``."""
    h = Harness(adopt_window=2.0 if marker == "none" else 0.0, strict_hold=False, crash_window=2.0)
    a, b = h.add("a"), h.add("b")
    w1 = h.register("w1", **told)
    h.step()
    return h, a, b, w1


@pytest.mark.parametrize("marker", ["clean", "none"])
def test_a_worker_the_predecessor_left_makes_the_wait_a_crashs_before_anything_starts(marker):
    """The marker says the last run here ended cleanly (it ran elsewhere since), or there is none
    (a restarted container, a service's private /tmp); the first worker to register says the
    coordinator of our name it served never said it finished.  Nothing starts; w2, registering a
    moment later with a's copy, has it adopted: one copy, not two.  b, of which no copy was
    reported, waits as after a crash: until a cut-off copy would have stopped."""
    h, a, b, w1 = _restarted(marker, left_by="c", left_session="inc0")
    assert a.state is S.PENDING and b.state is S.PENDING and "adoption window" in a.pending_reason
    assert not h.to(w1, "start")
    w2 = h.register("w2", agents=[_predecessor_copy("a")])
    h.step(0.5)
    assert a.state is S.READY and a.run == "inc0" and a.worker == "w2" and not h.to(w2, "start")
    h.listen(2.0)  # the window is over
    assert b.state is S.PENDING
    h.listen(h.core.limits.unknown_copy_gone(b.keeps_running, b.stop_timeout))
    assert b.state is S.ASSIGNED and len(h.to(w1, "start") + h.to(w2, "start")) == 1, b.pending_reason


def test_a_running_copy_of_the_predecessors_is_word_of_a_crash_though_its_worker_says_nothing_else():
    """An older worker does not say who left it; a copy of our predecessor's that is not
    stopping shows the same: a clean end stops them all."""
    h, a, b, w1 = _restarted("clean", agents=[_predecessor_copy("a")])
    assert a.state is S.READY and b.state is S.PENDING and "adoption window" in b.pending_reason


def test_without_a_marker_agents_wait_the_window_for_workers_to_speak_and_no_longer_if_none_says_crash():
    """No marker and a first worker with nothing to say (a fresh process): a connected worker that
    served a crashed predecessor registers within the window, so agents wait for it; once the
    window is over with no such word, they start (not the crash's long wait)."""
    h, a, b, w1 = _restarted("none")
    assert a.state is S.PENDING and "adoption window" in a.pending_reason
    h.listen(1.9)
    assert a.state is S.PENDING
    h.step(0.2)
    assert a.state is S.ASSIGNED and b.state is S.ASSIGNED


@pytest.mark.parametrize("told", [
    {},  # a fresh worker, or one its coordinator told it finished
    {"left_by": "other", "left_session": "inc0"},  # left by a coordinator of another name
    {"left_by": "c", "left_session": "inc1"},  # by ourselves (it lost us and came back)
    {"agents": [{**_predecessor_copy("a"), "stopping": True}]},  # stopping: a clean end's, maybe
])
def test_no_wait_after_a_clean_end_without_word_of_a_crash(told):
    h, a, b, _ = _restarted("clean", **told)
    assert b.state is S.ASSIGNED


def test_a_stall_of_ours_does_not_eat_the_adoption_window():
    """The window is for hearing workers: a stall of ours during it (a call of the script that
    holds the GIL) must not end it.  It did: the first register read after the stall, from a
    worker with nothing to say, started agents whose copies the next register in the queue
    reported (simulation seed 1720)."""
    h = Harness(adopt_window=2.0, strict_hold=False, crash_window=2.0)  # no run marker
    a = h.add("a")
    h.now += 5.0  # no tick: we were not listening
    h.register("w1")  # a fresh worker, read first after the stall, placed before the tick
    h.core.place(h.now)
    h.flush()
    assert a.state is S.PENDING
    h.step()  # the tick that notices the stall
    assert a.state is S.PENDING and "adoption window" in a.pending_reason
    w2 = h.register("w2", agents=[_predecessor_copy("a")])
    h.step()
    assert a.state is S.READY and a.worker == "w2" and not h.to(w2, "start")


def test_a_window_set_by_the_user_is_not_opened_by_a_workers_word():
    h = Harness(adopt_window=0.0, strict_hold=False)  # Config(adopt_window=0): no crash_window
    b = h.add("b")
    h.register("w1", left_by="c", left_session="inc0")
    h.step()
    assert b.state is S.ASSIGNED


def test_after_a_crash_an_agent_whose_old_copy_was_reported_waits_only_for_that_copy():
    """After a crash (strict hold) an agent waits for copies on workers that never report, up to
    their lease (or orphan timeout) and stop timeout.  One whose old copy a worker did report
    needs no such wait: once that copy has ended it starts at the end of the adoption window."""
    h = Harness(adopt_window=1.0, strict_hold=True)
    waited, reported = h.add("waited"), h.add("reported")
    old = _predecessor_copy("reported", "d-old")
    w1 = h.register("w1", agents=[old])
    _ended(w1, h, old)
    h.listen(1.5)
    assert reported.state is S.ASSIGNED
    assert waited.state is S.PENDING and "adoption window" in waited.pending_reason
    gone = h.core.limits.unknown_copy_gone(waited.keeps_running, 1.0)  # from the coordinator's start, at 100
    h.listen(gone - 1.5 - 0.1)
    assert waited.state is S.PENDING
    h.step(0.2)
    assert waited.state is S.ASSIGNED, waited.pending_reason


def test_an_old_copy_that_ignores_its_stop_on_a_live_worker_blocks_its_agent_until_its_end():
    """A thread stuck in its cycle cannot be killed: its worker, alive, says it still runs, and
    no stop timeout makes it less alive.  Its agent waits for the end, however long."""
    h = Harness(adopt_window=1.0)
    record = h.add("a")
    old = _predecessor_copy("a", "d-old")
    w1 = h.register("w1", agents=[old])
    for _ in range(60):  # 30 s, far past its 1 s stop timeout and any lease
        h.beat(w1, running=1)
        h.step(0.5)
    assert record.state is S.PENDING and record.pending_reason == "waiting for the previous copy on w1 to stop"
    _ended(w1, h, old)
    h.step()
    assert record.state is S.ASSIGNED


@pytest.mark.parametrize("keep", [False, True])
def test_an_old_copy_on_a_worker_that_goes_silent_blocks_until_it_has_certainly_stopped(keep):
    """Its worker is lost: the copy's end may never be reported.  It has certainly stopped once
    the worker's lease and the stop timeout are over, counted from the worker's last sign of life;
    if the agent keeps running (its old copy may too: whether the stop arrived is unknown), once
    the worker's orphan timeout (60 s: not said otherwise) and the stop timeout are over, counted
    from when it was lost (the last frame we may have sent it)."""
    h = Harness(adopt_window=1.0)
    record = h.add("a", on_disconnect="keep" if keep else "replace")
    assert record.keeps_running is keep
    old = _predecessor_copy("a", "d-old")
    w1 = h.register("w1", agents=[old])
    h.register("w2")
    last_sign = h.now
    w2 = b"w2"
    gone, lost = last_sign + h.core.limits.lease + 1.0 + h.core.limits.margin, False
    while h.now < gone - 0.5:
        h.beat(w2)
        h.step(0.5)
        assert record.state is S.PENDING, h.now - last_sign
        if keep and not lost and not h.core.workers["w1"].alive:
            gone, lost = h.now + 60 + 1.0 + h.core.limits.margin, True  # lost at this step
    assert "w1" not in h.core.workers or not h.core.workers["w1"].alive  # (forgotten after 60 s)
    for _ in range(3):
        h.beat(w2)
        h.step(0.5)
    assert record.state is S.ASSIGNED and record.worker == "w2"


def test_an_old_copy_on_a_worker_whose_process_is_gone_blocks_no_more():
    h = Harness(adopt_window=1.0)
    record = h.add("a")
    w1 = h.register("w1", agents=[_predecessor_copy("a", "d-old")])
    w2 = h.register("w2")
    h.listen(1.5)
    assert record.state is S.PENDING
    h.core.control(w1, protocol.decode(protocol.encode("goodbye", n=0)), h.now)  # it shut down
    h.flush()
    h.beat(w2)
    h.step(0.1)
    assert record.state is S.ASSIGNED and record.worker == "w2"


def test_an_old_copy_its_worker_no_longer_lists_when_it_registers_has_ended():
    """Its end report was lost with a connection: the worker's next register lists every copy it
    runs, and one not listed is over."""
    h = Harness(adopt_window=1.0)
    record = h.add("a")
    w1 = h.register("w1", agents=[_predecessor_copy("a", "d-old")])
    h.listen(1.5)
    h.register("w1", identity=w1, agents=[_predecessor_copy("a", "d-old")], conn=2)  # still runs
    h.step()
    assert record.state is S.PENDING
    h.register("w1", identity=w1, agents=[], conn=3)
    h.step()
    assert record.state is S.ASSIGNED and not h.core.predecessor.old_copies  # nothing left behind


def test_a_lost_worker_frees_only_its_own_old_copies():
    """Old copies on two workers; the one whose worker is lost stops blocking once it has certainly
    stopped, the one on the live worker (stuck) still blocks."""
    h = Harness(adopt_window=1.0)
    record = h.add("a")
    old1, old2 = _predecessor_copy("a", "d-old", epoch=1), _predecessor_copy("a", "d-old", epoch=2)
    w1 = h.register("w1", agents=[old1])
    h.register("w2", agents=[old2])
    gone = h.now + h.core.limits.silence + 60 + 1.0 + h.core.limits.margin  # a kept agent: see above
    while h.now < gone + 1.0:  # w2 is silent from the start
        h.beat(w1, running=1)
        h.step(0.5)
    assert "w2" not in h.core.workers and record.state is S.PENDING  # lost, then forgotten
    assert record.pending_reason == "waiting for the previous copy on w1 to stop"
    _ended(w1, h, old1)
    h.step()
    assert record.state is S.ASSIGNED and record.worker == "w1"


# ---------------------------------------------------------------------------- disconnect_timeout


def _given_up(orphan_timeout: float | None) -> tuple[Harness, bytes, "AgentRecord", tuple[str, int]]:
    """A kept agent that restarts, on w1 which goes silent; w2 alive.  disconnect_timeout 10 s."""
    h = Harness(disconnect_timeout=10.0)
    w1 = h.register("w1", **({} if orphan_timeout is None else {"orphan_timeout": orphan_timeout}))
    record = h.add("a", restart="always", on_disconnect="keep")
    h.step()
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    h.register("w2")
    return h, w1, record, (record.run, record.epoch)


def _run_until(h: Harness, record, first_run, seconds: float) -> float | None:
    """Step (w2 beating) until ``record`` runs anew; seconds since w1's last sign, or None."""
    start = h.core.workers["w1"].last_sign
    while h.now - start < seconds:
        h.beat(b"w2")
        h.step(0.5)
        if (record.run, record.epoch) != first_run and record.state is S.ASSIGNED:
            return h.now - start
    return None


@pytest.mark.parametrize("orphan_timeout", [None, 20.0, -5.0])
def test_a_kept_agent_given_up_after_disconnect_timeout_starts_anew_only_once_its_copy_has_stopped(orphan_timeout):
    """Given up is not gone: its worker, cut off, keeps the copy running until its orphan timeout
    (60 s unless the worker said otherwise in its register).  The new copy waits until that, and
    the stop timeout, are over, counted from when the worker was lost.  A negative one means
    nothing: the default (it made the new copy start before the lost one could have stopped)."""
    h, w1, record, first = _given_up(orphan_timeout)
    after = _run_until(h, record, first, 200)
    lost = h.core.limits.silence
    expected = lost + (orphan_timeout if orphan_timeout and orphan_timeout > 0 else 60.0) + 1.0 + h.core.limits.margin
    assert record.state is S.ASSIGNED and record.worker == "w2"
    assert expected <= after <= expected + 1.0, (after, expected)
    assert h.events("AGENT_ERROR")[0].fields["error_message"].endswith("(disconnect_timeout)")


def test_a_kept_agent_given_up_on_a_worker_without_orphan_timeout_waits_for_that_worker():
    """``--orphan-timeout 0``: the worker keeps its agents for ever.  Only its return tells the
    copy's fate: here it still runs it (stopped now, the new copy after its end)."""
    h, w1, record, first = _given_up(0.0)
    assert _run_until(h, record, first, 200) is None and record.state is S.PENDING
    assert record.pending_reason == "waiting for the previous copy on w1 to stop"
    stale = {**Harness.running_report(record), "run": first[0], "epoch": first[1]}
    h.register("w1", identity=w1, agents=[stale], conn=2, orphan_timeout=0.0)
    assert [(m["agent"], m["run"]) for m in h.to(w1, "welcome")[-1]["stop"]] == [("a", first[0])]
    h.step()
    assert record.state is S.PENDING
    _ended(w1, h, {"agent": "a", "run": first[0], "epoch": first[1]})
    h.step()
    assert record.state is S.ASSIGNED and (record.run, record.epoch) != first


def test_a_kept_agent_given_up_starts_anew_at_once_when_its_worker_returns_without_it():
    h, w1, record, first = _given_up(0.0)
    assert _run_until(h, record, first, 30) is None
    h.register("w1", identity=w1, agents=[], conn=2, orphan_timeout=0.0)
    h.step()
    assert record.state is S.ASSIGNED and (record.run, record.epoch) != first


def test_a_stopping_copy_of_the_previous_coordinator_is_not_adopted_and_proves_nothing():
    """After a crash, a worker that was frozen past its lease lists the copy its lease stopped:
    the previous coordinator may have replaced it on a worker that is cut off now (simulation
    seed 859).  That copy is ending: it is not adopted, it blocks its agent until its end, and
    the agent still waits out the hold for copies nobody reported (strict hold)."""
    h = Harness(adopt_window=1.0, strict_hold=True)
    record = h.add("a")
    stopping = {**_predecessor_copy("a", epoch=2), "stopping": True}
    w1 = h.register("w1", agents=[stopping])
    assert not h.events("AGENT_ADOPTED") and "a" not in h.core.predecessor.found
    assert [m["epoch"] for m in h.to(w1, "welcome")[-1]["stop"]] == [2]  # said again: harmless
    _ended(w1, h, stopping)
    h.listen(1.5)
    assert record.state is S.PENDING and "adoption window" in record.pending_reason
    h.listen(h.core.limits.unknown_copy_gone(record.keeps_running, 1.0))
    assert record.state is S.ASSIGNED


def test_a_stopping_copy_reported_before_its_agent_is_registered_blocks_it_all_the_same():
    h = Harness(adopt_window=1.0)
    stopping = {**_predecessor_copy("a"), "stopping": True}
    w1 = h.register("w1", agents=[stopping])
    h.listen(5.0)
    record = h.add("a")
    h.step(0.5)
    assert record.state is S.PENDING and record.pending_reason == "waiting for the previous copy on w1 to stop"
    _ended(w1, h, stopping)
    h.step()
    assert record.state is S.ASSIGNED and not h.events("AGENT_ADOPTED")


# ---------------------------------------------------------------------------- user commands and lost copies


def test_restart_agent_while_a_replacement_waits_for_the_lost_workers_lease_waits_too():
    """Its worker went silent: the replacement waits until that worker's lease has run out and
    the copy has had its stop timeout.  restart_agent meanwhile must not cut that wait short
    (it did: a new copy 5.6 s after the last sign, where the wait ends at 7 s)."""
    h = Harness()
    w1, record = h.ready(agent="a", worker="w1", restart="on-failure", on_disconnect="replace")
    w2 = h.register("w2")
    last_sign = h.core.workers["w1"].last_sign
    while h.core.workers["w1"].alive:
        h.beat(w2)
        h.step(0.5)
    assert record.state is S.RESTARTING
    h.core.command(commands.RestartAgent("a", 1.0), h.now)
    h.flush()
    wait_ends = last_sign + h.core.limits.lease + 1.0 + h.core.limits.margin
    while h.now < wait_ends - 0.2:
        h.beat(w2)
        h.step(0.2)
        assert record.state in (S.PENDING, S.RESTARTING), h.now - last_sign
    for _ in range(3):
        h.beat(w2)
        h.step(0.2)
    assert record.state is S.ASSIGNED and record.worker == "w2"


def test_a_kept_agent_stopped_while_its_worker_is_cut_off_is_not_started_again_beside_its_copy():
    """stop_agent of a DISCONNECTED agent ends its run at once (its worker cannot hear the stop);
    the copy runs on there.  A start_agent then waits for it: until the worker's orphan timeout
    is over, or the worker is back and the copy stopped."""
    h = Harness()
    w1, record = h.ready(agent="k", worker="w1", on_disconnect="keep")
    first = (record.run, record.epoch)
    w2 = h.register("w2")
    while record.state is not S.DISCONNECTED:
        h.beat(w2)
        h.step(0.5)
    h.core.command(commands.StopAgent("k", 1.0), h.now)
    h.core.command(commands.StartAgent("k"), h.now)
    h.flush()
    for _ in range(20):
        h.beat(w2)
        h.step(0.5)
    assert record.state is S.PENDING and record.pending_reason == "waiting for the previous copy on w1 to stop"
    stale = {**Harness.running_report(record), "run": first[0], "epoch": first[1]}
    h.register("w1", identity=w1, agents=[stale], conn=2)  # back, still running it: stopped
    assert [m["epoch"] for m in h.to(w1, "welcome")[-1]["stop"]] == [first[1]]
    h.step()
    assert record.state is S.PENDING
    _ended(w1, h, {"agent": "k", "run": first[0], "epoch": first[1]})
    h.step()
    assert record.state is S.ASSIGNED


def test_a_held_copy_whose_worker_is_lost_blocks_its_agent_registered_after():
    """A previous coordinator's copy, held until the script registers its agent, on a worker that
    goes silent: it may run on there (kept, until the orphan timeout).  Registering the agent then
    does not start a second copy before that."""
    h = Harness(adopt_window=1.0)
    h.register("w1", agents=[_predecessor_copy("a")])
    w2 = h.register("w2")
    while h.core.workers["w1"].alive:
        h.beat(w2)
        h.step(0.5)
    record = h.add("a")
    for _ in range(20):
        h.beat(w2)
        h.step(0.5)
    assert record.state is S.PENDING and record.pending_reason == "waiting for the previous copy on w1 to stop"


def test_a_draining_worker_is_released_only_once_the_old_copies_it_stops_have_ended():
    """Their ends reach us only while the worker is ours: released before, an agent waiting for
    such a copy waited for ever."""
    h = Harness(adopt_window=1.0)
    record = h.add("a")
    old = _predecessor_copy("a", "d-old")
    w1 = h.register("w1", agents=[old])
    w2 = h.register("w2")
    h.core.command(commands.DrainWorker("w1"), h.now)
    h.listen(1.5)
    h.core.release_drained(h.now)
    h.flush()
    assert not h.to(w1, "release") and record.state is S.PENDING
    _ended(w1, h, old)
    h.core.release_drained(h.now)
    h.flush()
    assert len(h.to(w1, "release")) == 1
    h.beat(w2)
    h.step()
    assert record.state is S.ASSIGNED and record.worker == "w2"


def test_execute_is_said_again_when_the_worker_registers_again():
    """hold_after_ready: execute() releases a held agent with one frame.  A frame lost with a
    reset connection makes its worker register again, and the agent would have waited for ever:
    the register is answered with the release again (setting it twice does nothing more)."""
    h = Harness(hold_after_ready=True)
    w1, record = h.ready(agent="held", worker="w1")
    h.core.command(commands.Execute("held"), h.now)
    h.flush()
    assert [m["kind"] for m in h.to(w1, "deliver")] == ["execute"]  # lost on the way, say
    h.register("w1", identity=w1, agents=[Harness.running_report(record)], conn=2)
    assert [m["kind"] for m in h.to(w1, "deliver")] == ["execute", "execute"]
    h.report(w1, record, "AGENT_TERMINATED", ok=True)
    h.register("w1", identity=w1, agents=[], conn=3)
    assert len(h.to(w1, "deliver")) == 2  # its run is over: nothing to say


def test_execute_while_its_worker_is_cut_off_is_said_when_the_worker_is_back():
    h = Harness(hold_after_ready=True)
    w1, record = h.ready(agent="held", worker="w1", on_disconnect="keep")
    w2 = h.register("w2")
    while record.state is not S.DISCONNECTED:
        h.beat(w2)
        h.step(0.5)
    h.core.command(commands.Execute("held"), h.now)  # not refused: it runs, out of reach for now
    h.flush()
    assert not h.to(w1, "deliver")
    h.register("w1", identity=w1, agents=[Harness.running_report(record)], conn=2)
    assert record.state is S.READY and [m["kind"] for m in h.to(w1, "deliver")] == ["execute"]


@pytest.mark.parametrize("keep, restart", [(False, False), (False, True), (True, False)])
def test_another_process_under_a_lost_workers_name_does_not_vouch_for_its_copies(keep, restart):
    """w1 goes silent (cut off: its process may run on). Another process registers under the name
    w1 (a rescheduled container keeps its name), listing nothing. It cannot say what the lost
    process still runs: the agent starts anew only once that copy has certainly stopped (its
    lease, or its orphan timeout for a kept agent), not at once; nor when restart_agent fenced
    it while it waited."""
    h = Harness()
    w1 = h.register("w1")
    record = h.add("a", restart="always", on_disconnect="keep" if keep else "replace")
    h.step()
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    first = (record.run, record.epoch)
    last_sign = h.core.workers["w1"].last_sign
    while not h.events("WORKER_LOST"):
        h.step(0.25)
    if restart:  # restart_agent while the replacement waits: the lost copy is fenced
        h.core.command(commands.RestartAgent("a", 1.0), h.now)
        h.flush()
    h.register("w1", identity=b"w1-elsewhere", incarnation="w-inc-2")  # the new process, on a new connection
    certainly_stopped = last_sign + (
        h.core.limits.silence + 60.0 if keep else h.core.limits.lease) + record.stop_timeout
    while (record.run, record.epoch) == first or record.state is not S.ASSIGNED:
        h.beat(b"w1-elsewhere")
        h.step(0.25)
        assert h.now < last_sign + 200
    assert h.now >= certainly_stopped, f"started anew {h.now - last_sign:.2f} s after the lost process's last sign"


def test_a_register_under_a_name_no_worker_may_have_is_refused_saying_why():
    """Agents publish as "<worker>/<agent>": a worker named "rack1/w1" had every log line and event
    of its agents dropped as another worker's.  pyorchestrate-worker refuses such a --name; a
    register with one (a worker built by hand, an older version) is refused, never retried."""
    h = Harness()
    for i, name in enumerate(("rack1/w1", "a b", "", "x\ty")):
        identity = h.register(name, identity=f"bad{i}".encode())
        (refused,) = h.to(identity, "refused")
        assert "is not a worker's name" in refused["reason"] and refused["retry"] is False
    assert not h.core.workers and not h.to(b"bad0", "welcome")
    h.register("rack1-w1")
    assert list(h.core.workers) == ["rack1-w1"]


def test_a_process_refused_because_its_workers_name_is_taken_is_told_to_stop_its_copies():
    """A lost w1 cut off, another process registered as w1 meanwhile: the first, back, is refused
    (the name is taken) and told to stop what it runs, which is no run of ours any more. Before,
    it ran a kept copy on until its orphan timeout, a minute after it was back (simulation)."""
    h = Harness()
    w1 = h.register("w1")
    record = h.add("a", restart="always", on_disconnect="keep")
    h.step()
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    copy = Harness.running_report(record)
    while not h.events("WORKER_LOST"):
        h.step(0.25)
    h.register("w1", identity=b"w1-elsewhere", incarnation="w-inc-2")
    h.register("w1", identity=b"w1-back", incarnation="w-inc", conn=2, agents=[copy])
    refused = h.to(b"w1-back", "refused")
    assert refused and refused[0]["retry"]
    assert [(s["agent"], s["run"], s["epoch"]) for s in refused[0]["stop"]] == [("a", copy["run"], copy["epoch"])]


def test_a_kept_agent_on_a_worker_that_leaves_while_a_copy_ignores_its_stop_is_replaced_after_the_lease():
    """A worker shutting down with a copy that ignored its stop says "closing" (exiting), not
    goodbye: its copies end with its process, which may never come back. A kept agent there is
    replaced once the lease has run out, like one that is not kept; before, it was kept waiting
    (DISCONNECTED) for a return that may never come."""
    h = Harness()
    w1 = h.register("w1")
    record = h.add("a", restart="always", on_disconnect="keep")
    h.step()
    h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    first = (record.run, record.epoch)
    h.register("w2")
    h.core.control(w1, protocol.decode(protocol.encode("closing", exiting=True)), h.now)
    h.core.disconnected(w1, h.now)
    h.flush()
    last_sign = h.core.workers["w1"].last_sign
    while (record.run, record.epoch) == first or record.state is not S.ASSIGNED:
        assert record.state is not S.DISCONNECTED, "kept waiting for a worker that left"
        h.beat(b"w2")
        h.step(0.25)
        assert h.now < last_sign + 60
    assert record.worker == "w2"
    assert h.now >= h.core.limits.replace_after(last_sign, record.stop_timeout)


def test_a_kept_agent_whose_start_never_arrived_is_started_when_its_worker_comes_back():
    """A start lost with a connection (the worker's first register was delivered late, after it
    had given up on that connection), the worker then silent past the window: the agent, kept on
    disconnect (restart="never" is), was DISCONNECTED before it ever STARTED. The worker, back on a
    new connection, does not list it: it never ran, so it is started now; before, it was failed
    ("came back without"), and a restart="never" agent never ran at all (seen beside 4 CPU burners)."""
    h = Harness()
    w1 = h.register("w1")
    record = h.add("a")  # restart="never": kept on disconnect
    h.step()
    assert record.state is S.ASSIGNED and h.to(w1, "starts")
    while not h.events("WORKER_LOST"):
        h.step(0.25)
    assert record.state is S.DISCONNECTED
    h.register("w1", identity=b"w1-new", conn=2)
    assert record.state is S.ASSIGNED and record.epoch == 2 and h.to(b"w1-new", "starts")
    assert not h.events("AGENT_ERROR") and not h.events("AGENT_TERMINATED")


def test_the_stop_deadline_waits_while_frames_are_still_to_be_read():
    """stop(): agents whose end has not come by the deadline are given up ("did not stop in
    time").  While the loop is behind (frames wait to be read: the ends of thousands of agents
    stopped at once may be among them), that is not known yet, as a worker's silence is not."""
    def past_the_deadline_behind() -> tuple[Harness, bytes, AgentRecord]:
        h = Harness()
        identity, record = h.ready()
        h.core.command(commands.StopAll(1.0), h.now)
        h.flush()
        h.now += h.core.limits.stop_deadline(1.0) + 0.5
        h.core.tick(h.now, behind=True)
        h.flush()
        return h, identity, record

    h, identity, record = past_the_deadline_behind()
    assert record.state is not S.TERMINATED and not h.events("AGENT_ERROR")
    h.report(identity, record, "AGENT_TERMINATED")  # read once caught up: it did stop
    h.step()
    assert record.state is S.TERMINATED and not h.events("AGENT_ERROR")

    h, identity, record = past_the_deadline_behind()  # caught up, and still no end: given up
    h.step()
    assert record.state is S.TERMINATED
    assert "did not stop in time" in h.events("AGENT_ERROR")[-1].fields["error_message"]


def test_a_heartbeat_is_echoed_at_once_not_at_the_next_tick():
    """The worker's lease, and the one it tells its process agents, counts from the stamp echoed:
    an echo held for the tick made it up to an interval older (tests/test_starved_worker.py)."""
    h = Harness(heartbeat_interval=0.4, heartbeat_liveness=5)
    w1 = h.register("w1")
    h.step(0.4)
    h.sent.clear()
    h.now += 0.1  # (between two ticks)
    h.beat(w1)
    assert [m["echo"] for m in h.to(w1, "heartbeat_reply")] == [h.now]


def test_a_pass_over_full_workers_looks_only_at_agents_bound_for_a_particular_worker():
    """Every placement pass looked at every pending agent: a burst over full workers was quadratic
    (40,000 agents on two workers of capacity 20: 4,074 a second, the loop 90 % in placement).
    Once no worker has room, a pass now stops looking at agents that may go anywhere; those bound
    for a particular worker still get their own reason, or fail with a dependency that failed.
    What the others wait for is said when asked (a snapshot), and they are placed oldest first."""
    h = Harness()
    w1 = h.register("w1")
    h.core.workers["w1"].capacity = 2
    dep = h.add("dep")
    h.step()
    h.report(w1, dep, "AGENT_ERROR", error_message="x", traceback="")
    h.report(w1, dep, "AGENT_TERMINATED", ok=False)
    assert dep.state is S.TERMINATED and dep.failed
    first = [h.add(f"a{i}") for i in range(2)]
    h.step()
    assert all(r.state is S.ASSIGNED for r in first)  # w1 is full
    waiting = [h.add(f"b{i:04}") for i in range(1000)]
    pinned = h.add("pinned", pin="w9")
    labelled = h.add("labelled", labels={"gpu": "1"})
    doomed = h.add("doomed", pin="w1", depends_on=["dep"])
    h.step()
    looked_at = [r.name for r in waiting if r.reason_pass == h.core._pass]
    assert looked_at == ["b0000"]  # the first found no room; the other 999 were not looked at
    assert pinned.pending_reason == "waiting for worker 'w9' to join"
    assert labelled.pending_reason == "no live worker has labels gpu=1"
    assert doomed.state is S.TERMINATED and doomed.failed and "dependency dep failed" in doomed.error
    snapshot = h.core.command(commands.Snapshot(), h.now)
    reasons = {row[0]: row[9] for row in snapshot["agent_rows"]}
    assert {reasons[r.name] for r in waiting} == {"every eligible worker is at capacity"}
    assert reasons["pinned"] == "waiting for worker 'w9' to join"
    h.report(w1, first[0], "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    h.step()  # room for one: the oldest goes
    assert [r.name for r in waiting if r.state is S.ASSIGNED] == ["b0000"]
    assert h.core.no_room == "every eligible worker is at capacity"
    h.register("w2")  # a worker without a limit joins: every one placed, PLACE_PER_PASS a pass
    for _ in range(4):
        h.step()
    assert all(r.state is S.ASSIGNED for r in waiting) and h.core.no_room is None
    assert pinned.state is S.PENDING and labelled.state is S.PENDING



def test_a_pass_with_no_slot_left_under_max_workers_looks_only_at_agents_that_need_a_look_of_their_own():
    """The same with ``max_workers`` reached (a burst of 20,000 agents under max_workers=40: 10.2 s,
    now 1.4 s): the agents that may go anywhere are not looked at; one whose dependency failed
    still fails at once, as before, and one bound for a worker is told it waits for a slot."""
    h = Harness(max_workers=2)
    w1 = h.register("w1")
    dep = h.add("dep")
    h.step()
    h.report(w1, dep, "AGENT_ERROR", error_message="x", traceback="")
    h.report(w1, dep, "AGENT_TERMINATED", ok=False)
    first = [h.add(f"a{i}") for i in range(2)]
    h.step()
    assert all(r.state is S.ASSIGNED for r in first)  # no slot left
    waiting = [h.add(f"b{i:04}") for i in range(1000)]
    doomed = h.add("doomed", depends_on=["dep"])  # may go anywhere, but its dependency failed
    pinned = h.add("pinned", pin="w1")
    h.step()
    assert [r.name for r in waiting if r.reason_pass == h.core._pass] == ["b0000"]
    assert doomed.state is S.TERMINATED and doomed.failed and "dependency dep failed" in doomed.error
    slot = "waiting for a slot: max_workers=2 agents are running"
    assert pinned.state is S.PENDING and pinned.pending_reason == slot
    reasons = {row[0]: row[9] for row in h.core.command(commands.Snapshot(), h.now)["agent_rows"]}
    assert {reasons[r.name] for r in waiting} == {slot}
    h.report(w1, first[0], "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    h.step()  # a slot: the oldest goes
    assert [r.name for r in waiting + [pinned] if r.state is S.ASSIGNED] == ["b0000"]


def test_a_pass_does_not_look_at_each_agent_bound_for_workers_found_full():
    """Agents pinned to (or labelled for) workers without room, while others have room: the first
    is looked at, the rest of that kind wait for the same reason and are not (20,000 pinned to one
    full worker took 18.1 s, now 1.9 s); agents that may go anywhere, older or newer, are placed in
    their order meanwhile, and the pinned ones go first come, first served once there is room."""
    h = Harness()
    w1 = h.register("w1")
    h.core.workers["w1"].capacity = 1
    h.register("w2")
    h.core.workers["w2"].capacity = 3
    busy = h.add("busy", pin="w1")
    h.step()
    assert busy.state is S.ASSIGNED  # w1 is full
    older = h.add("older")
    pinned = [h.add(f"p{i:04}", pin="w1") for i in range(1000)]
    newer = h.add("newer")
    h.step()
    assert older.state is S.ASSIGNED and newer.state is S.ASSIGNED  # on w2
    assert [r.name for r in pinned if r.reason_pass == h.core._pass] == ["p0000"]
    reasons = {row[0]: row[9] for row in h.core.command(commands.Snapshot(), h.now)["agent_rows"]}
    assert {reasons[r.name] for r in pinned} == {"every eligible worker is at capacity"}
    h.report(w1, busy, "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    h.step()
    assert [r.name for r in pinned if r.state is S.ASSIGNED] == ["p0000"]


def test_a_pinned_agent_is_matched_to_its_worker_by_name_not_by_a_scan_of_every_worker(monkeypatch):
    """The first agent of each pin's group is looked at in every pass; matched against every worker,
    20,000 agents pinned over 1,000 full workers cost a pass 29 ms (8.4 now).  Only the worker named
    is looked at; one pinned to a worker not there is told to wait for it, as before."""
    from pyorchestrate import placement

    h = Harness()
    for i in range(200):
        h.register(f"w{i}")
        h.core.workers[f"w{i}"].capacity = 1
    busy = [h.add(f"busy{i}", pin=f"w{i}") for i in range(200)]
    h.step()
    assert all(r.state is S.ASSIGNED for r in busy)  # every worker full
    waiting = [h.add(f"p{i}", pin=f"w{i % 200}") for i in range(400)] + [h.add("lost", pin="w999")]
    looks = []
    real = placement.eligible
    monkeypatch.setattr(placement, "eligible", lambda *args: (looks.append(args[0].name), real(*args))[1])
    h.step()
    assert len(looks) == 200  # one a group, each of its own worker
    reasons = {row[0]: row[9] for row in h.core.command(commands.Snapshot(), h.now)["agent_rows"]}
    assert {reasons[r.name] for r in waiting[:-1]} == {"every eligible worker is at capacity"}
    assert reasons["lost"] == "waiting for worker 'w999' to join"


def test_agents_waiting_for_a_dependency_are_not_looked_at_until_it_changes_state():
    """20,000 agents waiting for one that did not start were looked at in every pass, which cut
    other agents' launches from 25,494 to 5,377 a second.  Found waiting, an agent is parked on
    that dependency until it changes state: then looked at again, in its place in the line; one
    whose dependency then fails fails at once, as before."""
    h = Harness()
    w1 = h.register("w1")
    setup = h.add("setup", pin="w9")  # its worker never comes: PENDING
    svc = h.add("svc", depends_on=["setup"])
    waiting = [h.add(f"d{i:04}", depends_on=["setup"]) for i in range(1000)]
    h.step()
    assert {r.pending_reason for r in waiting} == {"waiting for dependency setup (PENDING)"}
    others = [h.add(f"t{i}") for i in range(3)]
    h.step()  # a pass for these: the parked ones are not looked at
    assert all(r.state is S.ASSIGNED for r in others)
    assert not [r.name for r in waiting + [svc] if r.reason_pass == h.core._pass]
    h.register("w9")  # setup's worker joins: setup is ASSIGNED, and they are looked at again
    h.step()
    assert setup.state is S.ASSIGNED and h.core._dirty  # (in the next pass)
    h.step()
    assert {r.pending_reason for r in waiting} == {"waiting for dependency setup (ASSIGNED)"}
    assert svc.state is S.PENDING and all(r.state is S.PENDING for r in waiting)
    h.report(b"w9", setup, "AGENT_STARTED", "AGENT_READY", "AGENT_ERROR", error_message="x", traceback="")
    h.report(b"w9", setup, "AGENT_TERMINATED", ok=False)
    h.step()
    assert setup.failed and all(r.state is S.TERMINATED and r.failed for r in waiting + [svc])
    assert svc.error == "dependency setup failed"


def test_agents_registered_before_min_workers_joined_are_told_why_they_wait():
    h = Harness()
    h.core.min_workers = 2
    h.register("w1")
    records = [h.add(f"a{i}") for i in range(3)]
    h.step()
    reasons = {row[0]: row[9] for row in h.core.command(commands.Snapshot(), h.now)["agent_rows"]}
    assert set(reasons.values()) == {"waiting for min_workers=2 worker(s) to join"}
    h.register("w2")
    h.step()
    assert all(r.state is S.ASSIGNED for r in records)
    assert {row[9] for row in h.core.command(commands.Snapshot(), h.now)["agent_rows"]} == {""}


def test_agents_waiting_for_a_dependency_are_parked_while_workers_are_full_too():
    """With no room anywhere, an agent with dependencies is still looked at for them first: parked
    if one is not ready (and not looked at again while workers stay full), failed if one failed."""
    h = Harness()
    w1 = h.register("w1")
    h.core.workers["w1"].capacity = 1
    setup = h.add("setup", pin="w9")  # never placed: its worker never comes
    busy = h.add("busy")
    h.step()
    assert busy.state is S.ASSIGNED  # w1 is full
    waiting = [h.add(f"d{i:04}", depends_on=["setup"]) for i in range(500)]
    h.step()
    assert {r.pending_reason for r in waiting} == {"waiting for dependency setup (PENDING)"}
    assert all(r.parked_on == "setup" for r in waiting)
    h.add("other")
    h.step()  # another pass while w1 is full: the parked ones are not looked at
    assert not [r.name for r in waiting if r.reason_pass == h.core._pass]
    reasons = {row[0]: row[9] for row in h.core.command(commands.Snapshot(), h.now)["agent_rows"]}
    assert {reasons[r.name] for r in waiting} == {"waiting for dependency setup (PENDING)"}
    assert reasons["other"] == "every eligible worker is at capacity"
    w9 = h.register("w9")
    h.core.workers["w9"].capacity = 1
    h.step()  # setup on w9, which is full with it; they are woken and looked at again
    h.step()
    assert setup.state is S.ASSIGNED and all(r.parked_on == "setup" for r in waiting)
    assert {r.pending_reason for r in waiting} == {"waiting for dependency setup (ASSIGNED)"}
    h.report(w9, setup, "AGENT_STARTED", "AGENT_ERROR", error_message="x", traceback="")
    h.report(w9, setup, "AGENT_TERMINATED", ok=False)
    h.step()
    assert all(r.state is S.TERMINATED and r.failed for r in waiting)  # though w1 is still full


def test_agents_whose_dependencies_are_met_wait_for_room_without_being_looked_at_in_every_pass():
    """A fan-out: 20,000 agents depending on one setup agent, over two workers of capacity 20, took
    16.9 s when each was looked at in every pass once setup had finished (1.8 s now).  An agent
    whose dependencies are met but finds no room is settled: it waits with the agents of its kind
    (those that may go anywhere, or its target's group) and goes first come, first served once
    there is room, its dependencies looked at again then.  A snapshot tells it "at capacity"."""
    h = Harness()
    w1 = h.register("w1")
    h.core.workers["w1"].capacity = 2
    setup = h.add("setup")
    h.step()
    fanout = [h.add(f"f{i:04}", depends_on=["setup"]) for i in range(1000)]
    pinned = [h.add(f"p{i}", depends_on=["setup"], pin="w1") for i in range(3)]
    h.step()
    assert {r.pending_reason for r in fanout} == {"waiting for dependency setup (ASSIGNED)"}
    h.report(w1, setup, "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    h.step()  # setup's end wakes them: looked at in the next pass
    h.step()
    assert [r.name for r in fanout if r.state is S.ASSIGNED] == ["f0000", "f0001"]  # w1 is full
    assert all(r.settled for r in fanout[2:] + pinned)
    h.add("other")
    h.step()  # another pass while w1 is full: the settled ones are not looked at, but each kind's first
    assert [r.name for r in fanout + pinned if r.reason_pass == h.core._pass] == ["f0002", "p0"]
    reasons = {row[0]: row[9] for row in h.core.command(commands.Snapshot(), h.now)["agent_rows"]}
    assert {reasons[r.name] for r in fanout[2:] + pinned} == {"every eligible worker is at capacity"}
    h.report(w1, fanout[0], "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", reached="READY")
    h.step()  # room for one: the oldest goes
    assert [r.name for r in fanout if r.state is S.ASSIGNED] == ["f0001", "f0002"]


def test_a_met_dependency_that_fails_fails_its_waiting_dependents_at_once_wherever_they_wait():
    """Dependents parked on one dependency are looked at again when it, or one before it in their
    ``depends_on``, changes state; settled ones with all met, when any does.  A long-running one
    that was READY and fails fails them at once, though workers are full (woken by the one they were
    parked on only, they waited for that one to move); one that restarts makes them wait for it."""
    h = Harness()
    w1 = h.register("w1")
    h.core.workers["w1"].capacity = 2
    db = h.add("db", one_shot=False, restart="on-failure")
    cache = h.add("cache", one_shot=False)
    late = h.add("late", pin="w9")  # never placed: its worker never comes
    h.step()
    for record in (db, cache):
        h.report(w1, record, "AGENT_STARTED", "AGENT_READY")
    filler = h.add("filler")  # takes db's place on w1 when db ends: w1 stays full
    waiter = h.add("waiter")  # after it, with no room: those that may go anywhere are left out
    parked = [h.add(f"p{i}", depends_on=["cache", "late"]) for i in range(3)]
    settled = [h.add(f"s{i}", depends_on=["db"]) for i in range(3)]
    doomed = [h.add(f"d{i}", depends_on=["cache"]) for i in range(3)]
    h.step()
    assert all(r.parked_on == "late" for r in parked) and all(r.settled for r in settled + doomed)
    h.report(w1, db, "AGENT_ERROR", error_message="x", traceback="")
    h.report(w1, db, "AGENT_TERMINATED", ok=False)  # restarted after a back-off
    h.step()
    assert db.state is S.RESTARTING and filler.state is S.ASSIGNED
    assert {r.pending_reason for r in settled} == {"waiting for dependency db (RESTARTING)"}
    h.report(w1, cache, "AGENT_ERROR", error_message="x", traceback="")
    h.report(w1, cache, "AGENT_TERMINATED", ok=False)  # restart="never": for good
    h.step()
    assert all(r.state is S.TERMINATED and r.error == "dependency cache failed" for r in parked + doomed)
    assert all(r.state is S.PENDING for r in settled) and late.state is S.PENDING
    assert waiter.state is S.ASSIGNED  # cache's place on w1: the oldest that may take it


def test_a_parked_agent_is_woken_only_by_its_dependencies_up_to_the_one_it_waits_for():
    """Placement looks at an agent's dependencies in order and stops at the first not met, which it
    names: one after it changes nothing.  Woken by each of them, 5,000 agents waiting for the first
    of 200 services took 124.8 s of placement while the other 199 started (0.01 s now)."""
    h = Harness()
    w1 = h.register("w1")
    first = h.add("first", pin="w9")  # never placed until w9 joins
    later = h.add("later", one_shot=False)
    h.step()
    parked = [h.add(f"p{i:03}", depends_on=["first", "later"]) for i in range(100)]
    h.step()
    assert all(r.parked_on == "first" for r in parked)
    h.report(w1, later, "AGENT_STARTED", "AGENT_READY")
    h.add("other")
    h.step()  # a pass for "other": the parked ones were not woken by "later", and not looked at
    assert later.state is S.READY and h.core.agents["other"].state is S.ASSIGNED
    assert not [r.name for r in parked if r.reason_pass == h.core._pass]
    h.register("w9")  # "first" is placed: they are looked at again
    h.step()
    h.step()
    assert {r.pending_reason for r in parked} == {"waiting for dependency first (ASSIGNED)"}


def test_a_dependency_added_while_running_is_checked_against_what_it_reaches(monkeypatch):
    """add_dependency after start() checked the whole graph of every agent each call (1,000 calls
    among 20,000 agents: 11.7 s of the loop).  Only what the new edges reach is checked now, and a
    cycle they close, however long, or a dependency not registered, is still refused."""
    from pyorchestrate import core_commands

    sizes = []
    real = core_commands.check_graph
    monkeypatch.setattr(core_commands, "check_graph", lambda graph: (sizes.append(len(graph)), real(graph)))
    h = Harness()
    chain = [h.add("c0")] + [h.add(f"c{i}", depends_on=[f"c{i - 1}"]) for i in range(1, 50)]
    for i in range(2000):
        h.add(f"other{i}")
    sizes.clear()
    h.core.command(commands.AddDependency("other5", ["c49"]), h.now)
    assert sizes == [51]  # other5, and the chain it now waits for: not the 2,000 others
    assert h.core.agents["other5"].depends_on == ["c49"]
    with pytest.raises(ValueError, match="dependency cycle: c0 -> c49 -> c48"):
        h.core.command(commands.AddDependency("c0", ["c49"]), h.now)
    assert chain[0].depends_on == []  # refused: nothing changed
    with pytest.raises(ValueError, match="not registered: other7 -> ghost"):
        h.core.command(commands.AddDependency("other7", ["ghost"]), h.now)
