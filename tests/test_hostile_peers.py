"""A real coordinator against peers that say odd things on real connections.  A worker: frames that
pass protocol.py's schema (or nearly) with made-up values, about the copies it was really given
and about others, and bus batches and beats.  A subscriber: requests for history and for ranges of
events with made-up numbers.  tests/test_core_fuzz.py does the worker's part to the pure core; this
reaches what the core does not, the coordinator's loop carrying out what the core decides
(publishing, logging, the handles, the callbacks, the bus) and its reading of frames.

What must hold: the loop never ends and no handler fails on such a frame (``handler_error``), and
once the odd peer is gone the coordinator still runs agents on a real worker and a real
subscriber hears of them.  And two that cost the coordinator without end before: a reader asking
for the longest history (the loop held half a second a request), and a client that never reads
its answers (each waited in libzmq).  Found with it: a worker's AGENT_ERROR whose ``traceback`` was not a
string ended the coordinator's loop, one frame stopping the whole cluster (protocol.ERROR_FIELDS);
a subscriber's range request from event 10**30 failed the handler packing the reply
(protocol.parse_range_request).  Seeded and bounded: a seed makes the same choices every run (what
they name, runs and times, comes from the coordinator and the clock), at most FRAMES frames (a
worker) and for at most a minute."""

from __future__ import annotations

import math
import os
import random
import time

import msgpack
import pytest
import zmq
from agents import Burst, Forever, Quick
from benchmarks.stats import rss_mb
from conftest import EventLog, start_daemon, wait_for

from pyorchestrate import ControlClient, EventSubscriber, RunMode, coordinator, protocol
from pyorchestrate.protocol import MESSAGES, ListOf, MapOf, Optional
from pyorchestrate.versions import local_versions

FRAMES = 3000
EVENTS = ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", "AGENT_ERROR", "AGENT_LOG", "NO_SUCH_EVENT"]
#: fields a worker's reports carry, and some that the coordinator adds to events (a report must
#: not set those: publisher_field_in_report)
FIELD_NAMES = [*protocol.ERROR_FIELDS, "ok", "folded", "reached", "bus_publisher", "bus_incarnation", "bus_seq",
               "messages_taken", "messages_dropped", "messages_unhandled", "worker_leaving", "not_run", "reason",
               "exitcode", "stuck", "attempt", "agent_name", "worker", "host", "epoch", "event", "seq", "publisher"]
#: what the odd worker sends, weighted: mostly reports and heartbeats, its bus (batches and beats),
#: and now and then what a worker never sends (starts, welcome: the coordinator's own types)
TYPES = (["agent_events"] * 8 + ["heartbeat"] * 3 + ["bus"] * 4 + ["register", "read", "closing", "pulse",
                                                                   "coordinator_pulse", "starts", "welcome", "beats"])
BUS_TOPICS = ["AGENT_LOG", "AGENT_EVENT", "AGENT_HEARTBEAT", "AGENT_TERMINATED", "_HISTORY", "WORKER_LOST"]


