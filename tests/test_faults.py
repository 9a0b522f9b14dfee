"""Failures with real processes and real sockets: SIGKILL, garbage on every port, refusals."""

from __future__ import annotations

import os
import signal
import socket
import time

import msgpack
import zmq
from agents import FailsEveryCycle, FailsLoudly, Forever, ForeverProcess, GilHog, Inboxed, Quick, Sleeper, StuckTalker
from conftest import DETECT, EventLog, _session_members, free_port, probe_on_w1, wait_for

from pyorchestrate import EventSubscriber, protocol, shipping
from pyorchestrate.events import stamp
from pyorchestrate.versions import local_versions
from pyorchestrate_worker import clock


def test_sigkilled_worker_is_lost_in_time_its_agents_fail_and_join_returns(cluster, tmp_path):
    orch = cluster.orchestrator(min_workers=1, **DETECT)  # 0.1 s x 5 = 0.5 s
    events = EventLog(orch)
    orch.register_agent(Forever, "doomed-thread")
    orch.register_agent(ForeverProcess, "doomed-process", ForeverProcess.Config(pid_file=str(tmp_path / "pid")))
    trace = tmp_path / "inbox"
    orch.register_agent(Inboxed, "doomed-inbox", Inboxed.Config(trace=str(trace)))
    orch.start()
    victim = cluster.worker(orch.address, "w1")
    events.wait("AGENT_READY", "doomed-thread")
    events.wait("AGENT_READY", "doomed-process")
    events.wait("AGENT_READY", "doomed-inbox")
    for i in range(3):
        orch.send("doomed-inbox", i)
    wait_for(lambda: trace.exists() and len(trace.read_text().splitlines()) == 3, 10, "the messages handled")
    cluster.worker(orch.address, "w2")
    events.wait("WORKER_JOINED", "w2")
    orch.register_agent(Sleeper, "survivor", Sleeper.Config(seconds=1.5))
    events.wait("AGENT_STARTED", "survivor")
    agent_pid = int((tmp_path / "pid").read_text())

    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    lost = events.wait("WORKER_LOST", "w1", timeout=10)[0]
    detected = time.monotonic() - killed_at
    assert detected < 0.5 + 1.5, f"lost after {detected:.2f} s, limit is interval x liveness (0.5 s) + margin"
    assert lost["worker"] == "w1" and sorted(lost["agents"]) == ["doomed-inbox", "doomed-process", "doomed-thread"]
    for agent in ("doomed-thread", "doomed-process", "doomed-inbox"):
        assert "w1" in events.wait("AGENT_ERROR", agent)[0]["error_message"]
        assert events.wait("AGENT_TERMINATED", agent)[0]["ok"] is False  # callbacks run on a pool: wait
    # what it was sent: its end could not say what it took (all 3 here), so at most all were lost
    assert events.of("AGENT_TERMINATED", "doomed-inbox")[0]["messages_unaccounted"] == 3
    assert orch.status()["dropped"].get("agent_lost_with_messages") == 3
    assert orch.join(timeout=20), "join() returns although a worker was lost"
    assert events.of("AGENT_TERMINATED", "survivor")[0]["ok"] is True
    # the orphaned process agent notices its worker is gone and exits by itself
    wait_for(lambda: not os.path.exists(f"/proc/{agent_pid}") or _zombie(agent_pid), 10, "orphaned agent to exit")
    wait_for(lambda: not _session_members(victim.pid), 10, "killed worker's session to empty")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_process_agent_is_reported_at_once_not_by_heartbeat(cluster, tmp_path):
    # a slow heartbeat: only the worker's own report can explain a quick AGENT_ERROR
    orch = cluster.orchestrator(min_workers=1, heartbeat_interval=1.0, heartbeat_liveness=30)
    events = EventLog(orch)
    orch.register_agent(ForeverProcess, "victim", ForeverProcess.Config(pid_file=str(tmp_path / "pid")))
    orch.start()
    cluster.worker(orch.address, "w1")
    events.wait("AGENT_READY", "victim")
    pid = int((tmp_path / "pid").read_text())
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    error = events.wait("AGENT_ERROR", "victim", timeout=10)[0]
    assert time.monotonic() - killed_at < 1.0
    assert "killed by signal 9" in error["error_message"]
    assert orch.join(timeout=10)
    assert not events.of("WORKER_LOST")


