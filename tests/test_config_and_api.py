"""Config, registration and protocol: user mistakes raise clear errors before anything ships."""

from __future__ import annotations

import msgpack
import pytest
from agents import Quick

from pyorchestrate import (
    AddressError,
    BaseThreadAgent,
    ConfigValidationError,
    LoopingThreadAgent,
    Orchestrator,
    PeriodicProcessAgent,
    RunMode,
    ValidationResult,
    ValidationSeverity,
    protocol,
)


class MyOrchestrator(Orchestrator):
    class Config(Orchestrator.Config):  # the seed's custom config
        retry = True
        heartbeat_liveness = 7

    config: Config


def test_config_defaults_overrides_and_user_attributes():
    cfg = Orchestrator.Config()
    assert (cfg.run_mode, cfg.address, cfg.local_workers, cfg.heartbeat_interval, cfg.heartbeat_liveness) == \
        (RunMode.STOP_ON_EMPTY, None, 1, 1.0, 5)
    custom = MyOrchestrator.Config(heartbeat_interval=0.2, owner="me")
    assert custom.retry is True and custom.heartbeat_liveness == 7 and custom.heartbeat_interval == 0.2
    assert custom.owner == "me"  # unknown keywords become user-defined attributes
    assert custom.validate() == []
    assert MyOrchestrator("m").config.retry is True
    assert Orchestrator("o", heartbeat_interval=0.5).config.heartbeat_interval == 0.5
    assert Orchestrator(MyOrchestrator.Config()).name == "Orchestrator"  # config first, as some docs do


def test_agent_configs_inherit_and_override():
    class Reader(PeriodicProcessAgent):
        class Config(PeriodicProcessAgent.Config):
            execution_interval = 5.0
            path = "/tmp/x"

        def runner(self):
            pass

    cfg = Reader.Config(limit=10, output_directory="out")
    assert (cfg.execution_interval, cfg.limit, cfg.path, cfg.output_directory, cfg.delay_compensation) == \
        (5.0, 10, "/tmp/x", "out", False)
    assert Reader.Config().limit == -1


def test_typo_in_a_setting_is_a_warning_naming_the_right_one():
    findings = Orchestrator.Config(heartbeat_intervl=0.1).validate()
    assert findings[0].severity is ValidationSeverity.WARNING and "heartbeat_interval" in findings[0].message


def test_invalid_orchestrator_config_raises_at_start_with_every_finding():
    orch = Orchestrator("bad", config=Orchestrator.Config(heartbeat_interval=-1, heartbeat_liveness=1,
                                                          address="localhost:5555"))
    with pytest.raises(ConfigValidationError) as info:
        orch.start()
    text = str(info.value)
    assert "heartbeat_interval" in text and "heartbeat_liveness" in text and "tcp://HOST:PORT" in text


def test_local_workers_set_beside_an_address_are_said_to_be_ignored():
    """They were ignored without a word: the script waited for workers nobody started."""
    address = "tcp://127.0.0.1:5555"
    said = Orchestrator.Config(address=address, local_workers=2, local_worker_nice=19).check("x")
    assert sorted(r.field for r in said) == ["local_worker_nice", "local_workers"]
    assert all(r.severity is ValidationSeverity.WARNING and f"pyorchestrate-worker --coordinator {address}" in r.message
               for r in said)
    assert not Orchestrator.Config(address=address).check("x")  # the defaults, not asked for
    assert not Orchestrator.Config(local_workers=2).check("x")


def test_a_nan_setting_is_refused_like_any_bad_number():
    """NaN compares false both ways, so `value < 0` let it through: a NaN heartbeat_interval or
    stop_timeout was taken (a NaN stop timeout is over at once: the agent terminated at its stop)."""
    from pyorchestrate import ConditionalThreadAgent, DeferredThreadAgent, PeriodicThreadAgent

    nan = float("nan")
    for config, field in [(Orchestrator.Config(heartbeat_interval=nan), "heartbeat_interval"),
                          (Orchestrator.Config(stop_timeout=nan), "stop_timeout"),
                          (LoopingThreadAgent.Config(stop_timeout=nan), "stop_timeout"),
                          (PeriodicThreadAgent.Config(execution_interval=nan), "execution_interval"),
                          (DeferredThreadAgent.Config(delay=nan), "delay"),
                          (ConditionalThreadAgent.Config(poll_interval=nan), "poll_interval"),
                          (ConditionalThreadAgent.Config(timeout=nan), "timeout"),
                          # nor infinity where it goes on the wire (a frame with it is dropped)
                          (LoopingThreadAgent.Config(stop_timeout=float("inf")), "stop_timeout"),
                          (Orchestrator.Config(stop_timeout=float("inf")), "stop_timeout")]:
        with pytest.raises(ConfigValidationError, match=field):
            config.check("x")


