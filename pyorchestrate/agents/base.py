"""BaseAgent: the lifecycle every agent goes through, wherever it runs.

STARTED -> config validation -> ``setup()`` -> READY -> ``execute()`` -> (``on_stop()`` if stop was
requested) -> ``on_close()`` -> TERMINATED.  An exception anywhere reports AGENT_ERROR with the
message and traceback text, then TERMINATED.  Where the events go is decided by whoever runs the
agent: a worker sends them to the coordinator; standalone, they are logged.
"""

from __future__ import annotations

import abc
import logging
import time
import traceback
from typing import Any, ClassVar

from ..config import BaseConfig, ValidationSeverity, checks_are_ours
from .. import plugins
from ..publisher import check_publishable, hook_logger, open_bus
from ..timeouts import until_done_if_past_max
from . import signals
from .inbox import INBOX_MAX, Inbox

class RecoverableException(Exception):
    """Raise from ``cycle()`` / ``runner()`` for a failure the loop should survive: it is logged
    and reported (AGENT_ERROR with ``recoverable=True``) and the next iteration runs."""

#: the parent of every agent's ``self.logger`` (``pyorchestrate.agent.<name>``)
AGENT_LOGGERS = logging.getLogger("pyorchestrate.agent")

SUCCESS = 25
SUBSCRIBE_WAIT = 10.0  #: seconds READY waits at most for the coordinator to confirm a bus subscription
logging.addLevelName(SUCCESS, "SUCCESS")