def _raw_tcp_garbage(address: str) -> None:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    for payload in (os.urandom(4096), b"\xff" + b"\x00" * 8 + b"\x7f" + os.urandom(54), b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(payload)
                s.settimeout(0.2)
                s.recv(1024)
            except OSError:
                pass


def test_garbage_on_every_coordinator_port_is_dropped_and_counted(cluster):
    orch = cluster.orchestrator(min_workers=1, max_message_size=4 * 1024 * 1024)
    orch.start()
    addresses = orch.status()["addresses"]
    ctx = zmq.Context()
    try:
        # control port: garbage frames from a ZeroMQ peer
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(addresses["control"])
        bad_frames = [
            os.urandom(300),
            msgpack.packb([1, 2, 3]),
            msgpack.packb({"v": 99, "type": "heartbeat"}),
            msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "no-such-type"}),
            msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "register", "name": 5}),
            msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "agent_events"}),
            msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "agent_events", "events": [{"agent": 1}]}),
        ]
        for frame in bad_frames:
            dealer.send(frame)
        dealer.send_multipart([b"a", b"b", b"c"])
        # oversized: libzmq drops the connection of whoever sends it
        big = ctx.socket(zmq.DEALER)
        big.connect(addresses["control"])
        big.send(b"x" * (5 * 1024 * 1024))
        # bus input: garbage published into the XSUB (wait for its subscription first)
        pub = ctx.socket(zmq.XPUB)
        pub.connect(addresses["bus"])
        assert pub.poll(5000), "coordinator's XSUB never subscribed"
        pub.recv()
        pub.send_multipart([b"AGENT_READY.x", os.urandom(64)])
        pub.send_multipart([b"AGENT_READY.x", msgpack.packb({"event": "AGENT_READY"})])
        pub.send(b"one frame only")
        # events port: a "subscriber" that sends things that are not subscriptions
        xsub = ctx.socket(zmq.XSUB)
        xsub.connect(addresses["events"])
        time.sleep(0.1)
        xsub.send(b"\x07not a subscription")
        # raw TCP garbage on all three ports
        for address in addresses.values():
            _raw_tcp_garbage(address)
        wait_for(lambda: sum(orch.status()["dropped"].values()) >= len(bad_frames) + 1 + 3 + 1, 10,
                 "garbage to be counted")
    finally:
        ctx.destroy(linger=0)
    # and the coordinator still serves
    events = EventLog(orch)
    cluster.worker(orch.address, "w1")
    orch.register_agent(Quick, "still-works")
    assert orch.join(timeout=30)
    assert events.of("AGENT_TERMINATED", "still-works")[0]["ok"] is True


def test_incompatible_worker_is_refused_with_both_versions(cluster):
    orch = cluster.orchestrator(min_workers=1)
    orch.start()
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(orch.address)
        versions = {**local_versions(), "python": "2.7.18"}
        dealer.send(protocol.encode("register", name="old", incarnation="x", host="h", pid=1, labels={},
                                    capacity=0, versions=versions, agents=[], token="t"))
        assert dealer.poll(5000)
        reply = protocol.decode(dealer.recv())
        assert reply["type"] == "refused"
        assert "2.7.18" in reply["reason"] and local_versions()["python"] in reply["reason"]
        # an older protocol is refused too, with a message rather than silence
        dealer.send(msgpack.packb({"v": 0, "type": "register", "name": "ancient"}))
        assert dealer.poll(5000)
        reply = protocol.decode(dealer.recv())
        assert reply["type"] == "refused" and "protocol version" in reply["reason"]
    finally:
        ctx.destroy(linger=0)
    assert "old" not in orch.status()["workers"]


