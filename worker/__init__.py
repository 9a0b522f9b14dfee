"""The pyorchestrate worker node (installed as ``pyorchestrate_worker``)."""

from .node import Worker

__all__ = ["Worker"]
