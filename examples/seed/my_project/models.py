"""The seed's agents. This package is NOT installed on the workers: the orchestrator ships it."""

import os
import socket

from pyorchestrate import LoopingProcessAgent, PeriodicThreadAgent


class Publisher(PeriodicThreadAgent):
    """Publishes a reading every half second, five times (a thread in its worker)."""

    class Config(PeriodicThreadAgent.Config):
        execution_interval = 0.5
        limit = 5

    config: Config

    def setup(self):
        self.count = 0

    def runner(self):
        self.count += 1
        self.logger.info("reading %d from %s (pid %d)", self.count, socket.gethostname(), os.getpid())

    def on_close(self):
        self.logger.info("published %d readings", self.count)


class Subscriber(LoopingProcessAgent):
    """Processes three batches (a child process of its worker)."""

    class Config(LoopingProcessAgent.Config):
        limit = 3

    config: Config

    def cycle(self):
        self.logger.info("processing a batch in pid %d", os.getpid())
        self.wait_stop(0.3)