def _fake_coordinator(cluster, ctx: zmq.Context) -> tuple:
    """A raw ROUTER (and bus XSUB) speaking our protocol by hand, and worker "w1" connected to it:
    (worker process, router, bus port, the worker's identity, its register)."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    bus = ctx.socket(zmq.XSUB)
    bus_port = bus.bind_to_random_port("tcp://127.0.0.1")
    worker = cluster.worker(f"tcp://127.0.0.1:{port}", "w1")
    assert router.poll(15000), "the worker never registered"
    identity, frame = router.recv_multipart()
    register = protocol.decode(frame)
    assert register["type"] == "register"
    return worker, router, bus_port, identity, register


def _numbered(router: zmq.Socket, identity: bytes):
    """send(type, **fields) to the worker at ``identity``, numbering the frames as a coordinator does."""
    sent = [0]

    def send(type_: str, **fields) -> None:
        sent[0] += 1
        router.send_multipart([identity, protocol.encode(type_, n=sent[0], **fields)])

    return send


def _welcomed(cluster, ctx: zmq.Context, interval: float, liveness: int) -> tuple:
    """Worker "w1" welcomed by a fake coordinator (heartbeat ``interval`` x ``liveness``), which
    renews its lease only if the test answers: (worker process, router, send)."""
    worker, router, bus_port, identity, register = _fake_coordinator(cluster, ctx)
    send = _numbered(router, identity)
    send("welcome", coordinator="fake", session="s", heartbeat_interval=interval, heartbeat_liveness=liveness,
         bus_port=bus_port, stop=[], warnings=[], echo=register["t"])
    return worker, router, send


def _registers(router: zmq.Socket, seconds: float, wanted=lambda message: True) -> list[tuple[int, dict]]:
    """The next two registers the worker sends (``wanted`` ones), as (frame size, message)."""
    registers: list[tuple[int, dict]] = []
    deadline = time.monotonic() + seconds
    while len(registers) < 2 and time.monotonic() < deadline:
        if router.poll(100):
            frame = router.recv_multipart()[-1]
            message = protocol.decode(frame)
            if message["type"] == "register" and wanted(message):
                registers.append((len(frame), message))
    return registers


def _start(send, agent: str, cls: type, config, **item) -> None:
    """Start ``agent`` (a thread agent of class ``cls``) as run "s", epoch 1 (``item``: more fields)."""
    class_id, blob = shipping.pack_class(cls, cls.Config)
    send("starts", agents=[dict(agent=agent, run="s", epoch=1, class_id=class_id, class_blob=blob,
                                config=shipping.pack_config(config, agent), mode="thread", **item)])


def test_worker_survives_garbage_from_its_coordinator_and_keeps_serving(cluster):
    """A fake coordinator (a raw ROUTER speaking our protocol by hand) sends the worker garbage,
    then real work."""
    ctx = zmq.Context()
    try:
        worker, router, bus_port, identity, register = _fake_coordinator(cluster, ctx)
        for garbage in (os.urandom(100), msgpack.packb("hi"), msgpack.packb({"v": 5, "type": "starts"}),
                        msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "starts", "agents": [{"agent": 1}]}),
                        # well-formed messages with wrong shapes inside (a worker once died of this one)
                        protocol.encode("welcome", coordinator="fake", session="s", heartbeat_interval=0.2,
                                        heartbeat_liveness=50, bus_port=bus_port, stop=[["q", 1]], warnings=[]),
                        protocol.encode("stop", agent="q", run=["x"], epoch=1, timeout=0)):
            router.send_multipart([identity, garbage])
        welcome = protocol.encode("welcome", coordinator="fake", session="s", heartbeat_interval=0.2,
                                  heartbeat_liveness=50, bus_port=bus_port, stop=[], warnings=[], echo=register["t"])
        router.send_multipart([identity, welcome])
        class_id, blob = shipping.pack_class(Quick, Quick.Config)
        router.send_multipart([identity, protocol.encode("starts", agents=[dict(
            agent="q", run="s", epoch=1, class_id=class_id, class_blob=blob,
            config=shipping.pack_config(Quick.Config(), "q"), mode="thread")])])
        seen = []
        deadline = time.monotonic() + 15
        while "AGENT_TERMINATED" not in seen and time.monotonic() < deadline:
            if router.poll(200):
                ident, frame = router.recv_multipart()
                message = protocol.decode(frame)
                if message["type"] == "agent_events":
                    for item in message["events"]:
                        if item["fields"].get("folded"):  # one report: its end says it all (protocol 9)
                            assert item["event"] == "AGENT_TERMINATED" and item["fields"]["reached"] == "READY"
                            seen.extend(["AGENT_STARTED", "AGENT_READY"])
                        seen.append(item["event"])
        assert seen == ["AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"]
        assert worker.poll() is None
        wait_for(lambda: "dropped a bad_frame frame" in cluster.log_of("w1"), 10, "the worker to say so")  # its log thread
    finally:
        ctx.destroy(linger=0)


def test_worker_reregisters_after_its_coordinator_is_sigkilled(cluster, tmp_path):
    port = str(free_port())
    script = tmp_path / "coordinator.py"
    script.write_text(
        "from pyorchestrate import Orchestrator, RunMode\n"
        f"o = Orchestrator('doomed', address='tcp://127.0.0.1:{port}', run_mode=RunMode.DAEMON,\n"
        "                 heartbeat_interval=0.1, heartbeat_liveness=5)\n"
        "o.start()\n"
        "import time; time.sleep(60)\n")
    import subprocess
    import sys
    doomed = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        cluster.worker(f"tcp://127.0.0.1:{port}", "w1")
        wait_for(lambda: "registered with coordinator doomed" in cluster.log_of("w1"), 15, "first registration")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(5)
        doomed.stderr.close()
    successor = cluster.orchestrator("successor", address=f"tcp://127.0.0.1:{port}", min_workers=1)
    events = EventLog(successor)
    successor.register_agent(Quick, "q")
    successor.start()
    assert successor.join(timeout=30)
    assert events.of("AGENT_TERMINATED", "q")[0]["worker"] == "w1"


def test_unpicklable_config_value_is_refused_at_register(cluster):
    import threading

    import pytest

    from pyorchestrate import ShippingError

    orch = cluster.orchestrator()
    with pytest.raises(ShippingError, match="config attribute 'lock'"):
        orch.register_agent(Quick, "q", Quick.Config(lock=threading.Lock()))
    assert "q" not in orch.status()["agents"]


def test_sigkilled_worker_is_noticed_by_its_closed_connection_not_heartbeats(cluster):
    # default heartbeats (1 s x 5): only the closed connection can explain detection well before 5 s
    orch = cluster.orchestrator(min_workers=1, heartbeat_interval=1.0, heartbeat_liveness=5)
    events = EventLog(orch)
    orch.start()
    victim = cluster.worker(orch.address, "w1")
    events.wait("WORKER_JOINED", "w1")
    time.sleep(0.5)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    lost = events.wait("WORKER_LOST", "w1", timeout=10)[0]
    took = time.monotonic() - killed_at
    assert "connection closed" in lost["reason"]
    assert took < 2.5, f"{took:.2f} s: within one heartbeat interval of grace, far below the 5 s window"


def test_a_garbled_event_inside_a_batch_is_dropped_by_subscribers_and_spoils_nothing_else(cluster):
    # the coordinator forwards batched event bodies unparsed: their checking is the subscribers' job
    orch, events = probe_on_w1(cluster)
    info = orch.status()["agents"]["probe"]
    fake, run = "w1/probe", f"{info['run']}.{info['epoch']}"  # posing as the agent's current run
    addresses = orch.status()["addresses"]
    ctx = zmq.Context()
    try:
        with EventSubscriber(addresses["events"], topics=["AGENT_EVENT.probe"]) as sub:
            assert sub.wait_connected(10)
            pub = ctx.socket(zmq.XPUB)
            pub.connect(addresses["bus"])
            assert pub.poll(5000), "coordinator's XSUB never subscribed"
            pub.recv()

            def body(seq: int) -> bytes:
                return msgpack.packb({"event": "AGENT_EVENT", "seq": seq, "publisher": fake, "incarnation": run,
                                      "topic": "probe", "data": {"n": seq}, **stamp()})

            bad_envelopes = [[protocol.BATCH_TOPIC, msgpack.packb([1, 2, 3])],
                             [protocol.BATCH_TOPIC, msgpack.packb(["w1", "i", 1, [[fake, run, "AGENT_EVENT.probe", True, b""]]])],
                             [protocol.BATCH_TOPIC, msgpack.packb(["w1", "i", 1, [[fake, run, "_HISTORY.x", 1, b""]]])],
                             [protocol.BEATS_TOPIC, msgpack.packb(["w1", "i", 1, [["probe", run, "x"]]])],
                             [b"_UNKNOWN", b""]]
            for frames in bad_envelopes:
                pub.send_multipart(frames)
            token = orch._coordinator.core.workers["w1"].token  # posing as the worker itself (white box)
            pub.send_multipart(protocol.encode_batch("w1", token, 2, [
                (fake, run, "AGENT_EVENT.probe", 1, body(1)), (fake, run, "AGENT_EVENT.probe", 2, os.urandom(40)),
                (fake, run, "AGENT_EVENT.probe", 3, body(3))]))
            got = [sub.recv(timeout=10), sub.recv(timeout=10)]
            assert [e["data"]["n"] for e in got] == [1, 3]
            assert sub.dropped == 1
            wait_for(lambda: orch.status()["dropped"].get("bad_frame", 0) >= len(bad_envelopes), 10,
                     "bad batch envelopes to be counted")
    finally:
        ctx.destroy(linger=0)
        orch.stop(timeout=5)


def test_a_start_read_after_the_lease_ran_out_is_not_acted_on(cluster):
    """A worker's loop starved past its lease (here an agent holds the GIL for seconds) finds a
    start its coordinator sent meanwhile: by then the coordinator may have taken the worker for
    lost and started that agent elsewhere.  It must not start it, and registers again without it
    (a fake coordinator: a raw ROUTER speaking our protocol by hand).  Here the loop's look at its
    lease at the top of the turn after the stall is what stops it; a start read within the turn
    the stall held up is the next test's (that window cannot be timed from outside)."""
    ctx = zmq.Context()
    try:
        _, router, bus_port, identity, register = _fake_coordinator(cluster, ctx)
        send = _numbered(router, identity)

        def start(agent: str, cls: type) -> None:
            _start(send, agent, cls, cls.Config())

        # a lease of 2 s, renewed while its heartbeats are answered
        send("welcome", coordinator="fake", session="s", heartbeat_interval=0.2, heartbeat_liveness=10,
             bus_port=bus_port, stop=[], warnings=[], echo=register["t"])
        start("hog", GilHog)
        reports: list[tuple[str, str]] = []
        registers: list[dict] = []
        answering, late_at = True, None
        deadline = time.monotonic() + 30
        while not registers and time.monotonic() < deadline:
            if late_at is not None and time.monotonic() >= late_at:
                late_at = -1.0
                start("late", Quick)  # while the hog holds the GIL, after the lease ran out
            if not router.poll(20):
                continue
            message = protocol.decode(router.recv_multipart()[-1])
            if message["type"] == "heartbeat" and answering:
                send("heartbeat_reply", echo=message["t"])
            elif message["type"] == "agent_events":
                reports.extend((item["agent"], item["event"]) for item in message["events"])
                if answering and ("hog", "AGENT_STARTED") in reports:
                    # silent from here on: its lease runs out 2 s after its last answered heartbeat,
                    # while the hog (from 0.3 s on) holds the GIL for 3 s or more
                    answering, late_at = False, time.monotonic() + 2.3
            elif message["type"] == "register":
                registers.append(message)
        assert late_at == -1.0, f"the hog never started: {reports}"
        assert registers, "the worker did not register again after its lease ran out"
        assert [event for agent, event in reports if agent == "late"] == [], reports
        assert [a["agent"] for a in registers[0]["agents"]] in ([], ["hog"])
    finally:
        ctx.destroy(linger=0)