class OddWorker:
    """A raw DEALER registered as worker "odd", numbering its frames as a worker does, and the
    copies the coordinator gave it (agent, run, epoch)."""

    def __init__(self, ctx: zmq.Context, address: str, bus: str, rng: random.Random) -> None:
        self.rng = rng
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(address)
        # its bus, as a worker's: an XPUB the coordinator's XSUB subscribes to
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(bus)
        assert self.pub.poll(10_000), "the coordinator's bus never subscribed"
        self.pub.recv()
        self.n = self.wseq = 0
        self.seqs: dict[tuple[str, str], int] = {}
        self.copies: list[tuple[str, str, int]] = []
        self.welcomed = 0
        self.register()

    def register(self, **fields) -> None:
        fields = {"name": "odd", "incarnation": "odd-1", "host": "h", "pid": 1, "labels": {}, "capacity": 0,
                  "versions": local_versions(), "agents": [], "token": "odd-token", "t": time.monotonic(), **fields}
        self.dealer.send(protocol.encode("register", **fields))

    def read(self) -> None:
        while self.dealer.poll(0):
            message = protocol.decode(self.dealer.recv())
            if message["type"] == "starts":
                self.copies += [(a["agent"], a["run"], a["epoch"]) for a in message["agents"]]
            elif message["type"] == "welcome":
                self.n, self.welcomed = 0, self.welcomed + 1
            elif message["type"] == "reregister":
                self.register(events=[], n=0)

    def publish(self, values: "Values") -> None:
        """A batch of bus events, or beats, about its copies (and others), numbered as a worker
        numbers them (now and then not)."""
        rng = self.rng
        self.wseq += 1 if rng.random() < 0.95 else rng.choice([0, 2, -3])
        token = "odd-token" if rng.random() < 0.95 else "another-token"
        if rng.random() < 0.2:
            beats = [[c[0], f"{c[1]}.{c[2]}", rng.choice([0, 1, 5, 2**40])] for c in self.copies[-5:]]
            self.pub.send_multipart(protocol.encode_beats("odd", token, self.wseq, beats))
            return
        items = []
        for _ in range(rng.randint(1, 4)):
            agent, run, epoch = rng.choice(self.copies[-30:] or [("x", "x", 1)])
            key = (f"odd/{agent}" if rng.random() < 0.9 else f"another/{agent}", f"{run}.{epoch}")
            seq = self.seqs[key] = self.seqs.get(key, 0) + (1 if rng.random() < 0.9 else rng.choice([0, 3, -1]))
            event = rng.choice(BUS_TOPICS)
            body = {"event": event, "seq": seq, "publisher": key[0], "incarnation": key[1], "event_date": "d",
                    "event_time": "t", "agent_name": agent, "worker": "odd", **values.fields()}
            if rng.random() < 0.1:
                body = values.anything()
            items.append([key[0], key[1], f"{event}.{agent}", seq, msgpack.packb(body, use_bin_type=True)])
        self.pub.send_multipart(protocol.encode_batch("odd", token, self.wseq, items))

    def send(self, type_: str, fields: dict) -> None:
        if type_ != "heartbeat" and self.rng.random() < 0.97:  # (now and then a gap: frames "lost")
            self.n += 1
            fields["n"] = self.n
        self.dealer.send(protocol.encode(type_, **fields))


