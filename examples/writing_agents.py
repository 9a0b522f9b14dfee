"""One agent per behaviour, all run on the embedded default:

    python examples/writing_agents.py
"""

import random
import time

from pyorchestrate import (BaseProcessAgent, ConditionalThreadAgent, DeferredThreadAgent, EventDrivenThreadAgent,
                           LoopingThreadAgent, OneShotThreadAgent, Orchestrator, PeriodicThreadAgent,
                           PoolThreadAgent, RecoveryThreadAgent, TriggeredThreadAgent)


class Hello(OneShotThreadAgent):  # execute() once
    def execute(self):
        self.logger.info("hello, once")


class Crunch(BaseProcessAgent):  # execute() once, in a child process of its worker
    def execute(self):
        self.logger.info("sum of squares: %d", sum(i * i for i in range(1_000_000)))


class Reminder(DeferredThreadAgent):  # execute() once, after Config.delay (or at Config.start_at)
    class Config(DeferredThreadAgent.Config):
        delay = 0.5

    def execute(self):
        self.logger.info("half a second after READY")


class WhenReady(ConditionalThreadAgent):  # execute() once condition() is true (or AGENT_ERROR at timeout)
    class Config(ConditionalThreadAgent.Config):
        poll_interval = 0.1
        timeout = 10

    def setup(self):
        self.polls = 0

    def condition(self):
        self.polls += 1
        return self.polls >= 3

    def execute(self):
        self.logger.info("condition met after %d polls", self.polls)


class Deploy(TriggeredThreadAgent):  # execute(payload) once, on orchestrator.trigger() or a bus event
    def execute(self, payload):
        self.logger.info("deploying version %s", payload["version"])


class Flaky(RecoveryThreadAgent):  # execute() retried with backoff; each failure is an AGENT_ERROR
    class Config(RecoveryThreadAgent.Config):
        max_retries = 3
        backoff = (0.1, 1.0, 0.1)

    def setup(self):
        self.tries = 0

    def execute(self):
        self.tries += 1
        if self.tries < 3:
            raise ConnectionError(f"try {self.tries}: service unavailable")
        self.logger.info("connected on try %d", self.tries)


class Counter(LoopingThreadAgent):  # cycle() until stopped or Config.limit cycles
    class Config(LoopingThreadAgent.Config):
        limit = 3

    def cycle(self):
        self.logger.info("cycle")
        self.wait_stop(0.1)  # sleeps, but wakes at once on stop()


class Sampler(PeriodicThreadAgent):  # runner() every Config.execution_interval seconds
    class Config(PeriodicThreadAgent.Config):
        execution_interval = 0.2
        limit = 10
        delay_compensation = True  # a fixed schedule, however long runner() takes

    def runner(self):
        self.publish("temperature", celsius=round(random.uniform(18, 24), 1))


class Dashboard(EventDrivenThreadAgent):  # on_event() for matching bus events and orchestrator.send()
    class Config(EventDrivenThreadAgent.Config):
        subscribe = ["AGENT_EVENT.temperature"]
        limit = 3

    def on_event(self, event):
        self.logger.info("%s says %s C", event.agent_name, event.data["celsius"])


class Fetcher(PoolThreadAgent):  # Periodic, with up to Config.pool_size runs at once
    class Config(PoolThreadAgent.Config):
        pool_size = 3
        execution_interval = 0.05
        limit = 6

    def runner(self):
        time.sleep(random.uniform(0.1, 0.3))
        self.logger.info("fetched")


if __name__ == "__main__":
    orchestrator = Orchestrator("examples")
    for agent in (Hello, Crunch, Reminder, WhenReady, Deploy, Flaky, Counter, Dashboard, Fetcher):
        orchestrator.register_agent(agent)
    orchestrator.register_agent(Sampler, depends_on=["Dashboard"])  # publish once Dashboard listens
    orchestrator.start()
    orchestrator.agent("Deploy").wait_ready(30)
    orchestrator.trigger("Deploy", {"version": "1.2"})
    orchestrator.join()