def _still_running(pid: int) -> bool:
    """Is process ``pid`` running (not gone, not a zombie waiting to be reaped)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_a_worker_says_goodbye_only_once_none_of_its_agents_runs(cluster):
    """"goodbye" tells the coordinator the worker's agents are gone, and it replaces them at once.
    A stopped worker (SIGTERM) whose thread agent ignores its stop runs it for as long as its
    process lives: it must leave without a goodbye (it says "closing": judge it by its silence,
    and so by its lease). Before, the goodbye came while its process, and so that agent, still ran."""
    ctx = zmq.Context()
    try:
        worker, router, send = _welcomed(cluster, ctx, 0.2, 50)
        _start(send, "t", StuckTalker, StuckTalker.Config(trace=os.devnull, stop_timeout=0.3))  # never stops
        last, alive = None, None
        deadline = time.monotonic() + 30
        while last is None and time.monotonic() < deadline:
            if not router.poll(50):
                continue
            message = protocol.decode(router.recv_multipart()[-1])
            if message["type"] == "heartbeat":
                send("heartbeat_reply", echo=message["t"])
            elif message["type"] == "agent_events" and any(i["event"] == "AGENT_READY" for i in message["events"]):
                worker.send_signal(signal.SIGTERM)
            elif message["type"] in ("goodbye", "closing"):
                last, alive = message["type"], _still_running(worker.pid)
        assert last is not None, "the worker never left"
        assert last == "closing" or not alive, "goodbye while the stuck agent's process still ran"
        assert worker.wait(15) == 0
    finally:
        ctx.destroy(linger=0)


def _kept_past_its_lease(cluster, ctx: zmq.Context, agent: str, cls: type) -> tuple:
    """A fake coordinator welcomes w1 with a 0.5 s lease it never renews, and starts ``agent``
    (kept while w1 has no coordinator): (the worker process, the router)."""
    worker, router, send = _welcomed(cluster, ctx, 0.1, 5)
    _start(send, agent, cls, cls.Config(), keep=True)
    return worker, router


def test_reports_kept_while_no_coordinator_listens_stay_bounded(cluster):
    """A kept agent failing (recoverably) every cycle while its worker has no coordinator: each
    registration carried every report since, 2.7 MB more a second (23,435 reports 3.4 s in),
    until one would exceed the coordinator's max_message_size and the worker could never register
    again. Now a copy's recoverable errors beyond the first 10 are dropped and counted."""
    ctx = zmq.Context()
    try:
        worker, router = _kept_past_its_lease(cluster, ctx, "f", FailsEveryCycle)
        registers = _registers(router, 30)
        assert len(registers) == 2, "the worker did not register again"
        for size, message in registers:
            assert [a["agent"] for a in message["agents"]] == ["f"]  # kept: it runs on
            errors = [e for e in message["events"] if e["event"] == "AGENT_ERROR"]
            assert len(errors) <= 10 and size < 100_000, (len(errors), size)
        wait_for(lambda: "recoverable_error_while_offline" in cluster.log_of("w1"), 10, "the drops counted")
    finally:
        ctx.destroy(linger=0)


