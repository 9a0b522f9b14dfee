"""pyorchestrate: run long-lived Python agents across many hosts over ZeroMQ.

Everything public is importable from here::

    from pyorchestrate import Orchestrator, PeriodicThreadAgent, OrchestratorEvent
"""

from .agents import (
    ConditionalAgent,
    ConditionalProcessAgent,
    ConditionalThreadAgent,
    DeferredAgent,
    DeferredProcessAgent,
    DeferredThreadAgent,
    EventDrivenAgent,
    EventDrivenProcessAgent,
    EventDrivenThreadAgent,
    OneShotAgent,
    OneShotProcessAgent,
    OneShotThreadAgent,
    PoolAgent,
    PoolProcessAgent,
    PoolThreadAgent,
    RecoverableException,
    RecoveryAgent,
    RecoveryProcessAgent,
    RecoveryThreadAgent,
    TriggeredAgent,
    TriggeredProcessAgent,
    TriggeredThreadAgent,
    SUCCESS,
    BaseAgent,
    BaseProcessAgent,
    BaseThreadAgent,
    LoopingAgent,
    LoopingProcessAgent,
    LoopingThreadAgent,
    PeriodicAgent,
    PeriodicProcessAgent,
    PeriodicThreadAgent,
)
from .config import (
    BaseConfig,
    ConfigValidationError,
    ValidationPolicy,
    ValidationResult,
    ValidationSeverity,
)
from .agents.signals import ControlEvents, StateEvents
from .coordinator import WorkerWaitTimeout
from .handles import AgentHandle
from .plugins import PluginBase, Plugins
from .zmq_plugins import ZmqPubSub, ZmqReqRep
from .events import OrchestratorEvent
from .orchestrator import Orchestrator, RunMode
from .shipping import ShippingError
from .sockets import AddressError
from .subscriber import Event, EventSubscriber

__version__ = "0.1.0"

__all__ = [
    "Orchestrator",
    "RunMode",
    "OrchestratorEvent",
    "EventSubscriber",
    "Event",
    "BaseAgent",
    "LoopingAgent",
    "PeriodicAgent",
    "BaseThreadAgent",
    "BaseProcessAgent",
    "LoopingThreadAgent",
    "LoopingProcessAgent",
    "PeriodicThreadAgent",
    "PeriodicProcessAgent",
    "BaseConfig",
    "ValidationResult",
    "ValidationSeverity",
    "ValidationPolicy",
    "ConfigValidationError",
    "WorkerWaitTimeout",
    "ShippingError",
    "AddressError",
    "SUCCESS",
    "StateEvents",
    "ControlEvents",
    "AgentHandle",
    "PluginBase",
    "Plugins",
    "ZmqPubSub",
    "ZmqReqRep",
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
