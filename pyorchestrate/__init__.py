"""pyorchestrate: run long-lived Python agents across many hosts over ZeroMQ.

Everything public is importable from here::

    from pyorchestrate import Orchestrator, PeriodicThreadAgent, OrchestratorEvent
"""

from .agents import *  # noqa: F403 - the agent family; its __all__ is listed once, there
from .agents import __all__ as _agent_names
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
from .states import AgentState
from .sockets import AddressError
from .subscriber import Event, EventSubscriber
from .client import ControlClient, ControlError

__version__ = "0.1.0"

__all__ = [
    "Orchestrator",
    "RunMode",
    "OrchestratorEvent",
    "EventSubscriber",
    "ControlClient",
    "ControlError",
    "Event",
    "BaseConfig",
    "ValidationResult",
    "ValidationSeverity",
    "ValidationPolicy",
    "ConfigValidationError",
    "WorkerWaitTimeout",
    "ShippingError",
    "AddressError",
    "StateEvents",
    "ControlEvents",
    "AgentHandle",
    "AgentState",
    "PluginBase",
    "Plugins",
    "ZmqPubSub",
    "ZmqReqRep",
] + list(_agent_names)
