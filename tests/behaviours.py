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
            self.publish("temperature", celsius=20 + i, sensor=self.name)
        self.logger.info("published %d readings", self.config.count)


class _Chatty:
    def execute(self):
        for i in range(self.config.lines):
            self.logger.info("line %d", i)


SENSOR = pair("Sensor", _Sensor, "OneShot")
CHATTY = pair("Chatty", _Chatty, "OneShot")
for cls in SENSOR.values():
    cls.Config.count = 5
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
