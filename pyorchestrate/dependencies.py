"""Start-order dependencies between agents."""

from __future__ import annotations

from typing import Mapping, Sequence


def check_graph(depends_on: Mapping[str, Sequence[str]]) -> None:
    """Raise ``ValueError`` naming the agents if a dependency is missing or the graph has a cycle."""
    missing = sorted({f"{agent} -> {dep}" for agent, deps in depends_on.items() for dep in deps if dep not in depends_on})
    if missing:
        raise ValueError(f"dependencies on agents that are not registered: {', '.join(missing)}")
    done: set[str] = set()
    for start in depends_on:
        path: list[str] = []
        on_path: set[str] = set()

        def visit(node: str) -> None:
            if node in done:
                return
            if node in on_path:
                cycle = path[path.index(node):] + [node]
                raise ValueError(f"dependency cycle: {' -> '.join(cycle)}")
            on_path.add(node)
            path.append(node)
            for dep in depends_on[node]:
                visit(dep)
            path.pop()
            on_path.discard(node)
            done.add(node)

        visit(start)