class BaseAgent(abc.ABC):
    """Runs :meth:`execute` once.  Subclass a Thread or Process variant and override ``execute``.

    Optional hooks: :meth:`setup` (before READY), :meth:`on_stop` (after a stop request, once the
    current work has finished), :meth:`on_close` (always, last).
    """

    #: what it takes from its inbox: "message" (``orchestrator.send``), "trigger"
    #: (``orchestrator.trigger``).  The coordinator refuses the others at the call, as they would
    #: wait there unread (or, a message to a Triggered agent, be taken and ignored)
    _reads: frozenset[str] = frozenset()

    class Config(BaseConfig):
        """Settings of an agent.  Subclass as ``class Config(ParentAgent.Config)``."""

        #: seconds a stopped agent may take to finish before it is terminated (process) or
        #: reported stuck (thread)
        stop_timeout: float = 10.0
        #: messages (``orchestrator.send``, ``trigger``) that may wait for the agent to take them;
        #: one more is dropped, counted and said (see inbox.py).  -1: no bound
        inbox_max: int = INBOX_MAX

        def validate(self):
            results = super().validate()
            from ..config import ValidationResult
            if not isinstance(self.stop_timeout, (int, float)) or not 0 <= self.stop_timeout < float("inf"):  # NaN too
                results.append(ValidationResult("stop_timeout", "must be a number of seconds >= 0"))
            if type(self.inbox_max) is not int or not (self.inbox_max >= 1 or self.inbox_max == -1):
                results.append(ValidationResult("inbox_max", f"must be a number of messages >= 1, or -1 for no bound "
                                                             f"(got {self.inbox_max!r})"))
            return results

    Plugin = plugins.Plugins
    StateEvents = signals.StateEvents
    ControlEvents = signals.ControlEvents

    #: "thread" or "process"; set by the Thread/Process variants
    execution_mode: ClassVar[str] = ""
    _subscriber: Any = None  #: the bus subscription of a behaviour that follows events (see _subscribe)
    # made on first use, per instance (see logger, publisher.attach): a trivial agent on a worker
    # used to make a logger, a bus and a log handler it never used, ~a third of its start's cost
    _logger: logging.Logger | None = None
    _bus: Any = None  #: this run's publisher.AgentBus once something was published or logged
    _bus_args: Any = None  #: how to make it, while running on a worker (publisher.attach)
    _bus_log_handler: Any = None
    #: stopped before its work began (before setup or execute, a Deferred agent before its time,
    #: ...): its end says so, and a one-shot agent moved off a worker (drained, or shutting down)
    #: then runs elsewhere; one whose work began is taken as done or failed, never run twice
    _not_run: bool = False
    #: on a worker, the lease of a copy its coordinator replaces elsewhere when the lease runs out
    #: (``pyorchestrate_worker.lease_guard.Lease``); None standalone and for kept copies
    _lease: Any = None

    config: Config

    def __init__(self, name: str | None = None, config: BaseConfig | None = None, plugin: Any = None) -> None:
        self.name = name or type(self).__name__
        self.config = config if config is not None else type(self).Config()
        #: this agent's plugins (``self.plugin.<name>``): its class's ``Plugin``, or ``plugin``
        self.plugin = plugins.PluginSet(plugins.resolve(type(self).Plugin, plugin))
        self.state_events = type(self).StateEvents(signals.LazyEvent)
        self.control_events = type(self).ControlEvents(signals.LazyEvent)
        # standalone, nobody else drives the agent: setup and execute proceed on their own
        self.control_events.setup_event.set()
        self.control_events.execute_event.set()
        self._inbox = Inbox()
        #: the cluster's events address (set by the worker; None standalone)
        self.events_address: str | None = None
        #: the key to subscribe with when the cluster uses keys (the worker's own; set by the worker)
        self.events_key: Any = None

    @property
    def logger(self) -> logging.Logger:
        """This agent's logger, ``pyorchestrate.agent.<name>`` (on a worker its records also go
        on the bus as AGENT_LOG events).  Made when first used."""
        logger = self._logger
        if logger is None:
            logger = self._logger = logging.getLogger(f"pyorchestrate.agent.{self.name}")
            if logger.level == logging.NOTSET and AGENT_LOGGERS.level == logging.NOTSET:
                # INFO and up reach the bus, whatever stderr shows.  Workers set this once on the
                # parent instead: every setLevel clears every logger's cache, O(loggers) per agent
                logger.setLevel(logging.INFO)
            if self._bus_args is not None:
                hook_logger(self)
        return logger

    @logger.setter
    def logger(self, value: logging.Logger) -> None:
        self._logger = value

    def _report(self, event: str, **fields: Any) -> None:
        """Where lifecycle events go: logged standalone; a worker replaces this per instance."""
        self.logger.debug("%s %s", event, fields or "")

    # ---------------------------------------------------------------- hooks to override

    def setup(self) -> None:
        """Prepare resources before the agent is READY.  Optional."""

    @abc.abstractmethod
    def execute(self) -> None:
        """The agent's work.  Required in Base agents; Looping/Periodic agents implement it."""

    def on_stop(self) -> None:
        """Called after a stop request, once the current iteration has finished.  Optional."""

    def on_close(self) -> None:
        """Called last, whether the agent finished, stopped or failed.  Optional."""

    # ---------------------------------------------------------------- control

    @property
    def _stop_event(self) -> Any:
        return self.control_events.stop_event

    def stop(self) -> None:
        """Ask the agent to stop: the current iteration finishes, then ``on_stop``, ``on_close``."""
        self._stop_event.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop_event.is_set()

    def _may_go_on(self) -> bool:
        """Before each iteration of a loop: False once stopped.  Under a lease that has run out,
        with the stop timeout after it, as last told (a frozen process woke up), it first waits
        until that lease is renewed or the agent is stopped: the copy's replacement may be running
        elsewhere by then."""
        if self._lease is not None:
            # the stop timeout as the coordinator counts it for the replacement (orchestrator.py)
            self._lease.hold(self._stop_event, float(getattr(self.config, "stop_timeout", 10.0)))
        return not self._stop_event.is_set()

    def wait_stop(self, timeout: float | None) -> bool:
        """Sleep up to ``timeout`` seconds (None or ``float("inf")``: until stopped), waking early
        on stop; True if stop was requested."""
        return self._stop_event.wait(until_done_if_past_max(timeout))

    def publish(self, topic: str, **data: Any) -> None:
        """Put an ``AGENT_EVENT`` on the cluster's bus, topic ``AGENT_EVENT.<topic>``, carrying
        ``data`` (msgpack-able values; anything else raises TypeError naming the field).  Never
        blocks for long: events are batched, and dropped (and counted) if nobody drains them."""
        check_publishable(topic, data)
        bus = open_bus(self)
        if bus is None:
            self.logger.debug("publish %s %s (standalone: no bus)", topic, data)
            return
        bus.publish("AGENT_EVENT", topic, {"agent_name": self.name, "topic": topic, "data": data})

    def deliver(self, kind: str, payload: Any) -> None:
        """Hand the agent a message (``orchestrator.trigger`` / ``send`` / ``execute`` end here)."""
        if kind == "execute":
            self.control_events.execute_event.set()
        elif not self._inbox.put((kind, payload), getattr(self.config, "inbox_max", INBOX_MAX)):
            self._inbox_full(kind)

    def _refused_early(self, count: int) -> None:
        """``count`` messages were refused for the agent before it was made (worker/handoff.py):
        counted and said as its inbox's own drops."""
        self._inbox.dropped += count
        if self._inbox.tally is not None:
            self._inbox.tally[1] = self._inbox.dropped
        self._inbox_full("message")

    def _inbox_full(self, kind: str) -> None:
        inbox = self._inbox
        if inbox.due_to_say():
            self.logger.warning("inbox full: %d messages wait to be handled (Config.inbox_max); dropped a %s, %d "
                                "dropped in all. Handle them faster, send them slower, or raise inbox_max",
                                inbox.waiting(), kind, inbox.dropped)

    def _wait_control(self, event: Any) -> bool:
        """Wait for a control event, giving up if stop is requested; True if it was set."""
        if event.is_set() and not self.control_events.stop_event.is_set():
            return True  # the usual case, twice a run: no wait, and no property calls to say so
        while not event.wait(0.05):
            if self.stopping:
                return False
        return not self.stopping

    def _next_delivery(self, timeout: float) -> tuple[str, Any] | None:
        """The next delivered message, or None after ``timeout`` seconds."""
        return self._inbox.get(timeout)

    def _prepare(self) -> None:
        """What a behaviour needs in place before READY (after the user's ``setup``)."""

    def _release(self) -> None:
        """Undo ``_prepare``: runs last, however the agent ended."""
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None

    def _subscribe(self, topics: list[str]) -> None:
        """Subscribe ``self._subscriber`` to ``topics`` (event names like ``AGENT_ERROR`` or
        prefixes like ``AGENT_EVENT.temperature``) and wait until the coordinator has confirmed
        it (up to ``SUBSCRIBE_WAIT`` s).  Called before READY: the subscription used to be made
        after it, and an agent started on this one's READY lost its first event (the README's
        sensors script, about 1 run in 20 on a busy machine)."""
        from ..subscriber import EventSubscriber

        topics = [t if "." in t else t + "." for t in topics]
        self._subscriber = subscriber = EventSubscriber(self.events_address, topics=topics, keys=self.events_key)
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        while not self.stopping and not subscriber.connected:
            if time.monotonic() >= deadline:
                self.logger.warning("the coordinator has not confirmed the subscription to %s after %.0f s; "
                                    "going on (events published meanwhile may be missed)",
                                    ", ".join(topics), SUBSCRIBE_WAIT)
                break
            subscriber.wait_connected(0.1)

    def _main(self) -> None:
        """What runs between READY and on_close; behaviours override this, users override execute."""
        self.execute()

    # ---------------------------------------------------------------- lifecycle (do not override)

    def run(self) -> bool:
        """Drive the whole lifecycle in the current thread; return True if it ended without error."""
        report = self._report
        ok = True
        report("AGENT_STARTED")
        self.state_events.start_event.set()
        try:
            if self._bus_args is None or not checks_are_ours(type(self.config)):
                # on a worker, ours were checked by the coordinator at register_agent, on the same
                # settings (it refuses what may not run): a user's validate() may read this host
                findings = self.config.check(f"agent {self.name!r}")
                if self._bus_args is None:  # on a worker, the coordinator said these: once is enough
                    for finding in findings:
                        level = logging.WARNING if finding.severity is ValidationSeverity.WARNING else logging.ERROR
                        self.logger.log(level, "config: %s", finding)
            self.plugin.initialize(self, self._plugin_failed, BaseException)
            if self._wait_control(self.control_events.setup_event):
                self.setup()
                self._prepare()
                report("AGENT_READY")
                self.state_events.ready_event.set()
                if self._wait_control(self.control_events.execute_event):
                    self._main()
                else:
                    self._not_run = True
            else:
                self._not_run = True
        except BaseException as exc:  # noqa: BLE001 - an agent's failure must be reported, whatever it is
            ok = False
            self._report_error(exc)
        finally:
            # whatever a hook raises (sys.exit() too, which once left the run unended: its thread
            # died before AGENT_TERMINATED, and the agent stayed READY for good).
            # self.stopping without its two property calls (every run passes here)
            for hook in ((self.on_stop,) if self.control_events.stop_event.is_set() else ()) + (self.on_close,):
                try:
                    hook()
                except BaseException as exc:  # noqa: BLE001
                    ok = False
                    self._report_error(exc)
            try:
                self._release()
            except BaseException as exc:  # noqa: BLE001
                ok = False
                self._report_error(exc)
            self.plugin.finalize(self._plugin_failed, BaseException)
            # the coordinator holds its finish until it has seen our last bus event
            marker = self._bus.flush() if self._bus is not None else {}
            if self._not_run:
                marker["not_run"] = True
            # sent to it and never handled: counted by the coordinator (its dropped messages); what
            # it took is said even if none, as the coordinator counts what it sent and never
            # reached the inbox (still in a pipe, or arriving after this end) from it
            marker["messages_taken"] = self._inbox.taken
            if self._inbox.dropped:
                marker["messages_dropped"] = self._inbox.dropped
            left = self._inbox.waiting()
            if left:
                marker["messages_unhandled"] = left
            report("AGENT_TERMINATED", ok=ok, **marker)
            self.state_events.close_event.set()
        return ok

    def _plugin_failed(self, name: str, exc: BaseException) -> None:
        self._report_error(exc, plugin=name, recoverable=True)

    def _report_error(self, exc: BaseException, **extra: Any) -> None:
        message = f"{type(exc).__name__}: {exc}"
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.logger.error("agent %s %s: %s", self.name, "error (continuing)" if extra.get("recoverable") else "failed",
                          message)
        self._report("AGENT_ERROR", error_message=message, traceback=text, **extra)
