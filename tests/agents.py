"""Agents the tests run.  This module is not installed anywhere: it reaches workers by value."""

import os
import time

from pyorchestrate import BaseProcessAgent, BaseThreadAgent, LoopingProcessAgent, LoopingThreadAgent


class Quick(BaseThreadAgent):
    def execute(self):
        self.logger.info("quick ran in pid %d", os.getpid())


class QuickProcess(BaseProcessAgent):
    def execute(self):
        self.logger.info("quick process ran in pid %d", os.getpid())


class Boom(BaseThreadAgent):
    def execute(self):
        raise ValueError("boom from agent")


class BoomProcess(BaseProcessAgent):
    def execute(self):
        raise RuntimeError("process boom")


class Forever(LoopingThreadAgent):
    """Loops until stopped; records its hooks in a file so tests can see them."""

    class Config(LoopingThreadAgent.Config):
        trace = ""

    def _note(self, what):
        if self.config.trace:
            with open(self.config.trace, "a") as f:
                f.write(what + "\n")

    def setup(self):
        self._note("setup")

    def cycle(self):
        self.wait_stop(0.02)

    def on_stop(self):
        self._note("on_stop")

    def on_close(self):
        self._note("on_close")


class ForeverProcess(LoopingProcessAgent):
    """Loops until stopped, in a child process; writes its pid to ``pid_file``."""

    class Config(LoopingProcessAgent.Config):
        pid_file = ""

    def setup(self):
        if self.config.pid_file:
            with open(self.config.pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(self.config.pid_file + ".tmp", self.config.pid_file)

    def cycle(self):
        self.wait_stop(0.02)


class Sleeper(BaseThreadAgent):
    class Config(BaseThreadAgent.Config):
        seconds = 0.5

    def execute(self):
        time.sleep(self.config.seconds)


class CpuBurner(BaseThreadAgent):
    """Pure-Python CPU burn (the GIL is switched every 5 ms, so the heartbeat thread still runs)."""

    class Config(BaseThreadAgent.Config):
        seconds = 3.0

    def execute(self):
        end = time.monotonic() + self.config.seconds
        n = 0
        while time.monotonic() < end:
            n += 1


class GilHolder(BaseThreadAgent):
    """Sorts a big list: one C call that holds the GIL throughout (about a second per call here)."""

    class Config(BaseThreadAgent.Config):
        size = 3_000_000
        rounds = 2

    def execute(self):
        import random

        data = [random.random() for _ in range(self.config.size)]
        for _ in range(self.config.rounds):
            start = time.monotonic()
            sorted(data)
            self.logger.info("sorted with the GIL held for %.2f s", time.monotonic() - start)