def test_a_stop_timeout_that_validation_let_by_still_travels():
    """A Config whose policy ignores errors lets an infinite or NaN stop_timeout by; the protocol
    drops a frame carrying one, so a stop with it would never arrive. It travels as 10**9 s (or,
    NaN, the default 10 s)."""
    from pyorchestrate.config import ValidationPolicy

    class Lax(LoopingThreadAgent):
        class Config(LoopingThreadAgent.Config):
            validation_policy = ValidationPolicy(ignore_errors=True)

        def cycle(self):
            pass

    orch = Orchestrator("lax")
    for given, travels in ((float("inf"), 1e9), (float("nan"), 10.0), (3, 3.0)):
        name = orch.register_agent(Lax, f"lax{travels}", Lax.Config(stop_timeout=given))
        stop_timeout = orch._agents[name].stop_timeout
        assert stop_timeout == travels
        protocol.decode(protocol.encode("stop", n=1, agent=name, run="r", epoch=1, timeout=stop_timeout))


def test_custom_validate_hook():
    class Strict(Orchestrator.Config):
        def validate(self):
            results = super().validate()
            if self.local_workers > 4:
                results.append(ValidationResult("local_workers", "this laptop has 4 cores"))
            return results

    with pytest.raises(ConfigValidationError, match="this laptop"):
        Orchestrator("s", config=Strict(local_workers=8)).start()


def test_binding_beyond_loopback_without_keys_is_refused():
    orch = Orchestrator("open", address="tcp://0.0.0.0:*")
    with pytest.raises(AddressError, match="insecure=True"):
        orch.start()


def test_register_agent_mistakes():
    orch = Orchestrator("r")
    orch.register_agent(Quick, "q")
    with pytest.raises(ValueError, match="already registered"):
        orch.register_agent(Quick, "q")
    assert orch.register_agent(Quick) == "Quick"  # the class name by default

    class NoExecute(BaseThreadAgent):
        pass

    with pytest.raises(TypeError, match="implement execute"):
        orch.register_agent(NoExecute, "n")
    with pytest.raises(TypeError, match="not an agent class"):
        orch.register_agent(dict, "d")
    with pytest.raises(TypeError, match="Config instance"):
        orch.register_agent(Quick, "c", {"limit": 3})

    class Looper(LoopingThreadAgent):
        def cycle(self):
            pass

    with pytest.raises(ConfigValidationError, match="limit"):
        orch.register_agent(Looper, "l", Looper.Config(limit="many"))
    with pytest.raises(RuntimeError, match="start"):
        orch.join()
    for reset in (0, -1, float("inf"), "600", True):
        with pytest.raises(ValueError, match="restart_reset=.*number of seconds > 0, or None"):
            orch.register_agent(Quick, "r", restart="on-failure", restart_reset=reset)
    # each of these was accepted, and the agent waited or failed later, somewhere else
    with pytest.raises(ValueError, match="printable characters"):
        orch.register_agent(Quick, "a\x00b")  # a control character: in every log line and topic
    with pytest.raises(TypeError, match="labels= must map strings to strings"):
        orch.register_agent(Quick, "gpu", labels="gpu")  # was: "dictionary update sequence element #0"
    with pytest.raises(TypeError, match="worker= must be a worker name"):
        orch.register_agent(Quick, "pinned", worker="")  # waited for ever for worker '' to join

    class Sized(LoopingThreadAgent):
        class Config(LoopingThreadAgent.Config):
            size = 3

        def cycle(self):
            pass

    # another agent's Config, without this one's settings: AttributeError on the worker
    with pytest.raises(TypeError, match="is a LoopingAgent.Config, without Sized.Config's size: pass Sized.Config"):
        orch.register_agent(Sized, "s", Looper.Config())
    orch.register_agent(Sized, "s", Looper.Config(size=4))  # has them all: duck-typed, taken
    # a timeout of -1 stopped at once (a process agent terminated, a thread agent said stuck)
    for bad in (-1, "5", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="use a number of seconds >= 0"):
            orch.stop_agent("q", timeout=bad)
        with pytest.raises(ValueError, match="use a number of seconds >= 0"):
            orch.restart_agent("q", timeout=bad)


