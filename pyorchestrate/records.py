"""What the coordinator's core knows of each agent and each worker (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .flow import SendWindow
from .limits import ORPHAN_TIMEOUT
from .restart import RestartPolicy
from .states import AgentState

DISCONNECT_POLICIES = ("replace", "keep")
#: gaps in a worker's frames remembered until it registers again (see WorkerRecord.note_lost)
LOST_RANGES = 16
#: a worker process's earlier connections remembered (see WorkerRecord.read_before)
EARLIER_CONNECTIONS = 8


@dataclass(eq=False, slots=True)
class AgentRecord:
    """One registered agent.  ``state`` changes only through ``StateIndex.move``."""

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
    #: "replace": a worker cut off from its coordinator stops the agent when its lease runs out and
    #: the coordinator starts a replacement after that; "keep": the copy keeps running and is taken
    #: back when its worker (or a restarted coordinator) returns.  None: "keep" for restart="never"
    on_disconnect: str | None = None
    definition: str = ""  #: digest of class and config: a restarted coordinator adopts only identical ones
    stop_timeout: float = 10.0
    one_shot: bool = True  #: runs once (Base agents), as opposed to Looping/Periodic
    state: AgentState = AgentState.PENDING
    worker: str | None = None
    #: the current run's identity: (coordinator incarnation that started it, epoch).  Nothing that
    #: names another pair is ever taken for this run.
    run: str = ""
    epoch: int = 0
    error: str | None = None
    failed: bool = False
    started_at: float | None = None
    restarts: int = 0  #: over its life (status, metrics)
    #: restarts since the last run that lasted its policy's ``reset_after``: what max_restarts
    #: and the backoff count
    streak: int = 0
    run_since: float = 0.0  #: when its current run was placed or adopted (coordinator clock)
    pending_reason: str = ""
    reason_pass: int = 0  #: the latest placement pass that looked at it (see ClusterCore.explain_waits)
    queued: int = 0  #: its place in the line of pending agents (pending.PendingLine), while PENDING
    parked_on: str | None = None  #: the dependency it was found waiting for (pending.PendingLine.park)
    settled: bool = False  #: its dependencies were met, it found no room (pending.PendingLine.settle)
    restart_at: float = 0.0  #: RESTARTING until then (coordinator clock)
    stop_requested: bool = False  #: stopped on purpose: never restarted
    run_errored: bool = False  #: the current run reported AGENT_ERROR
    then: str | None = None  #: after this run: "move" (drain) or "restart" (restart_agent)
    #: execute() was asked for its current run (hold_after_ready): said again whenever its worker
    #: registers, since that one frame may have been lost with a reset connection
    executed: bool = False
    start_n: int = 0  #: the number of the frame that carried its start (on its worker's connection)
    disconnected_at: float = 0.0  #: when it became DISCONNECTED
    #: its state when it became DISCONNECTED: what of STARTED/READY was already said for its run
    said_before: AgentState = AgentState.PENDING
    #: READY was said for the current run (here, or by the coordinator that started an adopted copy)
    ready_said: bool = False
    ended_at: float = 0.0  #: when it last became TERMINATED for good (for forgetting)
    #: messages (send, trigger) this coordinator delivered to its current run: what its end does not
    #: say it took or dropped was lost, wherever (see Core._count_lost_messages)
    sent: int = 0

    @property
    def keeps_running(self) -> bool:
        """Does its copy keep running while its worker is cut off?"""
        if self.on_disconnect is not None:
            return self.on_disconnect == "keep"
        return self.policy.mode == "never"

    @property
    def tag(self) -> str:
        """The run's identity as one string (a bus publisher's incarnation)."""
        return f"{self.run}.{self.epoch}"


@dataclass(eq=False, slots=True)
class WorkerRecord:
    """One worker process, as known from its registration and heartbeats."""

    name: str
    identity: bytes
    incarnation: str
    host: str
    pid: int
    labels: dict[str, str]
    capacity: int
    versions: dict[str, str]
    order: int
    last_seen: float  #: its last frame (its loop spoke)
    alive: bool = True
    pulse_at: float = 0.0  #: its pulse process's last word (its process is alive and not stopped)
    busy_said: bool = False  #: "silent but its pulse goes on" was logged for this silence
    draining: bool = False
    released: bool = False  #: drained and released: its process waits for another coordinator
    leaving: bool = False  #: it shuts down (SIGTERM), stopping its copies: said in its heartbeats
    last_beat_sent: float = 0.0
    last_t: float = 0.0  #: the worker-clock stamp of its latest heartbeat (echoed back: its lease)
    disconnected_at: float | None = None  #: when its connection closed, if it has
    #: it said it is shutting down with copies that ignored their stop: they end with its process,
    #: kept ones too, so they are replaced after its lease (not kept waiting for its return)
    exiting: bool = False
    gone_at: float = 0.0  #: when it was lost or left (records are forgotten some time after)
    #: its --orphan-timeout: a copy it keeps runs at most this long without a coordinator (0: no limit)
    orphan_timeout: float = ORPHAN_TIMEOUT
    agents: set[str] = field(default_factory=set)
    #: what it dropped, by reason, as its latest heartbeat said (see Core.heartbeat)
    dropped: dict[str, int] = field(default_factory=dict)
    #: stale copies it was told to stop and that have not reported their end: (agent, run, epoch)
    stopping: set[tuple[str, str, int]] = field(default_factory=set)
    mismatches: int = 0  #: heartbeats in a row whose count of copies differed from ours
    conn: int = 0  #: which of its process's connections it speaks on
    sent_n: int = 0  #: frames sent on its connection (numbered)
    token: str = ""  #: the secret its process made at start and showed in its register
    past_identities: list[bytes] = field(default_factory=list)  #: its process's earlier connections
    recv_n: int = 0  #: the number of the last frame received from it
    #: frames of its that were lost on the way (a gap before ``recv_n``): (first, last), oldest
    #: first.  Not said read in our echoes: the worker keeps their reports, and its next register
    #: carries them again (see Registration._unread_reports)
    lost: list[tuple[int, int]] = field(default_factory=list)
    #: its process's earlier connections: conn -> the frame number up to which all it sent there
    #: has been taken (read, or taken from a register that carried it again)
    read_before: dict[int, int] = field(default_factory=dict)
    sent_classes: set[str] = field(default_factory=set)
    #: starts decided for it and not yet sent: (record, item); they leave in one frame before any
    #: other frame to it (see ClusterCore._send), so its frames keep the order they were decided in
    starting: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    starting_bytes: int = 0  #: the blobs in ``starting`` (see protocol.STARTS_FRAME_BYTES)
    #: what is in flight on its connection, and the frames waiting for room (flow.py)
    window: SendWindow = field(default_factory=SendWindow)
    unsaid: int = 0  #: bytes read from it since we last said how far we read (flow.py)

    @property
    def last_sign(self) -> float:
        """When it last gave a sign of life: its loop's frames or its pulse."""
        return max(self.last_seen, self.pulse_at)

    def note_lost(self, first: int, last: int) -> None:
        """Its frames ``first``..``last`` were lost on the way (it is asked to register again).
        At most LOST_RANGES kept: beyond, the two oldest merge (their reports may then be taken
        twice from its register, never lost; a worker whose frames keep going missing before it
        registers again is not worth more)."""
        self.lost.append((first, last))
        if len(self.lost) > LOST_RANGES:
            (a, _), (_, b) = self.lost[0], self.lost[1]
            self.lost[:2] = [(a, b)]