class Values:
    """Values for a schema's fields: what a worker would send, mostly about the copies it runs;
    now and then a value of a type no worker of ours sends.  Where the coordinator relies on the
    type (an error's text) the schema drops the frame; the rest it must take as it comes."""

    def __init__(self, rng: random.Random, worker: OddWorker) -> None:
        self.rng, self.worker = rng, worker

    def anything(self, depth: int = 0):
        rng = self.rng
        pick = rng.randrange(8 if depth < 2 else 6)
        return [lambda: rng.choice(["", "x", "READY", " ", "é" * 3, "x" * 3000]),
                lambda: rng.choice([0, 1, -1, 2**31, 2**63 - 1, -2**63]),
                lambda: rng.choice([0.5, -1.0, 1e300, math.inf, math.nan]),
                lambda: rng.random() < 0.5, lambda: None, lambda: b"\x00\xff",
                lambda: [self.anything(depth + 1) for _ in range(rng.randint(0, 3))],
                lambda: {rng.choice(FIELD_NAMES): self.anything(depth + 1) for _ in range(rng.randint(0, 3))}][pick]()

    def fields(self, event: str = "") -> dict:
        rng = self.rng
        # an error says what and where, as a worker's do
        names = ["error_message", "traceback"] if event == "AGENT_ERROR" and rng.random() < 0.8 else []
        out = {}
        for name in names + rng.sample(FIELD_NAMES, rng.randint(0, 6)):
            kind = protocol.ERROR_FIELDS.get(name)
            if kind is not None and rng.random() < 0.75:
                out[name] = rng.random() < 0.5 if kind is bool else rng.choice(["", "boom", "x" * 2000])
            else:
                out[name] = self.anything()
        return out

    def item(self, schema: dict) -> dict:
        out = {}
        if "agent" in schema and self.worker.copies and self.rng.random() < 0.8:
            agent, run, epoch = self.rng.choice(self.worker.copies[-30:])
            out = {"agent": agent, "run": run, "epoch": epoch}
        for name, kind in schema.items():
            if name not in out and not (isinstance(kind, Optional) and self.rng.random() < 0.5):
                out[name] = self.value(name, kind)
        if "fields" in out and "event" in out:
            out["fields"] = self.fields(out["event"])
        return out

    def value(self, name: str, kind):
        rng = self.rng
        if isinstance(kind, Optional):
            kind = kind.kind
        if isinstance(kind, ListOf):
            return [self.item(kind.schema) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        if isinstance(kind, MapOf):
            return {rng.choice(FIELD_NAMES): self.value("", kind.kind) for _ in range(rng.randint(0, 3))}
        if name == "fields":
            return self.fields()
        if name == "event":
            return rng.choice(EVENTS)
        if name == "leaving":  # (a worker leaving is given nothing new: now and then)
            return rng.random() < 0.02
        if name == "state":
            return rng.choice(["STARTED", "READY", "TERMINATED", "NO_SUCH_STATE"])
        if name in ("agent", "run"):
            copies = self.worker.copies
            known = [c[0 if name == "agent" else 1] for c in copies[-30:]]
            return rng.choice(known) if known and rng.random() < 0.7 else "x"
        if kind is object:
            return self.anything()
        if isinstance(kind, tuple):
            kind = rng.choice(kind)
        return {str: lambda: rng.choice(["", "x", "odd", "é", "x" * 300]),
                int: lambda: rng.choice([0, 1, -1, 2, 7, 2**31, 2**63 - 1, -2**63]),
                float: lambda: rng.choice([0.0, -1.0, 0.5, 1e300, time.monotonic()]),
                bool: lambda: rng.random() < 0.5, bytes: lambda: rng.choice([b"", b"x"]),
                dict: lambda: self.fields(), list: lambda: [self.anything() for _ in range(rng.randint(0, 2))],
                type(None): lambda: None}[kind]()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_worker_saying_odd_things_never_stops_the_coordinator(cluster, seed, caplog):
    rng = random.Random(seed)
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON, heartbeat_interval=0.2)
    events = EventLog(orch)
    orch.start()
    ctx = zmq.Context()
    try:
        odd = OddWorker(ctx, orch.address, orch.status()["addresses"]["bus"], rng)
        values = Values(rng, odd)
        for i in range(4):
            orch.register_agent(Forever, f"a{i}", restart=rng.choice(["never", "on-failure", "always"]))
        deadline = time.monotonic() + 60
        for sent in range(FRAMES):
            if time.monotonic() > deadline:
                break
            odd.read()
            type_ = rng.choice(TYPES)
            if type_ in ("bus", "beats"):
                try:
                    odd.publish(values)
                except (TypeError, ValueError):
                    pass
                continue
            fields = values.item(MESSAGES[type_])
            if type_ == "register":  # its own name and token: the coordinator takes it for the same worker
                fields.update(name="odd", incarnation="odd-1", token="odd-token", versions=local_versions())
            try:
                odd.send(type_, fields)
            except (TypeError, ValueError):  # (a value msgpack cannot pack: nothing sent)
                continue
            if rng.random() < 0.05:  # new copies for it to talk about
                orch.register_agent(Forever, f"b{sent}", restart=rng.choice(["never", "always"]))
            if sent % 100 == 0:
                time.sleep(0.02)  # (the loop reads in turns; so do workers)
                assert orch.status()["incarnation"], "the coordinator stopped answering"
        status = orch.status()
        assert odd.welcomed >= 1 and len(odd.copies) >= 4, (odd.welcomed, len(odd.copies))
        assert "handler_error" not in status["dropped"], status["dropped"]
        assert "coordinator loop crashed" not in caplog.text  # (an error: captured at pytest's level)
    finally:
        ctx.destroy(linger=0)
    # the odd worker is gone (its connection closed): a real one runs what comes next
    cluster.worker(orch.address, "w1")
    events.wait("WORKER_JOINED", "w1", timeout=30)
    orch.register_agent(Quick, "after")
    ended = events.wait("AGENT_TERMINATED", "after", timeout=30)
    assert ended[0]["ok"] is True