@pytest.mark.parametrize("args, said", [
    (["--name", ""], "a worker's name is printable characters without spaces or '/'"),  # took HOSTNAME-PID
    (["--name", "a b"], "a worker's name is printable characters without spaces or '/'"),
    # its agents' logs and events were all dropped as another worker's (publisher "rack1/w1/agent")
    (["--name", "rack1/w1"], "on the bus, '/' separates it from its agents' names"),
    (["--orphan-timeout", "-5"], "use a number of seconds >= 0"),  # stopped kept agents at once
    (["--orphan-timeout", "nan"], "use a number of seconds >= 0"),
    (["--orphan-timeout", "soon"], "is not a number of seconds"),
])
def test_worker_command_line_mistakes_are_named(capsys, args, said):
    from pyorchestrate_worker import cli

    with pytest.raises(SystemExit) as exit_:
        cli.parser().parse_args(["--coordinator", "tcp://127.0.0.1:5555", *args])
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_a_worker_connects_to_a_port_not_any_port(capsys):
    from pyorchestrate_worker import cli

    for port in ("0", "*"):  # it retried connecting to port 0 for ever
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["--coordinator", f"tcp://127.0.0.1:{port}"])
        assert "a worker connects to the port its coordinator listens on" in capsys.readouterr().err


def test_a_number_from_the_network_must_be_finite():
    """NaN compares false both ways: a NaN orphan_timeout in a register made deadlines built from
    it count as passed at once. Dropped as a bad frame, like any malformed field."""
    register = dict(n=1, name="w", incarnation="i", host="h", pid=1, labels={}, capacity=0, versions={},
                    agents=[], events=[], t=1.0, token="x")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(protocol.ProtocolError, match="not a finite number"):
            protocol.decode(protocol.encode("register", **register, orphan_timeout=bad))
        with pytest.raises(protocol.ProtocolError, match="not a finite number"):
            protocol.decode(protocol.encode("heartbeat", t=bad))
    assert protocol.decode(protocol.encode("register", **register, orphan_timeout=5.0))["orphan_timeout"] == 5.0


def test_a_payload_is_user_data_any_float_travels():
    """The finite-number rule is for settings and times: a payload of NaN is the user's to send (a
    worker dropped the frame, took it for lost, and registered again)."""
    frame = protocol.encode("deliver", n=1, agent="a", run="r", epoch=1, kind="message", payload=float("nan"))
    assert protocol.decode(frame)["payload"] != protocol.decode(frame)["payload"]  # NaN, delivered
    assert protocol.decode(protocol.encode("reply", id="1", ok=True, result=float("inf")))["result"] == float("inf")


def test_what_would_not_fit_in_a_workers_frame_is_refused_when_given():
    """An agent's start or a payload over the worker's frame limit cost the worker its connection
    (a false death, every agent on it failed): refused where the user hands it over."""
    orch = Orchestrator("big", config=Orchestrator.Config(run_mode=RunMode.DAEMON))
    too_big = bytes(protocol.MAX_AGENT_BYTES + 1)
    with pytest.raises(ValueError, match="its class and config pickle to 32.0 MiB.*pass bulky data another way"):
        orch.register_agent(Quick, "heavy", Quick.Config(blob=too_big))
    assert "heavy" not in orch.status()["agents"]
    orch.register_agent(Quick, "heavy")  # nothing of the refused one is left behind
    orch.register_agent(Quick, "fits", Quick.Config(blob=bytes(2**20)))
    for call in (orch.send, orch.trigger):
        with pytest.raises(ValueError, match="the payload packs to 32.0 MiB.*send a reference to it"):
            call("fits", too_big)


