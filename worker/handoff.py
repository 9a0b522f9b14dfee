"""A thread agent that its own thread makes: what it is handed before it exists reaches it once it
does.

A worker (and an agent host) makes each thread agent in the agent's own thread, not in the loop
that reads the coordinator's messages: unpickling its class imports the class's modules (seconds
for a big library) and its ``__init__`` is the user's code, which may connect somewhere or sleep.
Made in the worker's loop, a 3 s ``__init__`` silenced the worker: its coordinator took it for
lost and the agents running there were stopped at its lease.  Meanwhile the loop may hand the agent
a message (``trigger``, ``send``, ``execute``) or a stop: kept here, they reach it in order the
moment it is made, and whatever comes later goes to it directly.

At most :data:`EARLY_MAX` messages are kept meanwhile (the default ``Config.inbox_max``; the
agent's own is in its config, not read until it is made): an ``__init__`` that never returns (a
connect that hangs) beside a script that keeps sending grew the worker without end.  Those beyond
are dropped and counted in the agent's inbox once it is made (its AGENT_TERMINATED's
``messages_dropped``).
"""

from __future__ import annotations

import threading
from typing import Any

EARLY_MAX = 10_000


class Handoff:
    """One thread agent's way in: :meth:`give` from the loop, :meth:`made` (or :meth:`failed`)
    once from the agent's thread."""

    __slots__ = ("agent", "_early", "_stop", "_lock", "dropped")

    def __init__(self) -> None:
        self.agent: Any = None  #: the agent, once made
        self._early: list[tuple[str, Any]] | None = []  # None once made, or once it failed to be
        self._stop = False
        self._lock = threading.Lock()
        self.dropped = 0  #: messages refused before it was made (EARLY_MAX waited already)

    def give(self, kind: str, payload: Any = None) -> None:
        """A message for the agent (``deliver(kind, payload)``), or ``"stop"``; nothing once it
        failed to be made (its end is reported)."""
        with self._lock:
            agent = self.agent
            if agent is None:
                if self._early is not None:
                    if kind == "stop":
                        self._stop = True
                    elif len(self._early) < EARLY_MAX or kind == "execute":  # (execute is a flag, not a message)
                        self._early.append((kind, payload))
                    else:
                        self.dropped += 1
                return
        if kind == "stop":
            agent.stop()
        else:
            agent.deliver(kind, payload)

    def made(self, agent: Any) -> None:
        """The agent exists: what it was given meanwhile reaches it now, in order (under the lock,
        so nothing given later overtakes it)."""
        with self._lock:
            self.agent = agent
            early, self._early = self._early, None
            for kind, payload in early or ():
                agent.deliver(kind, payload)
            if self.dropped:
                agent._refused_early(self.dropped)
            if self._stop:
                agent.stop()

    def failed(self) -> None:
        """It could not be made: what it is given from now on is dropped."""
        with self._lock:
            self._early = None