#: numbers a range request may hold, as text: in range, out of range, not numbers
RANGE_NUMBERS = ["0", "1", "-1", "5", str(2**63 - 1), str(2**63), str(-2**63 - 1), str(10**30), "", "1e3", "x", " 7"]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_subscriber_asking_odd_things_never_fails_a_handler(cluster, seed):
    rng = random.Random(seed)
    orch = cluster.orchestrator(run_mode=RunMode.DAEMON)
    orch.start()
    status = orch.status()
    session, address = status["incarnation"], status["addresses"]["events"]
    ctx = zmq.Context()
    try:
        odd = ctx.socket(zmq.XSUB)
        odd.setsockopt(zmq.LINGER, 0)
        odd.connect(address)
        odd.send(b"\x01_HEARTBEAT")  # connected once the coordinator's bus heartbeat comes
        assert odd.poll(10_000), "no bus heartbeat from the coordinator"
        for i in range(1000):
            roll = rng.random()
            if roll < 0.5:  # a range of this run's events (or another's), its numbers made up
                head = protocol.range_request(f"r{i}", rng.choice([session, "another-run"]), 1, 1).rsplit("\n", 2)[0]
                topic = f"{head}\n{rng.choice(RANGE_NUMBERS)}\n{rng.choice(RANGE_NUMBERS)}"
            elif roll < 0.8:
                # (within the port's limit: libzmq closes a connection that sends more, and it
                # sends the same again on connecting again, so nothing after would be read)
                topic = protocol.history_request(f"h{i}", [rng.choice(["", "AGENT", "AGENT_LOG.a0", "x" * 1000])
                                                           for _ in range(rng.randint(0, 3))])
            else:
                topic = rng.choice([protocol.RANGE_TOPIC, protocol.HISTORY_TOPIC, "AGENT", ""])
                topic += "x" * rng.randint(0, 5)
            odd.send(b"\x01" + topic.encode())
            if rng.random() < 0.3:
                odd.send(b"\x00" + topic.encode())  # and unsubscribes
            if i % 100 == 0:
                time.sleep(0.02)
                assert orch.status()["incarnation"] == session, "the coordinator stopped answering"
        time.sleep(0.5)  # (what was sent last is read)
        dropped = orch.status()["dropped"]
        # (every malformed request counted: none was lost with a connection the port closed)
        assert dropped.get("bad_frame", 0) > 100 and "handler_error" not in dropped, dropped
    finally:
        ctx.destroy(linger=0)
    # and a subscriber of ours still gets what is published
    with EventSubscriber(address, topics=["AGENT_TERMINATED"]) as sub:
        sub.wait_connected(10)
        cluster.worker(orch.address, "w1")
        orch.register_agent(Quick, "after")
        event = sub.recv(timeout=30)
        assert event is not None and event["agent_name"] == "after" and event["ok"] is True


HELD = 50_000  # events in the coordinator's history (half its default)
ASKS = 12  # history requests at once (more than coordinator._MAX_SCANS)


