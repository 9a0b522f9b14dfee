"""The agent family: each behaviour in a Thread and a Process variant."""

from .base import SUCCESS, BaseAgent
from .looping import LoopingAgent, PeriodicAgent
from .modes import ProcessMode, ThreadMode


class BaseThreadAgent(ThreadMode, BaseAgent):
    """Runs ``execute()`` once, in a thread of its worker."""


class BaseProcessAgent(ProcessMode, BaseAgent):
    """Runs ``execute()`` once, in a child process of its worker."""


class LoopingThreadAgent(ThreadMode, LoopingAgent):
    """Calls ``cycle()`` until stopped or ``Config.limit`` cycles, in a thread."""


class LoopingProcessAgent(ProcessMode, LoopingAgent):
    """Calls ``cycle()`` until stopped or ``Config.limit`` cycles, in a child process."""


class PeriodicThreadAgent(ThreadMode, PeriodicAgent):
    """Calls ``runner()`` every ``Config.execution_interval`` seconds, in a thread."""


class PeriodicProcessAgent(ProcessMode, PeriodicAgent):
    """Calls ``runner()`` every ``Config.execution_interval`` seconds, in a child process."""


__all__ = [
    "SUCCESS",
    "BaseAgent",
    "LoopingAgent",
    "PeriodicAgent",
    "BaseThreadAgent",
    "BaseProcessAgent",
    "LoopingThreadAgent",
    "LoopingProcessAgent",
    "PeriodicThreadAgent",
    "PeriodicProcessAgent",
]
