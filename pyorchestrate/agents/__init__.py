"""The agent family: each behaviour in a Thread and a Process variant."""

from .base import SUCCESS, BaseAgent, RecoverableException
from .eventdriven import EventDrivenAgent
from .looping import LoopingAgent, PeriodicAgent
from .modes import ProcessMode, ThreadMode
from .oneshot import ConditionalAgent, DeferredAgent, OneShotAgent, RecoveryAgent, TriggeredAgent
from .pool import PoolAgent


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


class OneShotThreadAgent(ThreadMode, OneShotAgent):
    """Runs ``execute()`` once, in a thread."""


class OneShotProcessAgent(ProcessMode, OneShotAgent):
    """Runs ``execute()`` once, in a child process."""


class DeferredThreadAgent(ThreadMode, DeferredAgent):
    """Runs ``execute()`` once after ``Config.delay`` / at ``Config.start_at``, in a thread."""


class DeferredProcessAgent(ProcessMode, DeferredAgent):
    """Runs ``execute()`` once after ``Config.delay`` / at ``Config.start_at``, in a child process."""


class ConditionalThreadAgent(ThreadMode, ConditionalAgent):
    """Runs ``execute()`` once ``condition()`` is true, in a thread."""


class ConditionalProcessAgent(ProcessMode, ConditionalAgent):
    """Runs ``execute()`` once ``condition()`` is true, in a child process."""


class TriggeredThreadAgent(ThreadMode, TriggeredAgent):
    """Runs ``execute(payload)`` once when triggered, in a thread."""


class TriggeredProcessAgent(ProcessMode, TriggeredAgent):
    """Runs ``execute(payload)`` once when triggered, in a child process."""


class RecoveryThreadAgent(ThreadMode, RecoveryAgent):
    """Runs ``execute()``, retrying with backoff on exception, in a thread."""


class RecoveryProcessAgent(ProcessMode, RecoveryAgent):
    """Runs ``execute()``, retrying with backoff on exception, in a child process."""


class EventDrivenThreadAgent(ThreadMode, EventDrivenAgent):
    """Calls ``on_event(event)`` for matching bus events and sent messages, in a thread."""


class EventDrivenProcessAgent(ProcessMode, EventDrivenAgent):
    """Calls ``on_event(event)`` for matching bus events and sent messages, in a child process."""


class PoolThreadAgent(ThreadMode, PoolAgent):
    """Periodic ``runner()`` on ``Config.pool_size`` overlapping slots, in a thread."""


class PoolProcessAgent(ProcessMode, PoolAgent):
    """Periodic ``runner()`` on ``Config.pool_size`` overlapping slots, in a child process."""


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
    "OneShotAgent",
    "DeferredAgent",
    "ConditionalAgent",
    "TriggeredAgent",
    "RecoveryAgent",
    "EventDrivenAgent",
    "PoolAgent",
    "RecoverableException",
    "OneShotThreadAgent",
    "OneShotProcessAgent",
    "DeferredThreadAgent",
    "DeferredProcessAgent",
    "ConditionalThreadAgent",
    "ConditionalProcessAgent",
    "TriggeredThreadAgent",
    "TriggeredProcessAgent",
    "RecoveryThreadAgent",
    "RecoveryProcessAgent",
    "EventDrivenThreadAgent",
    "EventDrivenProcessAgent",
    "PoolThreadAgent",
    "PoolProcessAgent",
]
