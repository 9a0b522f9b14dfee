"""A cluster on IPv6: the coordinator bound to an IPv6 address, workers, subscribers, agents' own
links, the control port and the CLI all on ``tcp://[::1]:PORT``, with and without keys.

libzmq's sockets are IPv4 only unless told; before, binding ``tcp://[::1]:*`` raised
``ZMQError: No such device`` and a worker given such an address never joined."""

from __future__ import annotations

import json

import zmq
from behaviours import EVENTDRIVEN, SENSOR, Listener, Speaker
from conftest import free_port, needs_ipv6, run_script, start_daemon, wait_for

import pyorchestrate as po
from pyorchestrate import sockets
from pyorchestrate.keys import KeyDir


def test_only_an_ipv6_literal_turns_ipv6_on():
    assert sockets.is_ipv6("tcp://[::1]:5555") and sockets.is_ipv6("tcp://[2001:db8::7]:*")
    assert sockets.is_ipv6("tcp://[::]:5555")
    # names and IPv4 stay on IPv4: with IPv6 on, libzmq would look "localhost" up as ::1 first
    for address in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://0.0.0.0:*", "tcp://*:5555",
                    "tcp://coordinator.example:5555", "", None):
        assert not sockets.is_ipv6(address), address
    ctx = zmq.Context()
    try:
        for address, on in (("tcp://[::1]:5555", 1), ("tcp://localhost:5555", 0)):
            sock = sockets.make_socket(ctx, zmq.DEALER, linger_ms=0)
            sockets.use_family(sock, address)
            assert sock.getsockopt(zmq.IPV6) == on
            sock.close()
    finally:
        ctx.term()


@needs_ipv6
def test_a_cluster_on_ipv6_runs_agents_their_bus_their_links_and_the_cli(cluster, tmp_path):
    orch, events = start_daemon(cluster, ("w1",), ("w2",), min_workers=2, address="tcp://[::1]:*")
    assert orch.address.startswith("tcp://[::1]:") and orch.events_address.startswith("tcp://[::1]:")
    # thread and process agents, and the bus between them (a process agent subscribes on its own)
    out = tmp_path / "heard"
    listener, sensor = EVENTDRIVEN["process"], SENSOR["thread"]
    listener_config = listener.Config(out=str(out), subscribe=["AGENT_EVENT.temperature"], limit=5)
    orch.register_agent(listener, "listener", listener_config, worker="w1")
    orch.register_agent(sensor, "sensor", sensor.Config(out=str(tmp_path / "sensor")), worker="w2",
                        depends_on=["listener"])
    assert events.wait("AGENT_TERMINATED", "listener", timeout=30)[0]["ok"] is True
    assert len(out.read_text().splitlines()) == 5
    # agents' own links (ZmqPubSub, ZmqReqRep) on IPv6 addresses, between the two workers
    pub, rep = f"tcp://[::1]:{free_port()}", f"tcp://[::1]:{free_port()}"

    class ListenerPlugins(po.Plugins):
        feed = po.ZmqPubSub(pub, role="sub", topics=["news"], bind=False)
        answers = po.ZmqReqRep(rep, role="rep")

    orch.register_agent(Listener, "server", Listener.Config(out=str(tmp_path / "server")), worker="w2",
                        custom_plugin=ListenerPlugins)
    events.wait("AGENT_READY", "server")
    orch.register_agent(Speaker, "speaker", Speaker.Config(out=str(tmp_path / "speaker"), pub=pub, rep=rep),
                        worker="w1")
    assert events.wait("AGENT_TERMINATED", "speaker", timeout=30)[0]["ok"] is True
    assert (tmp_path / "speaker").read_text().split()[1:] == ["answer", "42", "1"]
    # a subscriber from outside, the control port and the CLI
    reader = po.EventSubscriber(orch.events_address)
    try:
        assert reader.wait_connected(10)
        from agents import Quick

        orch.register_agent(Quick, "quick")
        seen: list = []
        wait_for(lambda: seen.extend(reader.drain()) or any(e.event == "AGENT_TERMINATED" and e.subject == "quick"
                                                               for e in seen), 15, "quick's end on the bus")
    finally:
        reader.close()
    with po.ControlClient(orch.address) as client:
        assert set(client.status()["workers"]["by_state"]) == {"alive"}
    ps = run_script(["-m", "pyorchestrate", "ps", "--json", "--address", orch.address], tmp_path)
    assert ps.returncode == 0, ps.stderr
    assert {row["name"]: row["state"] for row in json.loads(ps.stdout)}["quick"] == "TERMINATED"
    status = orch.status()
    assert status["pulse_running"] and set(status["workers"]) == {"w1", "w2"}
    assert all(w["alive"] for w in status["workers"].values())
    assert not status["dropped"], status["dropped"]  # nothing anybody sent was refused


@needs_ipv6
def test_a_keyed_cluster_on_ipv6_lets_key_holders_in_and_nobody_else(cluster, tmp_path):
    keydir = KeyDir(tmp_path / "keys")
    keydir.init()
    orch, events = start_daemon(cluster, ("w1", "--keys", str(keydir.path)), address="tcp://[::1]:*",
                                keys=str(keydir.path))
    from agents import Quick

    orch.register_agent(Quick, "quick")
    assert events.wait("AGENT_TERMINATED", "quick")[0]["ok"] is True
    with po.ControlClient(orch.address, keys=keydir.path) as client:
        assert client.status()["workers"]["by_state"] == {"alive": 1}
    cluster.worker(orch.address, "stranger")
    wait_for(lambda: "requires keys" in cluster.log_of("stranger"), 15, "the keyless worker to say why")
    assert set(orch.status()["workers"]) == {"w1"}
