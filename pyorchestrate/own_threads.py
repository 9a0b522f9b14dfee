"""The threads pyorchestrate starts in a worker's process, told apart from those its agents start.

A thread agent runs in its worker's process and may start threads of its own: a reader, a
keep-alive, a library's background sender.  An agent stopped because its worker's lease ran out
returns, but a thread it left running goes on doing the agent's work, beside the replacement the
coordinator starts elsewhere once the lease and the agent's stop timeout have passed
(worker/node.py: ``_end_left_threads``).  Python does not say which thread started another, so
every thread pyorchestrate starts in a worker is made by :func:`thread` (or passed to
:func:`mark`), which marks it as ours: any other live thread there is one an agent started, itself
or through a library it called.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

_MARK = "_pyorchestrate_own"

T = TypeVar("T", bound=threading.Thread)


def mark(made: T) -> T:
    """Mark ``made`` (not started yet, or started by us) as pyorchestrate's own; return it."""
    setattr(made, _MARK, True)
    return made


def thread(target: Callable[..., Any], name: str, args: tuple = (), daemon: bool = True) -> threading.Thread:
    """A thread of pyorchestrate's own (not started): ``threading.Thread`` with our mark."""
    return mark(threading.Thread(target=target, name=name, args=args, daemon=daemon))


def others() -> list[threading.Thread]:
    """This process's live threads that pyorchestrate did not start, the main thread aside.

    Left out: a thread started without ``threading`` (``_thread.start_new_thread``, a C
    library's), seen only once it called into ``threading`` and then as alive for ever; and
    pyzmq's own (the garbage collector its zero-copy sends start, once per process), which do no
    agent's work."""
    main = threading.main_thread()
    return [t for t in threading.enumerate()
            if t is not main and not getattr(t, _MARK, False) and not isinstance(t, threading._DummyThread)
            and not type(t).__module__.startswith("zmq.")]
