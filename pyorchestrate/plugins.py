"""Plugins: objects an agent (or the orchestrator) initializes before its work and finalizes after.

Declare them as attributes of a nested ``Plugin`` class::

    class Monitor(PeriodicThreadAgent):
        class Plugin(PeriodicThreadAgent.Plugin):
            feed = ZmqPubSub("tcp://127.0.0.1:6000", role="pub")

        def runner(self):
            self.plugin.feed.send("cpu", {"load": 0.3})

Each agent gets its own copy; ``owner`` is set, then ``initialize()`` runs before ``setup()``, and
``finalize()`` after ``on_close()``, even when the agent failed.  A plugin that raises is logged
and reported (AGENT_ERROR with ``plugin``); the other plugins and the agent carry on.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any, Callable

log = logging.getLogger("pyorchestrate.plugins")
#: held while a Plugin class is walked for its plugins, and its result kept on it (once a class)
_DECLARED_LOCK = threading.Lock()


class PluginBase:
    """Base for plugins: override :meth:`initialize` and :meth:`finalize`."""

    owner: Any = None

    def initialize(self) -> None:
        """Acquire resources (sockets, files).  ``self.owner`` is the agent or orchestrator."""

    def finalize(self) -> None:
        """Release them.  Called even if the owner failed."""


class Plugins:
    """Base of the nested ``Plugin`` class: its attributes that are plugins are the plugins."""

    @classmethod
    def declared(cls) -> dict[str, Any]:
        found = cls.__dict__.get("_declared")  # this class's own, not a parent's
        if found is None:
            with _DECLARED_LOCK:  # another thread's first walk writes ``_declared`` (see EventSet._own_names)
                found = cls.__dict__.get("_declared")
                if found is None:
                    found = {}
                    for klass in reversed(cls.__mro__):
                        for key, value in vars(klass).items():
                            if not key.startswith("_") and hasattr(value, "initialize") and hasattr(value, "finalize"):
                                found[key] = value
                    cls._declared = found  # every agent start asks: walk the MRO once per class
        return dict(found)


class PluginSet:
    """An owner's own copies of its plugins, reachable as attributes (``self.plugin.feed``)."""

    def __init__(self, declared: dict[str, Any]) -> None:
        self._initialized: list[str] = []
        if not declared:  # most agents: nothing to copy (one PluginSet per agent start)
            self._plugins: dict[str, Any] = {}
            return
        self._plugins = {name: copy.copy(plugin) for name, plugin in declared.items()}
        for name, plugin in self._plugins.items():
            setattr(self, name, plugin)

    def names(self) -> list[str]:
        return list(self._plugins)

    def initialize(self, owner: Any, report: Callable[[str, BaseException], None],
                   catch: type[BaseException] = Exception) -> None:
        """Initialize each plugin; ``report`` what one raises of ``catch``.  An agent catches
        everything (BaseException: sys.exit() in a plugin must not end its thread before its end
        is reported); the orchestrator lets the rest through (Ctrl-C in its main thread)."""
        for name, plugin in self._plugins.items():
            plugin.owner = owner
            try:
                plugin.initialize()
                self._initialized.append(name)
            except catch as exc:
                report(name, exc)

    def finalize(self, report: Callable[[str, BaseException], None], catch: type[BaseException] = Exception) -> None:
        while self._initialized:  # only what initialized, last first
            name = self._initialized.pop()
            try:
                self._plugins[name].finalize()
            except catch as exc:
                report(name, exc)


def resolve(default: type[Plugins], custom: Any) -> dict[str, Any]:
    """The plugins an owner gets: its class's, or ``custom`` (a Plugin class or object) instead."""
    if custom is None:
        return default.declared()
    if isinstance(custom, type) and issubclass(custom, Plugins):
        return custom.declared()
    if isinstance(custom, dict):
        return dict(custom)
    raise TypeError(f"custom_plugin must be a Plugin class (class P(Agent.Plugin): ...) or a dict of plugins, "
                    f"got {custom!r}")
