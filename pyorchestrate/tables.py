"""Human tables for the CLI: ``rich`` when installed (``pip install 'pyorchestrate[cli]'``: colour,
widths that fit the terminal, the live ``top`` view), plain aligned text otherwise, so the core
install stays small and the commands work everywhere."""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

try:  # optional: the [cli] extra
    import rich.console
    import rich.table
    from rich.markup import escape
except ImportError:  # pragma: no cover - exercised where rich is absent
    rich = None  # type: ignore[assignment]

_STATE_STYLES = {"READY": "green", "STARTED": "cyan", "PENDING": "yellow", "RESTARTING": "yellow",
                 "DISCONNECTED": "magenta", "TERMINATED": "dim", "alive": "green", "draining": "yellow",
                 "gone": "red"}


def duration(seconds: float | None) -> str:
    """3.2s, 4m05s, 2h03m, 3d04h; '-' for None."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def short(text: Any, width: int = 60) -> str:
    """One line of at most ``width`` characters ('' for None)."""
    if text is None:
        return ""
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def build(title: str, columns: list[str], rows: Iterable[list[Any]]) -> Any:
    """A table object: rich's if available, else a list of aligned lines."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    if rich is not None:
        table = rich.table.Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        for column in columns:
            table.add_column(column, no_wrap=column in ("NAME", "STATE"))
        for row in rows:
            table.add_row(*[f"[{_STATE_STYLES[v]}]{v}[/]" if v in _STATE_STYLES else escape(v) for v in row])
        return table
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def show(*tables: Any, out: TextIO | None = None) -> None:
    """Print tables (from :func:`build`) or plain strings."""
    out = out or sys.stdout
    if rich is not None:
        console = rich.console.Console(file=out, soft_wrap=True)  # a long line stays one line (grep)
        for t in tables:
            console.print(t)
        return
    for t in tables:
        print("\n".join(t) if isinstance(t, list) else t, file=out)