def test_a_register_fits_in_a_frame_however_long_the_errors_kept_meanwhile(cluster):
    """30 kept agents failing with long tracebacks while no coordinator listens: 10 errors each
    kept, each up to 80 KB, made a register of 24 MB, over the smallest max_message_size (4 MiB):
    refused at every try, the worker could never register again.  Its error text is now cut to a
    budget; every error is still told."""
    ctx = zmq.Context()
    try:
        worker, router, send = _welcomed(cluster, ctx, 0.1, 5)
        class_id, blob = shipping.pack_class(FailsLoudly, FailsLoudly.Config)
        config = shipping.pack_config(FailsLoudly.Config(), "f")
        send("starts", agents=[dict(agent=f"f{i}", run="s", epoch=1, class_id=class_id, class_blob=blob,
                                    config=config, mode="thread", keep=True) for i in range(30)])
        # with all 30 copies, most of which have failed 10 times by now
        registers = _registers(router, 60, lambda message: len(message["agents"]) == 30 and sum(
            e["event"] == "AGENT_ERROR" for e in message["events"]) >= 200)
        assert len(registers) == 2, "the worker did not register again with its errors"
        for size, message in registers:
            assert size < 2 * 2**20, size  # well under the smallest max_message_size
            errors = [e for e in message["events"] if e["event"] == "AGENT_ERROR"]
            assert all("RecoverableException: yyy" in e["fields"]["error_message"] for e in errors)
            assert all("characters cut" in e["fields"]["traceback"] for e in errors)
    finally:
        ctx.destroy(linger=0)