def test_a_reader_asking_for_the_longest_history_never_holds_the_loop(cluster):
    """A history request names up to ~2,000 prefixes, and each event held is tried against them:
    in a full history (100,000 events) one request took 0.5 s of the loop, and a reader sending
    them held every turn that long (status() waited 0.26 s in the median, the workers' echoes as
    long).  Now an answer is built a slice at a time between the loop's other work, and at most
    coordinator._MAX_SCANS wait for theirs: status() is answered while they are built, each is
    answered in full, and a request over the limit is refused, saying so."""
    orch, events = start_daemon(cluster, ("w1",))
    orch.register_agent(Burst, "burst", Burst.Config(count=HELD))
    events.wait("AGENT_TERMINATED", "burst", timeout=120)
    # every request looks at the whole history: one prefix matches one event, the burst's start
    # (old), and the rest match nothing
    prefixes = ["q"] * 2020 + ["AGENT_STARTED.burst"]
    requests = [protocol.history_request(f"{i:02}", prefixes).encode() for i in range(ASKS)]
    assert len(requests[0]) <= protocol.TOPIC_MAX
    ctx = zmq.Context()
    try:
        with ControlClient(orch.address, timeout=30.0) as client:
            wait_for(lambda: client.status()["history_held"] >= HELD, 60, "the burst in the history")
            reader = ctx.socket(zmq.XSUB)
            reader.setsockopt(zmq.LINGER, 0)
            reader.connect(orch.status()["addresses"]["events"])
            reader.send(b"\x01_HEARTBEAT")  # connected once the coordinator's bus heartbeat comes
            assert reader.poll(10_000), "no bus heartbeat from the coordinator"
            for request in requests:
                reader.send(b"\x01" + request)
            answers: dict[bytes, list] = {}
            answering = []  # history requests being answered, as each status() saw it
            deadline = time.monotonic() + 120
            while len(answers) < ASKS:
                assert time.monotonic() < deadline, f"{len(answers)} of {ASKS} requests answered"
                answering.append(client.status().get("history_answering", 0))
                while reader.poll(0):
                    frames = reader.recv_multipart()
                    if frames[0].startswith(protocol.HISTORY_TOPIC.encode()):
                        answers[frames[0]] = frames[2].decode() if len(frames) == 3 else msgpack.unpackb(frames[1])
        assert sorted(answers) == requests
        refused = {topic: why for topic, why in answers.items() if isinstance(why, str)}
        assert all([topic for topic, _ in items] == ["AGENT_STARTED.burst"]
                   for topic, items in answers.items() if topic not in refused), answers
        # (sent at once, the requests are read long before the first answer is complete: the
        # first _MAX_SCANS wait, and the rest are refused)
        assert 1 <= len(refused) <= ASKS - coordinator._MAX_SCANS, refused
        assert all("waiting for their answers already" in why for why in refused.values()), refused
        # status() was answered while answers were being built (before, only between requests),
        # and never more waited than the limit
        assert sum(1 for n in answering if n) >= ASKS and max(answering) <= coordinator._MAX_SCANS, answering
        assert not events.of("WORKER_LOST")
    finally:
        ctx.destroy(linger=0)


def test_a_client_that_never_reads_its_answers_is_not_answered_without_end(cluster):
    """A client sending requests without reading the answers had the coordinator queue every
    answer in libzmq (ZeroMQ tells nothing of what waits for one connection): history answers of
    150 KB grew the coordinator's process, the user's script, by 45 MB a second.  A request whose
    connection holds over coordinator.CLIENT_UNREAD_MAX unacknowledged bytes is now not answered,
    and counted; a client that reads each answer before asking again (ours) is always answered."""
    orch, events = start_daemon(cluster, ("w1",))
    orch.register_agent(Burst, "burst", Burst.Config(count=2_000, pad=1_000))
    events.wait("AGENT_TERMINATED", "burst", timeout=60)
    ctx = zmq.Context()
    try:
        with ControlClient(orch.address, timeout=30.0) as client:
            wait_for(lambda: client.status()["history_held"] >= 2_000, 30, "the burst in the history")
            for _ in range(20):  # answers of 2 MB, each read before the next request
                assert len(client.history(limit=10_000)) >= 2_000
            assert "client_not_reading" not in orch.status()["dropped"]
            odd = ctx.socket(zmq.DEALER)
            odd.setsockopt(zmq.LINGER, 0)
            odd.setsockopt(zmq.RCVHWM, 1)
            odd.connect(orch.address)
            before = rss_mb(os.getpid())
            for i in range(300):
                odd.send(protocol.encode("request", id=str(i), op="history", args={"limit": 10_000}))

            def handled() -> int:  # the odd client's requests answered or refused
                status = client.status()
                return status["client_requests"].get("history", 0) - 20 + status["dropped"].get("client_not_reading", 0)

            wait_for(lambda: handled() >= 300, 120, "the odd client's requests handled")
            grown = rss_mb(os.getpid()) - before
        # (without the limit all 300 were answered, and the process grew by 681 MB)
        assert grown < 200, f"the coordinator's process grew by {grown:.0f} MB"
        assert orch.status()["dropped"]["client_not_reading"] >= 250
    finally:
        ctx.destroy(linger=0)
