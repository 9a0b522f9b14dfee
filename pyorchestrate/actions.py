"""What the cluster core decides, for the loop that owns the sockets to carry out."""

from __future__ import annotations

from typing import Any, NamedTuple

from .events import OrchestratorEvent
from .records import AgentRecord


class Send(NamedTuple):
    identity: bytes
    frame: bytes


class Publish(NamedTuple):
    event: OrchestratorEvent
    subject: str
    fields: dict[str, Any]
    record: AgentRecord | None  #: the agent the event is about (its state changed, log it)


class AwaitBus(NamedTuple):
    """A finished run's publisher sent up to ``seq``: wait for it before declaring the run over."""
    publisher: str
    incarnation: str
    seq: int


class Forget(NamedTuple):
    """A finished agent left the core's memory (finished_agents_max): its name is free again."""
    name: str


class Finished(NamedTuple):
    pass


Action = Send | Publish | AwaitBus | Forget | Finished