def _until_k_ends(router: zmq.Socket, answer) -> tuple[int, list]:
    """Read the worker's registers until one tells that kept copy "k" ended, calling
    ``answer(identity, register)`` for each before it: (how many it answered, those ends)."""
    answered, ends = 0, []
    deadline = time.monotonic() + 30
    while not ends and time.monotonic() < deadline:
        if not router.poll(100):
            continue
        ident, frame = router.recv_multipart()
        message = protocol.decode(frame)
        if message["type"] != "register":
            continue
        ends = [e for e in message["events"] if e["event"] == "AGENT_TERMINATED" and e["agent"] == "k"]
        if not ends:
            assert [a["agent"] for a in message["agents"]] == ["k"]  # kept: it runs on
            answered += answer(ident, message)
    return answered, ends


def test_a_worker_refused_for_its_name_stops_the_copies_it_is_told_to(cluster):
    """Refused because another process holds its name, a worker stops the copies the refusal lists
    (its kept agent would otherwise run on until its orphan timeout, no coordinator managing it),
    and tells their end in its next register (a fake coordinator)."""
    ctx = zmq.Context()
    try:
        worker, router = _kept_past_its_lease(cluster, ctx, "k", Forever)

        def refuse(ident: bytes, message: dict) -> int:
            router.send_multipart([ident, protocol.encode(
                "refused", reason="a live worker named 'w1' is already registered", retry=True,
                stop=[{"agent": "k", "run": "s", "epoch": 1, "timeout": 1.0}])])
            return 1

        refused, ends = _until_k_ends(router, refuse)
        assert refused and ends, "the refused worker never stopped its copy"
        assert worker.poll() is None
    finally:
        ctx.destroy(linger=0)


