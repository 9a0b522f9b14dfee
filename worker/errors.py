"""An agent's failure as event fields, the same for thread and process agents."""

from __future__ import annotations

import traceback
from typing import Any

from pyorchestrate.protocol import cut_text

#: the most of an error's message and traceback a report carries (characters): a report travels in
#: one control frame, and one over the coordinator's max_message_size costs the worker its
#: connection and the report with it (an exception whose text held a 2 MB payload did)
MAX_MESSAGE_CHARS = 16 * 1024
MAX_TRACEBACK_CHARS = 64 * 1024


def bounded(fields: dict[str, Any]) -> dict[str, Any]:
    """An AGENT_ERROR's fields with its message and traceback cut to size (the same dict if they
    fit)."""
    message, text = fields.get("error_message"), fields.get("traceback")
    if (not isinstance(message, str) or len(message) <= MAX_MESSAGE_CHARS) and (
            not isinstance(text, str) or len(text) <= MAX_TRACEBACK_CHARS):
        return fields
    return {**fields, "error_message": cut_text(message, MAX_MESSAGE_CHARS), "traceback": cut_text(text, MAX_TRACEBACK_CHARS)}


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
