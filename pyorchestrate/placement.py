"""Which worker an agent goes to, and why it waits when none will do."""

from __future__ import annotations

import heapq
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


def _open(worker: Any) -> bool:
    """``eligible(worker, None, {}) and has_room(worker)`` without building the arguments (the
    heap below asks it when an entry went stale or a worker was given an agent)."""
    return worker.alive and not worker.draining and has_room(worker)


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


#: assignments per placement pass; the rest wait for the next loop turn (a pass is then bounded)
PLACE_PER_PASS = 250


class Free:
    """The workers with room for an agent without pin or labels, least loaded first (the order
    :func:`choose` picks in), as a heap: taking one costs O(log workers), not a scan."""

    def __init__(self, workers: Iterable[Any]) -> None:
        self._any_alive = False
        heap: list[tuple[int, int, Any]] = []
        self._heap = heap
        for worker in workers:
            # eligible(worker, None, {}) and has_room(worker), inline: a pass builds this for
            # each batch of agents placed, in S2 for every agent (five calls a worker)
            if worker.alive and not worker.draining:
                self._any_alive = True
                if not worker.capacity or len(worker.agents) < worker.capacity:
                    heap.append((len(worker.agents), worker.order, worker))
        heapq.heapify(heap)

    def _clean(self) -> None:
        # an entry is stale once its worker's load changed (an assignment elsewhere in the pass)
        heap = self._heap
        while heap:
            load, order, worker = heap[0]
            # _open(worker) inline for this, the usual case (an entry's load is current)
            if load == len(worker.agents) and worker.alive and not worker.draining and (
                    not worker.capacity or load < worker.capacity):
                return
            heapq.heappop(heap)
            if _open(worker) and load != len(worker.agents):
                heapq.heappush(heap, (len(worker.agents), order, worker))

    def __bool__(self) -> bool:
        self._clean()
        return bool(self._heap)

    def pop(self) -> Any:
        """The least-loaded worker with room, removed until :meth:`update`, when ``bool(self)``
        has just said there is one (its top is then current: no second clean-up)."""
        return heapq.heappop(self._heap)[2]

    def update(self, worker: Any) -> None:
        """``worker`` was given an agent: back in the heap if it still has room."""
        if _open(worker):
            heapq.heappush(self._heap, (len(worker.agents), worker.order, worker))

    def why_none(self) -> str:
        return "every eligible worker is at capacity" if self._any_alive else "no live worker"