def test_a_stop_sent_before_the_welcome_is_acted_on(cluster):
    """A coordinator says a stop again, before its welcome, for a copy a worker registering on a new
    connection lists (registration.py: its stop may have been lost).  The worker dropped every
    frame that came before its welcome, and that kept copy ran on (a fake coordinator)."""
    ctx = zmq.Context()
    try:
        worker, router = _kept_past_its_lease(cluster, ctx, "k", Forever)
        told = []

        def stop_then_welcome(ident: bytes, message: dict) -> int:
            if told:
                return 0  # (once: the registers after it come as the lease runs out again)
            told.append(ident)
            send = _numbered(router, ident)  # (a new connection numbers from 1)
            send("stop", agent="k", run="s", epoch=1, timeout=1.0)
            send("welcome", coordinator="fake", session="s", heartbeat_interval=0.1, heartbeat_liveness=5,
                 bus_port=1, stop=[], warnings=[], echo=message["t"])
            return 1

        answered, ends = _until_k_ends(router, stop_then_welcome)
        assert answered and ends, "the stop before the welcome was never acted on: the kept copy ran on"
    finally:
        ctx.destroy(linger=0)


def test_a_worker_drops_a_start_it_acts_on_after_its_lease_ran_out():
    """The window the test above cannot time from outside: the loop looked at its lease at the top
    of its turn, was starved, and acts on a start read after the lease ran out.  ``_start`` reads
    the clock itself (a real Worker object, not serving: no socket is open)."""
    from pyorchestrate.limits import Limits
    from pyorchestrate_worker.node import Worker

    worker = Worker("tcp://127.0.0.1:9", name="w1")
    try:
        class_id, blob = shipping.pack_class(Quick, Quick.Config)
        frame = protocol.encode("starts", agents=[dict(agent="late", run="s", epoch=1, class_id=class_id, class_blob=blob,
                                                       config=shipping.pack_config(Quick.Config(), "late"), mode="thread")])
        item = protocol.decode(frame)["agents"][0]
        worker._limits = Limits(0.2, 5)
        worker._lease_from = clock.now() - 1.5  # its last proven round trip: 1.5 s ago, lease 1 s
        assert not worker._lease_expired  # the loop has not looked since
        worker._start(item)
        assert worker._supervisor.size() == 0 and worker.dropped.counts["start_after_lease"] == 1
        worker._lease_from = clock.now()  # within its lease the same start runs
        worker._start(item)
        assert worker._supervisor.size() == 1
    finally:
        worker._supervisor.close()
        worker._outbox.close()
        worker._bus_signal.close()
        worker._ctx.term()


