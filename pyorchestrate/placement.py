"""Which worker an agent goes to, and why it waits when none will do."""

from __future__ import annotations

from typing import Any, Iterable


def eligible(worker: Any, pin: str | None, labels: dict[str, str]) -> bool:
    """Can this worker take the agent at all (ignoring how busy it is)?"""
    if not worker.alive or worker.draining:
        return False
    if pin is not None and worker.name != pin:
        return False
    return all(worker.labels.get(k) == v for k, v in labels.items())


def has_room(worker: Any) -> bool:
    return not worker.capacity or len(worker.agents) < worker.capacity


def choose(workers: Iterable[Any], pin: str | None, labels: dict[str, str]) -> tuple[Any | None, str]:
    """The least-loaded eligible worker with room, or None and the reason the agent waits."""
    matching = [w for w in workers if eligible(w, pin, labels)]
    with_room = [w for w in matching if has_room(w)]
    if with_room:
        return min(with_room, key=lambda w: (len(w.agents), w.order)), ""
    if matching:
        return None, "every eligible worker is at capacity"
    if pin is not None:
        return None, f"waiting for worker {pin!r} to join"
    if labels:
        wanted = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return None, f"no live worker has labels {wanted}"
    return None, "no live worker"
