"""An agent's failure as event fields, the same for thread and process agents."""

from __future__ import annotations

import traceback
from typing import Any


def error_fields(exc: BaseException, hint: str = "") -> dict[str, Any]:
    """``error_message`` and ``traceback``; a missing module says where to install it."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError):
        message += (f"{hint} - module {exc.name!r} is not installed on this worker: install it there, or "
                    "keep it next to the coordinator script so it is shipped with the agent")
    return {"error_message": message,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def how_it_exited(code: int | None) -> str:
    """A child process's exit code in words (a negative code is the signal that killed it)."""
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
