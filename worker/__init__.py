"""The pyorchestrate worker node (installed as ``pyorchestrate_worker``)."""

from __future__ import annotations

from typing import Any

__all__ = ["Worker"]


def __getattr__(name: str) -> Any:
    # imported on first use: the pulse process (python -m pyorchestrate_worker.pulse) runs from
    # this package and must stay small, without the worker's node and its imports
    if name == "Worker":
        from .node import Worker

        return Worker
    raise AttributeError(name)
