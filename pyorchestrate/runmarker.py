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
import os
import tempfile
from pathlib import Path


def _path(name: str, address: str) -> Path:
    base = os.environ.get("PYORCHESTRATE_STATE_DIR") or os.path.join(tempfile.gettempdir(), f"pyorchestrate-{os.getuid()}")
    digest = hashlib.blake2b(f"{name}\0{address}".encode(), digest_size=10).hexdigest()
    return Path(base) / f"{digest}.run"


def crashed_before(name: str, address: str) -> bool:
    """Did a coordinator ``name`` on ``address`` start here and never end cleanly?"""
    try:
        return _path(name, address).read_text() == "running"
    except OSError:
        return False


def mark(name: str, address: str, state: str) -> None:
    """Record ``running`` or ``clean`` (best effort: an unwritable directory only loses the hint)."""
    path = _path(name, address)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(state)
        os.replace(tmp, path)
    except OSError:
        pass