def test_protocol_round_trip_and_rejections():
    frame = protocol.encode("stop", agent="a", run="r", epoch=3, timeout=1.5)
    assert protocol.decode(frame)["epoch"] == 3
    # optional fields are declared in the schema and filled in with their defaults
    assert protocol.decode(protocol.encode("heartbeat"))["t"] == 0.0
    rejected = [
        b"\x00\x01garbage",
        msgpack.packb({"v": protocol.PROTOCOL_VERSION + 1, "type": "stop"}),
        msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "stop", "agent": "a", "run": "r", "epoch": True,
                       "timeout": 1}),
        # wrong shapes inside well-formed messages: a welcome's stop list, a register's agents
        protocol.encode("welcome", coordinator="c", session="s", heartbeat_interval=1, heartbeat_liveness=5,
                        bus_port=1, stop=[["a", 1]], warnings=[]),
        protocol.encode("register", name="w", incarnation="i", host="h", pid=1, labels={}, capacity=0,
                        versions={}, agents=[{"agent": ["unhashable"], "run": "r", "epoch": 1, "state": "READY",
                                              "coordinator": "c", "definition": "d"}], token="t"),
        protocol.encode("register", name="w", incarnation="i", host="h", pid=1, labels={"k": 1}, capacity=0,
                        versions={}, agents=[], token="t"),
        msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "stop", "agent": "a"}),
        msgpack.packb({1: 2}),
        b"x" * 100,
    ]
    for bad in rejected:
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(bad, max_size=99 if bad == b"x" * 100 else protocol.DEFAULT_MAX_MESSAGE_SIZE)
    # refused for the version and the size alone: frames that are otherwise valid (the ones above
    # also fail their schema, so they passed with either check removed)
    stop = {"type": "stop", "agent": "a", "run": "r", "epoch": 1, "timeout": 1.0}
    assert protocol.decode(msgpack.packb({"v": protocol.PROTOCOL_VERSION, **stop}))["agent"] == "a"
    with pytest.raises(protocol.ProtocolError, match="protocol version"):
        protocol.decode(msgpack.packb({"v": protocol.PROTOCOL_VERSION + 1, **stop}))
    valid = protocol.encode("stop", agent="a" * 200, run="r", epoch=1, timeout=1.0)
    assert protocol.decode(valid, max_size=len(valid))["agent"] == "a" * 200
    with pytest.raises(protocol.ProtocolError, match="exceeds the limit"):
        protocol.decode(valid, max_size=len(valid) - 1)
    with pytest.raises(protocol.ProtocolError, match="topic"):
        protocol.decode_event([b"WRONG.x", msgpack.packb({"event": "AGENT_READY", "seq": 1, "publisher": "p",
                                                          "incarnation": "i", "event_date": "d", "event_time": "t"})])


def test_a_workers_report_items_are_checked_one_by_one_quick_look_or_not():
    """agent_events items of the exact types pass a quick look; anything else gets the full
    check, which rejects what it always rejected (a bool for an int, a missing field, an item that
    is not a map) and accepts what it always accepted (extra fields, a str subclass)."""

    class Name(str):
        pass

    def events(*items):
        return msgpack.packb({"v": protocol.PROTOCOL_VERSION, "type": "agent_events", "n": 1, "events": list(items)},
                             use_bin_type=True)

    good = {"agent": "a", "run": "r", "epoch": 1, "event": "AGENT_READY", "fields": {}}
    assert protocol.decode(events(good, {**good, "extra": [1]}))["events"][1]["extra"] == [1]
    message = {"v": protocol.PROTOCOL_VERSION, "type": "agent_events", "n": 1,
               "events": [good, {**good, "agent": Name("b")}]}
    protocol.check_fields("agent_events", protocol.MESSAGES["agent_events"], message)  # as decode's second step
    for bad, why in (({**good, "epoch": True}, "epoch"), ({k: v for k, v in good.items() if k != "run"}, "run"),
                     ({**good, "fields": []}, "fields"), (["a", "r", 1], "not a map")):
        with pytest.raises(protocol.ProtocolError, match=why):
            protocol.decode(events(good, bad))


def test_start_items_pass_the_quick_look_only_as_the_full_check_would():
    """starts items (a field of two types, optional fields) take the quick look too: present
    fields of the exact types pass; a missing optional field still gets its default, and a bool
    where a number is meant, a str where bytes are, are still refused."""
    item = {"agent": "a", "run": "r", "epoch": 1, "class_id": "c", "class_blob": None, "config": b"x",
            "mode": "thread", "stop_timeout": 10, "hold": False, "keep": True, "definition": "d"}

    def starts(*items):
        return protocol.encode("starts", n=1, agents=list(items))

    got = protocol.decode(starts(item, {**item, "class_blob": b"blob", "stop_timeout": 2.5}))["agents"]
    assert got[0] == item and got[1]["class_blob"] == b"blob"
    bare = {k: v for k, v in item.items() if k not in ("stop_timeout", "hold", "keep", "definition")}
    assert protocol.decode(starts(bare))["agents"][0] == {**bare, "stop_timeout": 10.0, "hold": False,
                                                         "keep": False, "definition": ""}
    for bad, why in (({**item, "stop_timeout": True}, "stop_timeout"), ({**item, "config": "x"}, "config"),
                     ({**item, "class_blob": 1}, "class_blob"), ({**item, "hold": 0}, "hold")):
        with pytest.raises(protocol.ProtocolError, match=why):
            protocol.decode(starts(item, bad))


