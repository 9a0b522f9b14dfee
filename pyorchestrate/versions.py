"""The version handshake: what each side runs, and which differences break unpickling."""

from __future__ import annotations

import platform
from importlib import metadata

import cloudpickle
import msgpack
import zmq

from .protocol import PROTOCOL_VERSION


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def local_versions() -> dict[str, str]:
    """The versions this process reports at registration."""
    return {
        "protocol": str(PROTOCOL_VERSION),
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "pyorchestrate": _dist_version("pyorchestrate"),
    }


def _major_minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def _major(version: str) -> str:
    return str(version).split(".")[0]


# (key, how much of the version must match; None = differences are only a warning)
_RULES = [
    ("protocol", str, "the wire protocol differs"),
    ("python", _major_minor, "cloudpickle output only loads on the same Python minor version"),
    ("cloudpickle", _major, "pickles from another cloudpickle major version may not load"),
]


def compare(coordinator: dict, worker: dict) -> tuple[list[str], list[str]]:
    """Return ``(errors, warnings)`` for a worker's versions against the coordinator's."""
    errors, warnings = [], []
    strict = set()
    for key, part, why in _RULES:
        strict.add(key)
        mine, theirs = str(coordinator.get(key, "?")), str(worker.get(key, "?"))
        if part(mine) != part(theirs):
            errors.append(f"{key}: coordinator {mine}, worker {theirs} ({why})")
        elif mine != theirs:
            warnings.append(f"{key}: coordinator {mine}, worker {theirs}")
    for key in sorted(set(coordinator) | set(worker)):
        if key in strict:
            continue
        mine, theirs = str(coordinator.get(key, "?")), str(worker.get(key, "?"))
        if mine != theirs:
            warnings.append(f"{key}: coordinator {mine}, worker {theirs}")
    return errors, warnings


def table(coordinator: dict, worker: dict) -> str:
    """Both sides' versions, one line per package, for refusal messages."""
    keys = sorted(set(coordinator) | set(worker))
    width = max(len(k) for k in keys)
    lines = [f"{'':{width}}  {'coordinator':>14}  {'worker':>14}"]
    for k in keys:
        mark = "" if coordinator.get(k) == worker.get(k) else "  <- differs"
        lines.append(f"{k:{width}}  {str(coordinator.get(k, '?')):>14}  {str(worker.get(k, '?')):>14}{mark}")
    return "\n".join(lines)
