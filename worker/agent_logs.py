"""Where agents' log lines are printed.  They always travel on the bus; a worker started with
``--agent-logs bus`` (an embedded one: its coordinator prints them, once) keeps them off its own
stderr, and so do its process agents (they learn it from the environment they inherit)."""

from __future__ import annotations

import logging
import os

ENV = "PYORCHESTRATE_AGENT_LOGS"


def not_an_agent_line(record: logging.LogRecord) -> bool:
    """A stderr filter: agents' records are printed elsewhere."""
    return not record.name.startswith("pyorchestrate.agent.")


def bus_only(handler: logging.Handler) -> None:
    """Keep agents' lines off ``handler`` in this process and in the agent processes it starts."""
    handler.addFilter(not_an_agent_line)
    os.environ[ENV] = "bus"


def follow_parent(handler: logging.Handler) -> None:
    """In an agent process: do as the worker that started it does."""
    if os.environ.get(ENV) == "bus":
        handler.addFilter(not_an_agent_line)