def test_standalone_thread_agent_runs_its_hooks():
    calls = []

    class Standalone(LoopingThreadAgent):
        class Config(LoopingThreadAgent.Config):
            limit = 3

        def setup(self):
            calls.append("setup")

        def cycle(self):
            calls.append("cycle")

        def on_close(self):
            calls.append("close")

    agent = Standalone()
    agent.start()
    assert agent.join(5)
    assert calls == ["setup", "cycle", "cycle", "cycle", "close"]


def test_typos_in_settings_are_said_not_silently_ignored(caplog):
    from pyorchestrate import PeriodicThreadAgent

    class Sampler(PeriodicThreadAgent):
        class Config(PeriodicThreadAgent.Config):
            execution_intervall = 0.1  # a near miss of one of ours
            sensor = "t1"  # a setting of the user's own: fine

        def runner(self):
            pass

    found = Sampler.Config().validate()
    assert [(r.field, "did you mean 'execution_interval'?" in r.message) for r in found] == [("execution_intervall", True)]
    orch = Orchestrator("typos", config=Orchestrator.Config(adress="tcp://127.0.0.1:1", min_worker=2, local_workers=0,
                                                            min_workers=0, run_mode=RunMode.DAEMON))
    with caplog.at_level("WARNING", logger="pyorchestrate"):
        orch.start()
        orch.stop()
    said = caplog.text
    assert "did you mean 'address'?" in said and "did you mean 'min_workers'?" in said


def test_an_unpicklable_class_level_setting_is_named_with_the_fix():
    import threading

    from pyorchestrate import ShippingError

    class Holder(BaseThreadAgent):
        class Config(BaseThreadAgent.Config):
            lock = threading.Lock()

        def execute(self):
            pass

    with pytest.raises(ShippingError, match=r"Holder.Config attribute 'lock' \(lock\) cannot be pickled. Set it on "
                                            r"the instance in setup\(\)"):
        Orchestrator("unpicklable").register_agent(Holder, "h")


def test_default_configs_are_checked_once_per_class_and_a_users_own_validate_every_time(caplog):
    """register_agent works out a default Config's findings and bytes once per class (S3 registers
    thousands of agents); an instance with settings of its own, or a Config whose validate() is
    the user's (it may read anything), is checked on every registration."""
    from pyorchestrate import PeriodicThreadAgent

    calls = []

    class Counted(BaseThreadAgent):
        class Config(BaseThreadAgent.Config):
            def validate(self):
                calls.append(1)
                return super().validate()

        def execute(self):
            pass

    class Sampler(PeriodicThreadAgent):
        class Config(PeriodicThreadAgent.Config):
            execution_intervall = 0.1  # a near miss: a warning for every agent, cached or not

        def runner(self):
            pass

    orch = Orchestrator("cache")
    for i in range(3):
        orch.register_agent(Counted, f"c{i}")
    assert len(calls) == 3
    with caplog.at_level("WARNING", logger="pyorchestrate"):
        orch.register_agent(Sampler, "s0")
        orch.register_agent(Sampler, "s1")
    assert [r.getMessage().split(" config:")[0] for r in caplog.records] == ["agent s0", "agent s1"]
    orch.register_agent(Quick, "q0")
    with pytest.raises(ConfigValidationError, match="stop_timeout"):
        orch.register_agent(Quick, "q1", Quick.Config(stop_timeout=-1))  # an instance's own setting
    records = orch._agents
    orch.register_agent(Quick, "q2", Quick.Config(stop_timeout=3))
    assert records["q0"].config_blob != records["q2"].config_blob  # its own settings travel
    assert records["s0"].config_blob == records["s1"].config_blob
    assert records["s0"].definition == records["s1"].definition


def test_a_config_blob_is_unpacked_into_a_fresh_config_every_time():
    """A worker takes a blob that sets nothing for a default Config without unpickling it again
    (shipping.unpack_config); every start still gets its own Config, and a blob that sets
    something, or carries a plugin, is unpacked as it always was."""
    from pyorchestrate import shipping

    default = shipping.pack_config(Quick.Config(), "q")
    first, plugin = shipping.unpack_config(Quick.Config, default)
    second, _ = shipping.unpack_config(Quick.Config, default)
    assert plugin is None and first is not second and vars(first) == vars(second) == {}
    first.stop_timeout = 1.0  # one agent changing its config changes nobody else's
    assert shipping.unpack_config(Quick.Config, default)[0].stop_timeout == Quick.Config.stop_timeout
    overridden = shipping.pack_config(Quick.Config(stop_timeout=3.0), "q")
    for _ in range(2):
        assert shipping.unpack_config(Quick.Config, overridden)[0].stop_timeout == 3.0