def test_a_restarted_coordinator_welcoming_on_the_same_connection_costs_no_second_registration(cluster):
    """A coordinator restarted at the same address asks the workers still connected to it to
    register again, and welcomes them on the same connection, its frames numbered from 1 anew:
    the worker must take that for the new coordinator's numbering, not for frames lost on the way
    (which would make it register once more, on a new connection, with every copy it runs)."""
    ctx = zmq.Context()
    try:
        _, router, bus_port, identity, register = _fake_coordinator(cluster, ctx)
        welcome = dict(coordinator="fake", heartbeat_interval=0.2, heartbeat_liveness=25, bus_port=bus_port,
                       stop=[], warnings=[])
        router.send_multipart([identity, protocol.encode("welcome", n=1, session="first", echo=register["t"], **welcome)])
        sent, registers, beats = 1, [], 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(registers) < 1 or beats < 8):
            if not router.poll(100):
                continue
            ident, frame = router.recv_multipart()
            message = protocol.decode(frame)
            if message["type"] == "heartbeat" and not registers:
                sent += 1  # the first coordinator's replies: its numbering goes on
                router.send_multipart([ident, protocol.encode("heartbeat_reply", n=sent, echo=message["t"])])
                if sent == 5:  # it "restarts": unnumbered, as a stranger's heartbeat is answered
                    router.send_multipart([ident, protocol.encode("reregister")])
            elif message["type"] == "register":
                registers.append((ident, message))
                if len(registers) == 1:  # the new coordinator welcomes it where it asked: numbered from 1
                    router.send_multipart([ident, protocol.encode("welcome", n=1, session="second", echo=message["t"],
                                                                  **welcome)])
            elif message["type"] == "heartbeat" and ident == identity:
                beats += 1
                router.send_multipart([ident, protocol.encode("heartbeat_reply", n=1 + beats, echo=message["t"])])
        assert registers and registers[0][0] == identity, "it did not register again on the same connection"
        assert len(registers) == 1, f"it registered {len(registers)} times (on {[r[0] for r in registers]})"
        assert beats >= 8 and "were lost" not in cluster.log_of("w1")
    finally:
        ctx.destroy(linger=0)


def test_what_an_agent_reports_while_its_worker_has_no_coordinator_comes_with_the_next_register(cluster):
    """An agent that ends while its worker has lost its coordinator (the lease ran out, no welcome
    yet): its end is kept and carried by the worker's next register, so the coordinator that
    welcomes it learns how the run ended instead of taking the copy for lost."""
    ctx = zmq.Context()
    try:
        _, router, bus_port, identity, register = _fake_coordinator(cluster, ctx)
        sent = [0]

        def send(ident: bytes, type_: str, **fields) -> None:
            sent[0] += 1
            router.send_multipart([ident, protocol.encode(type_, n=sent[0], **fields)])

        # a lease of 0.6 s; the agent sleeps 4 s, so it ends long after the worker lost us (even
        # on a loaded machine, where the worker's loop may notice the lease late)
        send(identity, "welcome", coordinator="fake", session="s", heartbeat_interval=0.2, heartbeat_liveness=3,
             bus_port=bus_port, stop=[], warnings=[], echo=register["t"])
        class_id, blob = shipping.pack_class(Sleeper, Sleeper.Config)
        send(identity, "starts", agents=[dict(agent="nap", run="s", epoch=1, class_id=class_id, class_blob=blob,
                                              config=shipping.pack_config(Sleeper.Config(seconds=4.0), "nap"),
                                              mode="thread", keep=True)])
        answering, carried = True, None
        deadline = time.monotonic() + 30
        while carried is None and time.monotonic() < deadline:
            if not router.poll(100):
                continue
            ident, frame = router.recv_multipart()
            message = protocol.decode(frame)
            if message["type"] == "heartbeat" and answering:
                send(ident, "heartbeat_reply", echo=message["t"])
            elif message["type"] == "agent_events":
                answering = False  # its STARTED came: silent from here on, and no welcome
                assert "AGENT_TERMINATED" not in [item["event"] for item in message["events"]]
            elif message["type"] == "register" and not answering:
                ends = [item for item in message["events"] if item["agent"] == "nap" and item["event"] == "AGENT_TERMINATED"]
                if ends:
                    carried = ends[0]
        assert carried is not None, "no register carried the end of the run that finished offline"
        assert (carried["run"], carried["epoch"]) == ("s", 1)
    finally:
        ctx.destroy(linger=0)
