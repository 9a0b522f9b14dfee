"""Start-order dependencies between agents."""

from __future__ import annotations

from typing import Mapping, Sequence


def check_graph(depends_on: Mapping[str, Sequence[str]]) -> None:
    """Raise ``ValueError`` naming the agents if a dependency is missing or the graph has a cycle."""
    missing = sorted({f"{agent} -> {dep}" for agent, deps in depends_on.items() for dep in deps if dep not in depends_on})
    if missing:
        raise ValueError(f"dependencies on agents that are not registered: {', '.join(missing)}")
    # depth first with a stack of our own: a chain of a thousand agents, each depending on the
    # next, went past Python's recursion limit (RecursionError instead of a start)
    done: set[str] = set()
    for start in depends_on:
        if start in done:
            continue
        path = [start]  # the agents being visited, each depending on the next
        on_path = {start}
        todo = [iter(depends_on[start])]  # what is left of each one's dependencies
        while todo:
            dep = next(todo[-1], None)
            if dep is None:
                todo.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
            elif dep in on_path:
                cycle = path[path.index(dep):] + [dep]
                raise ValueError(f"dependency cycle: {' -> '.join(cycle)}")
            elif dep not in done:
                path.append(dep)
                on_path.add(dep)
                todo.append(iter(depends_on[dep]))
