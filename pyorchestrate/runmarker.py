"""Did the previous coordinator of this name on this address end cleanly?

A coordinator that starts where an earlier one of the same name crashed (SIGKILL, a power cut)
must first wait for the workers to report what that one left running, so it can adopt those
agents or let them stop before it starts new copies.  Waiting on every start would charge every
script for a rare event, so each coordinator leaves a one-word marker (``running`` while it runs,
``clean`` once it released its workers) and the next one waits only after a crash.  The marker is
a hint kept on this host: a coordinator restarted on another host does not see it (set
``Config.adopt_window`` there).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("pyorchestrate.coordinator")


def marker(name: str, address: str) -> Path:
    """Where the marker of coordinator ``name`` on ``address`` is: an absolute path, taken once at
    start (a relative ``$PYORCHESTRATE_STATE_DIR`` would otherwise follow the script's ``os.chdir``,
    and the ``clean`` written at the end land where the next start does not look)."""
    base = os.environ.get("PYORCHESTRATE_STATE_DIR") or os.path.join(tempfile.gettempdir(), f"pyorchestrate-{os.getuid()}")
    digest = hashlib.blake2b(f"{name}\0{address}".encode(), digest_size=10).hexdigest()
    return (Path(base) / f"{digest}.run").absolute()


def previous(path: Path) -> str | None:
    """How the coordinator whose :func:`marker` is ``path`` ended here: ``"running"`` (it never
    ended cleanly: it crashed), ``"clean"``, or None: no marker (the first start here, or one whose
    state directory was not kept: a restarted container, a systemd service's private /tmp)."""
    try:
        state = path.read_text()
    except OSError:
        return None
    return state if state in ("running", "clean") else None


def mark(path: Path, state: str) -> None:
    """Record ``running`` or ``clean`` at :func:`marker` ``path`` (best effort: an unwritable
    directory only loses the hint).  A ``running`` that cannot be written (a full disk) removes
    the marker instead: the ``clean`` of the last run, left there, would tell the next start after
    a crash that there was none, and it would not wait for what this run leaves running (no
    marker makes it wait the window).  Removing a file needs no room."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(state)
        os.replace(tmp, path)
    except OSError as exc:
        if state != "running":
            return
        try:
            path.unlink(missing_ok=True)
        except OSError:
            log.warning("could not record that coordinator runs in %s (%s), nor remove what the last one left "
                        "there: after a crash, the next start may not wait for the agents this one leaves running",
                        path, exc)
