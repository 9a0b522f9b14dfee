"""The agents the scenarios run (shipped by value, like a user's own)."""

from pyorchestrate import BaseProcessAgent, BaseThreadAgent, LoopingProcessAgent, LoopingThreadAgent


class Trivial(BaseThreadAgent):
    def execute(self):
        pass


class TrivialProcess(BaseProcessAgent):
    def execute(self):
        pass


class Idle(LoopingThreadAgent):
    def cycle(self):
        self.wait_stop(1.0)


class IdleProcess(LoopingProcessAgent):
    def cycle(self):
        self.wait_stop(1.0)


class Emitter(BaseThreadAgent):
    class Config(BaseThreadAgent.Config):
        count = 100_000

    def execute(self):
        for i in range(self.config.count):
            self.publish("bench", i=i)


class Chatty(BaseThreadAgent):
    """S9: logs 10 lines and publishes 10 events, then ends."""

    def execute(self):
        for i in range(10):
            self.logger.info("line %d", i)
            self.publish("chatty", i=i)
