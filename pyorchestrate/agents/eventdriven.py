"""EventDrivenAgent: reacts to the cluster's events and to messages sent to it."""

from __future__ import annotations

import abc
from typing import Any

from ..subscriber import Event
from .looping import LoopingAgent


class EventDrivenAgent(LoopingAgent):
    """Calls :meth:`on_event` for each bus event whose topic starts with one of ``Config.subscribe``
    (event names like ``"AGENT_ERROR"`` or prefixes like ``"AGENT_EVENT.temperature"``), and for
    each message from ``orchestrator.send(name, payload)`` (an event ``"MESSAGE"`` with
    ``payload``).  ``Config.limit`` counts events handled (-1: until stopped)."""

    _reads = frozenset({"message", "trigger"})  # (a trigger is an event "MESSAGE" too)

    class Config(LoopingAgent.Config):
        subscribe: list[str] = []

    @abc.abstractmethod
    def on_event(self, event: Event) -> None:
        """Handle one event.  Required."""

    def cycle(self) -> None:
        """Unused: the loop is driven by events (write ``on_event``)."""

    def _prepare(self) -> None:
        # subscribed before READY: an agent that depends on this one (and starts once it is
        # READY) publishes nothing this one misses
        if self.config.subscribe and self.events_address:
            self._subscribe(self.config.subscribe)

    def _main(self) -> None:
        subscriber = self._subscriber
        limit, handled = self.config.limit, 0
        while self._may_go_on() and (limit < 0 or handled < limit):
            event = self._next_event(subscriber)
            if event is not None:
                self._guarded(lambda: self.on_event(event))
                handled += 1

    def _next_event(self, subscriber: Any) -> Event | None:
        delivery = self._next_delivery(0 if subscriber is not None else 0.05)
        if delivery is not None:
            return Event({"event": "MESSAGE", "agent_name": self.name, "payload": delivery[1]})
        if subscriber is not None:
            return subscriber.recv(timeout=0.02)
        return None
