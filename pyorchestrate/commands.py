"""What the user's thread may ask of the coordinator's loop: one small type per command.

``Orchestrator`` puts a command (and a future for its result) into the loop's mailbox; the loop
hands it to the cluster core, which looks its handler up by type in :data:`HANDLERS` (filled by
the core with :func:`handles`).  No command travels as a string, and a misspelt one fails at
import, not at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: command type -> the core's method that carries it out
HANDLERS: dict[type, Callable[..., Any]] = {}


def handles(command: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a core method as the handler of ``command``."""
    def register(method: Callable[..., Any]) -> Callable[..., Any]:
        HANDLERS[command] = method
        return method
    return register


class Command:
    """Base of every command."""


@dataclass(frozen=True)
class AddAgent(Command):
    record: Any  #: an AgentRecord built (and checked) by register_agent
    graph_checked: bool = False  #: its dependencies were checked with the whole graph (at start())


@dataclass(frozen=True)
class AddDependency(Command):
    name: str
    deps: list[str]


@dataclass(frozen=True)
class StartAgent(Command):
    name: str


@dataclass(frozen=True)
class StopAgent(Command):
    name: str
    timeout: float


@dataclass(frozen=True)
class RestartAgent(Command):
    name: str
    timeout: float


@dataclass(frozen=True)
class Deliver(Command):
    name: str
    kind: str  #: "trigger" | "message" | "execute"
    payload: Any


@dataclass(frozen=True)
class Execute(Command):
    name: str | None  #: None: every running agent


@dataclass(frozen=True)
class StopAll(Command):
    timeout: float


@dataclass(frozen=True)
class DrainWorker(Command):
    name: str


@dataclass(frozen=True)
class Snapshot(Command):
    pass


@dataclass(frozen=True)
class Join(Command):
    """The script is in join(): a STOP_ON_EMPTY run may end once everything has terminated."""


@dataclass(frozen=True)
class RequestStop(Command):
    """The script called stop(): the run ends once everything has terminated."""


@dataclass(frozen=True)
class Close(Command):
    """Release the workers and close (after the run has ended)."""
