"""One test agent per behaviour, in both variants.  Each writes what it did to ``Config.out``."""

import os
import time

import pyorchestrate as po


class _Notes:
    class Config:
        out = ""

    def note(self, *words):
        with open(self.config.out, "a") as f:
            f.write(" ".join(str(w) for w in (f"{time.monotonic():.4f}", *words)) + "\n")


def pair(name, mixin, family):
    """``{"thread": <name>Thread, "process": <name>Process}`` from a mixin and a behaviour family."""
    made = {}
    for mode in ("thread", "process"):
        base = getattr(po, f"{family}{mode.title()}Agent")
        config = type("Config", (base.Config,), {"out": ""})
        made[mode] = type(f"{name}{mode.title()}", (mixin, _Notes, base), {"Config": config, "__module__": __name__})
    return made


class _Once:
    def execute(self):
        self.note("ran", os.getpid())


class _Conditional:
    def condition(self):
        return os.path.exists(self.config.out + ".go")

    def execute(self):
        self.note("ran")


class _Triggered:
    def execute(self, payload):
        self.note("payload", repr(payload))


class _Flaky:
    """Fails until it has been tried ``Config.succeed_on`` times (-1: never)."""

    def execute(self):
        tries = len(open(self.config.out).read().splitlines()) + 1 if os.path.exists(self.config.out) else 1
        self.note("try", tries)
        if self.config.succeed_on < 0 or tries < self.config.succeed_on:
            raise ConnectionError(f"try {tries} failed")


class _Listener:
    def on_event(self, event):
        self.note(event.event, event.get("agent_name"), repr(event.get("payload")))


class _Slow:
    def runner(self):
        self.note("start")
        time.sleep(0.3)
        self.note("end")


class _Recovering:
    def runner(self):
        self.runs = getattr(self, "runs", 0) + 1
        self.note("run", self.runs)
        if self.runs == 2:
            raise po.RecoverableException("a bad reading")


class _Stubborn:
    """Ignores stop: its cycle never returns."""

    def cycle(self):
        self.note("stuck")
        while True:
            time.sleep(0.05)


ONESHOT = pair("OneShot", _Once, "OneShot")
DEFERRED = pair("Deferred", _Once, "Deferred")
CONDITIONAL = pair("Conditional", _Conditional, "Conditional")
TRIGGERED = pair("Triggered", _Triggered, "Triggered")
RECOVERY = pair("Recovery", _Flaky, "Recovery")
EVENTDRIVEN = pair("EventDriven", _Listener, "EventDriven")
POOL = pair("Pool", _Slow, "Pool")
PERIODIC = pair("Periodic", _Recovering, "Periodic")
STUBBORN = pair("Stubborn", _Stubborn, "Looping")
for cls in RECOVERY.values():
    cls.Config.succeed_on = 3


class _Sensor:
    """Publishes ``Config.count`` temperature readings."""

    def execute(self):
        for i in range(self.config.count):
            self.publish(self.config.topic, celsius=20 + i, sensor=self.name)
        self.logger.info("published %d readings", self.config.count)


class _Chatty:
    def execute(self):
        for i in range(self.config.lines):
            self.logger.info("line %d", i)


SENSOR = pair("Sensor", _Sensor, "OneShot")
CHATTY = pair("Chatty", _Chatty, "OneShot")
for cls in SENSOR.values():
    cls.Config.count = 5
    cls.Config.topic = "temperature"
for cls in CHATTY.values():
    cls.Config.lines = 20000


class _Worker:
    """Notes when its work runs (to see that execute_event gates it)."""

    def execute(self):
        self.note("work")


HOLDABLE = pair("Holdable", _Worker, "Base")


class _PickyConfig:
    """Valid where it was registered, an ERROR anywhere else (on a worker)."""

    def validate(self):
        results = super().validate()
        if os.getpid() != self.registered_in:
            results.append(po.ValidationResult("registered_in", "not on the machine it was registered on"))
            results.append(po.ValidationResult("other", "a second finding", po.ValidationSeverity.ERROR))
        return results


class PickyAgent(_Notes, po.BaseThreadAgent):
    class Config(_PickyConfig, po.BaseThreadAgent.Config):
        out = ""
        registered_in = 0

    def execute(self):
        self.note("ran")


class Recorder(po.PluginBase):
    """Notes its initialize/finalize in its owner's output file."""

    def __init__(self, label, fail=False):
        self.label, self.fail = label, fail

    def initialize(self):
        if self.fail:
            raise OSError(f"{self.label} cannot start")
        self.owner.note("init", self.label)

    def finalize(self):
        self.owner.note("final", self.label)


class _Hooked:
    def setup(self):
        self.note("setup")

    def execute(self):
        self.note("execute", *self.plugin.names())
        if self.config.explode:
            raise RuntimeError("execute failed")

    def on_close(self):
        self.note("on_close")


HOOKED = pair("Hooked", _Hooked, "Base")
for cls in HOOKED.values():
    cls.Config.explode = False
    cls.Plugin = type("Plugin", (po.Plugins,), {"first": Recorder("first"), "broken": Recorder("broken", fail=True),
                                                "last": Recorder("last")})


class Speaker(_Notes, po.BaseThreadAgent):
    """Publishes over ZmqPubSub and asks over ZmqReqRep; the address comes from the config."""

    class Config(po.BaseThreadAgent.Config):
        out = ""
        pub = ""
        rep = ""

    def setup(self):
        self.feed = po.ZmqPubSub(self.config.pub, role="pub")
        self.ask = po.ZmqReqRep(self.config.rep, role="req", timeout=5)
        self.feed.initialize()
        self.ask.initialize()

    def execute(self):
        for _ in range(20):  # PUB/SUB drops what is sent before the subscriber joins: repeat a while
            self.feed.send("news", {"n": 1})
            time.sleep(0.05)
        answer = self.ask.request({"question": 6 * 7}, timeout=10)
        self.note("answer", answer["answer"], answer["heard"])

    def on_close(self):
        self.feed.finalize()
        self.ask.finalize()


class Listener(_Notes, po.BaseProcessAgent):
    """Declares its plugins the documented way; answers one request, reporting the news it heard."""

    class Config(po.BaseProcessAgent.Config):
        out = ""

    def execute(self):
        heard = self.plugin.feed.recv(timeout=15)
        request = self.plugin.answers.recv(timeout=15)
        self.plugin.answers.reply({"answer": request["question"], "heard": heard[1]["n"] if heard else None})
        self.note("served")


class _Metronome:
    """Each run takes 20 ms; notes when it started."""

    def runner(self):
        self.note("tick")
        time.sleep(0.02)


METRONOME = pair("Metronome", _Metronome, "Periodic")


class _WaitsForever:
    """Waits for its stop with ``wait_stop(float("inf"))``, noting before and after."""

    def cycle(self):
        self.note("waiting")
        self.note("stopped" if self.wait_stop(float("inf")) else "woke")


WAITS_FOREVER = pair("WaitsForever", _WaitsForever, "Looping")


class _Stalling:
    """Notes each run's start; the third run takes ``Config.stall`` seconds (a long run, or a
    stalled machine)."""

    runs = 0

    def runner(self):
        self.note("tick")
        self.runs += 1
        if self.runs == 3:
            time.sleep(self.config.stall)


STALLING = {"Periodic": pair("StallingPeriodic", _Stalling, "Periodic"),
            "Pool": pair("StallingPool", _Stalling, "Pool")}
for family in STALLING.values():
    for cls in family.values():
        cls.Config.stall = 0.5
