"""The Orchestrator: the public face of a coordinator."""

from __future__ import annotations

import atexit
import concurrent.futures
import enum
import functools
import hashlib
import inspect
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Callable

from . import commands as cmd
from . import plugins, shipping, snapshots, trace
from .agents.base import BaseAgent
from .agents.looping import LoopingAgent
from .config import BaseConfig, ValidationResult, ValidationSeverity, checks_are_ours, config_missing
from .coordinator import Coordinator, WorkerWaitTimeout
from .dependencies import check_graph
from .events import MAX_BACKLOG, EventDispatcher, OrchestratorEvent
from .handles import AgentHandle, AgentStates
from .limits import Limits
from .local_workers import LocalWorkers, check_nice
from .log_thread import LOG_THREAD
from .protocol import DEFAULT_MAX_MESSAGE_SIZE, MAX_AGENT_BYTES, is_name, is_worker_name, pack_plain
from .records import DISCONNECT_POLICIES, AgentRecord
from .restart import RESET_AFTER, RestartPolicy
from .sockets import AddressError, parse_tcp
from .timeouts import until_done_if_past_max

log = logging.getLogger("pyorchestrate.orchestrator")

#: this process's pid, kept current across forks (``os.getpid`` is a system call: register_agent
#: would pay one per agent to tell a fork of the script from the script)
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class RunMode(enum.Enum):
    """When :meth:`Orchestrator.join` returns."""

    STOP_ON_EMPTY = "stop_on_empty"  #: once every agent has terminated
    DAEMON = "daemon"  #: only after :meth:`Orchestrator.stop`; agents may be added while running


#: the smallest max_message_size accepted: a worker's frames (its reports, error text cut to size
#: and batched, and its registration, ~150 bytes per agent it runs) must fit, or each one over it
#: costs the worker its connection and what the frame carried
MIN_MESSAGE_SIZE = 4 * 1024 * 1024
#: seconds a call (``send``, ``stop_agent``, ``status``, ...) waits for the coordinator's loop to
#: take it; past that it is withdrawn and raises TimeoutError
CALL_TIMEOUT = 30.0


_INF = float("inf")


def _number(results: list, cfg: Any, name: str, minimum: float, *, whole: bool = False, allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    kinds = (int,) if whole else (int, float)
    # not >=: NaN compares false both ways, and a NaN heartbeat_interval was taken; nor infinity,
    # which the protocol does not carry (None says "never" where that is meant)
    if not isinstance(value, kinds) or isinstance(value, bool) or not minimum <= value < _INF:
        kind = "a whole number" if whole else "a number"
        results.append(ValidationResult(name, f"must be {kind} >= {minimum}, got {value!r}"))


class Orchestrator:
    """Runs registered agents on worker nodes and reports what happens to them.

    ``Orchestrator("name", config=Orchestrator.Config(...))``, then :meth:`register_agent`,
    :meth:`register_event`, :meth:`start` and :meth:`join`.  With no ``address`` it starts
    ``local_workers`` worker processes on loopback itself; with an address it waits for
    ``min_workers`` ``pyorchestrate-worker`` processes to join.
    """

    class Config(BaseConfig):
        """The orchestrator's settings.  "Worker" here always means a worker node (process)."""

        #: STOP_ON_EMPTY: ``join()`` returns when all agents terminated; DAEMON: runs until ``stop()``
        run_mode: RunMode = RunMode.STOP_ON_EMPTY
        #: control address workers connect to, e.g. ``tcp://0.0.0.0:5555``; None = embedded local workers
        address: str | None = None
        #: where subscribers connect (``pyorchestrate events --address``); default: address's port + 1
        events_address: str | None = None
        #: worker processes started on loopback when ``address`` is None
        local_workers: int = 1
        #: CPU priority the local workers (and their agents) give up, 0-19 (``pyorchestrate-worker
        #: --nice``): with many of them beside this script, 19 keeps the coordinator served first
        local_worker_nice: int = 0
        #: workers to wait for before placing agents (default: local_workers, or 1 with an address)
        min_workers: int | None = None
        #: seconds to wait for ``min_workers`` before failing the agents
        worker_wait_timeout: float = 30.0
        #: most agents running at once across the cluster (PyOrchestrate's meaning); the rest wait
        #: in a FIFO queue.  None = no cap (PyOrchestrate defaults to 5; a cluster is sized by each
        #: worker's --capacity instead, so we do not cap silently)
        max_workers: int | None = None
        #: seconds between heartbeats, both ways
        heartbeat_interval: float = 1.0
        #: heartbeats a worker may miss before it is declared lost
        heartbeat_liveness: int = 5
        #: seconds ``stop()`` gives agents to finish before it gives up on them
        stop_timeout: float = 10.0
        #: key directory (``pyorchestrate keys init DIR``): CurveZMQ on every port, only admitted
        #: keys get in (worker, reader and admin roles).  None: ``$PYORCHESTRATE_KEYS`` if set, else
        #: no keys (loopback only, unless ``insecure``)
        keys: str | None = None
        #: allow binding a non-loopback address without keys (trusted networks only)
        insecure: bool = False
        #: start a small process beside this script that vouches for it while its coordinator loop
        #: is stalled (a call of the script that holds the GIL for seconds), so its workers' leases
        #: do not run out and stop their agents.  It listens on the port after the bus port (one
        #: the OS picks if ``address``'s port is); without it such a stall stops agents, as before
        coordinator_pulse: bool = True
        #: largest frame accepted from the network, in bytes
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
        #: threads running event callbacks
        callback_threads: int = 10
        #: events that may wait for callbacks; beyond, callbacks of AGENT_LOG, AGENT_EVENT and
        #: AGENT_HEARTBEAT are dropped and counted (``status()["dropped"]["callback_backlog"]``),
        #: lifecycle ones never
        callback_backlog: int = 10_000
        #: hold every agent after READY until ``orchestrator.execute(name)`` (or ``execute()`` for all)
        hold_after_ready: bool = False
        #: recent bus events kept for subscribers that missed some (a gap, a late start, a
        #: stall): bounded by count and by bytes, the oldest go first
        history_max_events: int = 100_000
        history_max_bytes: int = 64 * 1024 * 1024
        #: bus events queued per subscriber before a slow one misses some (which it then
        #: recovers from history, or is told the exact count of)
        subscriber_hwm: int = 100_000
        #: level of the ``pyorchestrate`` logger when the application has not configured logging
        log_level: str = "INFO"
        #: when this script starts on an address workers already know (a coordinator of the same
        #: name ran there before and died): "adopt" agents still running from it whose class and
        #: config are identical, or "replace" them (stopped before the new copy starts)
        on_restart: str = "adopt"
        #: seconds to wait for workers to report agents a previous coordinator started, before
        #: placing anything; None = automatic: 0 for OS-chosen ports and embedded workers (no
        #: previous coordinator can have used them) and after a clean end here; after a crash (the
        #: run marker here says so, or a worker does) a few seconds, longer for agents of which no
        #: copy was reported; a few seconds, not knowing, when there is no run marker here
        adopt_window: float | None = None
        #: seconds an agent with on_disconnect="keep" may stay unreachable (its worker silent)
        #: before it is given up (reported failed, or replaced if it restarts); None = never
        disconnect_timeout: float | None = None
        #: finished agents remembered (status, handles); older ones are forgotten, oldest first
        #: (their events stay in the history)
        finished_agents_max: int = 10_000
        #: seconds a lost or departed worker's record is kept (for status) before it is dropped
        worker_retention: float = 300.0

        def validate(self) -> list[ValidationResult]:
            results = super().validate()
            if not isinstance(self.run_mode, RunMode):
                results.append(ValidationResult("run_mode", "must be RunMode.STOP_ON_EMPTY or RunMode.DAEMON"))
            for name in ("address", "events_address"):
                value = getattr(self, name)
                if value is not None:
                    try:
                        parse_tcp(value)
                    except AddressError as exc:
                        results.append(ValidationResult(name, str(exc)))
            _number(results, self, "local_workers", 0, whole=True)
            try:
                check_nice(self.local_worker_nice)
            except ValueError as exc:
                results.append(ValidationResult("local_worker_nice", str(exc)))
            _number(results, self, "min_workers", 0, whole=True, allow_none=True)
            _number(results, self, "max_workers", 1, whole=True, allow_none=True)
            _number(results, self, "worker_wait_timeout", 0)
            _number(results, self, "heartbeat_interval", 0.01)
            _number(results, self, "heartbeat_liveness", 2, whole=True)
            _number(results, self, "stop_timeout", 0)
            _number(results, self, "max_message_size", MIN_MESSAGE_SIZE, whole=True)
            _number(results, self, "callback_threads", 1, whole=True)
            _number(results, self, "callback_backlog", 1, whole=True)
            _number(results, self, "history_max_events", 0, whole=True)
            _number(results, self, "history_max_bytes", 0, whole=True)
            _number(results, self, "subscriber_hwm", 1, whole=True)
            _number(results, self, "adopt_window", 0, allow_none=True)
            _number(results, self, "disconnect_timeout", 0, allow_none=True)
            _number(results, self, "finished_agents_max", 0, whole=True)
            _number(results, self, "worker_retention", 0)
            if self.on_restart not in ("adopt", "replace"):
                results.append(ValidationResult("on_restart", f"must be 'adopt' or 'replace', got {self.on_restart!r}"))
            if self.address is not None:
                # set on the instance, and ignored: a script that asked for local workers beside an
                # address waited (30 s) for workers nobody started, and only said how many it waited for
                for name in ("local_workers", "local_worker_nice"):
                    if name in vars(self):
                        results.append(ValidationResult(
                            name, f"is ignored with an address: this script starts no workers then; start them "
                                  f"with pyorchestrate-worker --coordinator {self.address} (or leave address unset "
                                  "for local ones)", ValidationSeverity.WARNING))
            if self.address is None and self.local_workers == 0 and (self.min_workers or 0) > 0:
                results.append(ValidationResult(
                    "local_workers", "is 0 and no address is set: no worker could ever join; set address or local_workers"))
            if str(self.log_level).upper() not in logging._nameToLevel:
                results.append(ValidationResult("log_level", f"unknown level {self.log_level!r}", ValidationSeverity.WARNING))
            return results

    #: the orchestrator's own plugins: initialized at start(), finalized at shutdown
    Plugin = plugins.Plugins

    config: Config

    def __init__(self, name: str = "Orchestrator", config: BaseConfig | None = None, **overrides: Any) -> None:
        if isinstance(name, BaseConfig) and config is None:  # Orchestrator(MyConfig()) also works
            name, config = "Orchestrator", name
        if config is None:
            config = type(self).Config(**overrides)
        elif overrides:
            raise TypeError("pass settings either in config= or as keyword arguments, not both")
        if not isinstance(config, BaseConfig):
            raise TypeError(f"config must be an Orchestrator.Config, got {type(config).__name__}")
        self.name = name
        self.config = config
        self.logger = log
        self._agents: dict[str, AgentRecord] = {}
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._classes: dict[tuple[type, type], tuple[str, bytes, str]] = {}  # -> id, pickle, fingerprint
        # classes register_agent has checked -> one-shot? (issubclass on an ABC is a Python-level
        # check: once per class, not once per agent)
        self._agent_classes: dict[type, bool] = {}
        # (agent class, Config class) -> findings, config blob, definition of a default Config
        self._defaults: dict[tuple[type, type], tuple[list[ValidationResult], bytes, str]] = {}
        self._dispatcher = EventDispatcher(getattr(config, "callback_threads", 10))
        self._dispatcher.max_backlog = getattr(config, "callback_backlog", MAX_BACKLOG)
        self._finished = threading.Event()
        # set (under _lock) by the coordinator's loop as it ends the run, once no registration
        # waits in its mailbox: from then on register_agent raises (see _close_adds)
        self._adds_closed = False
        self._stop_asked = False  # stop() was called (so the run did not end by itself)
        self._started = False
        self._shut = False
        self._pid = 0  #: the process that started it (a fork of it cannot drive it: _in_a_fork)
        self._coordinator: Coordinator | None = None
        self._local = LocalWorkers()
        self._states = AgentStates()
        self.plugin = plugins.PluginSet(type(self).Plugin.declared())

    # ------------------------------------------------------------------ registration

    def register_agent(
        self,
        agent_class: type,
        name: str | None = None,
        custom_config: BaseConfig | None = None,
        *,
        worker: str | None = None,
        labels: dict[str, str] | None = None,
        depends_on: list[str] | None = None,
        restart: str = "never",
        max_restarts: int = 10,
        restart_backoff: tuple[float, float] = (0.5, 30.0),
        restart_reset: float | None = RESET_AFTER,
        custom_plugin: Any = None,
        on_disconnect: str | None = None,
    ) -> str:
        """Register ``agent_class`` to run under ``name`` (default: the class name).

        Placement: ``worker`` pins it to the worker of that name; ``labels`` requires a worker
        started with matching ``--labels``; otherwise the least-loaded worker with room takes it.
        ``depends_on`` names agents that must be READY first (Looping/Periodic agents) or have
        finished without error (one-shot agents, e.g. a migration).
        ``restart`` is "never", "on-failure" (errors, crashed processes, lost workers) or "always",
        at most ``max_restarts`` times in a row (-1: no limit), waiting ``restart_backoff`` =
        (initial, max) seconds, doubling with jitter; a run that lasts ``restart_reset`` seconds
        (default 600) starts both over (None: they count over the agent's life).
        ``custom_plugin`` (a ``Plugin`` class) replaces the agent's default plugins.

        ``on_disconnect`` says what happens when the agent's worker falls silent (a partition, a
        hung host): "replace" (the default when ``restart`` is not "never") - the worker stops the
        agent once its lease runs out and a replacement starts elsewhere only after that, so two
        copies never run at once; "keep" (the default for ``restart="never"``) - the copy keeps
        running, is reported AGENT_DISCONNECTED, and is taken back (AGENT_ADOPTED) when its worker
        returns, never started a second time.

        The config is validated here (an ERROR raises :class:`ConfigValidationError`) and the class
        is pickled here, so mistakes surface before anything is sent (class and config together
        over ``protocol.MAX_AGENT_BYTES``, 32 MiB, raise ``ValueError``).  After :meth:`start` the
        agent is scheduled right away.  Returns the agent's name.
        """
        if trace.enabled:
            trace.mark("register", name or getattr(agent_class, "__name__", "?"))
        try:
            one_shot = self._agent_classes.get(agent_class)  # checked once per class: S3 registers thousands
            checked = one_shot is not None
        except TypeError:  # unhashable: certainly not an agent class, said below
            checked = False
        if not checked:
            if not (inspect.isclass(agent_class) and issubclass(agent_class, BaseAgent) and agent_class.execution_mode):
                raise TypeError(f"{agent_class!r} is not an agent class: subclass one of pyorchestrate's agents, "
                                "e.g. BaseThreadAgent or PeriodicProcessAgent")
            if inspect.isabstract(agent_class):
                missing = ", ".join(sorted(agent_class.__abstractmethods__))
                raise TypeError(f"{agent_class.__qualname__} cannot run: implement {missing}()")
            plugins.resolve(agent_class.Plugin, None)  # a class whose Plugin is broken fails here
            one_shot = self._agent_classes[agent_class] = not issubclass(agent_class, LoopingAgent)
        name = agent_class.__name__ if name is None else name
        if not isinstance(name, str) or not is_name(name):
            raise ValueError(f"agent name {name!r} must be a non-empty string of printable characters "
                             "without spaces")
        config = custom_config if custom_config is not None else agent_class.Config()
        if not isinstance(config, BaseConfig):
            raise TypeError(f"custom_config for {name!r} must be a Config instance (e.g. {agent_class.__name__}.Config(...)), "
                            f"got {type(config).__name__}")
        if not isinstance(config, agent_class.Config):
            # another agent's Config: accepted, the agent failed on its worker reading a setting
            # the config did not have (AttributeError), unless it has them all (duck-typed)
            missing = config_missing(agent_class.Config, config)
            if missing:
                raise TypeError(f"custom_config for {name!r} is a {type(config).__qualname__}, without "
                                f"{agent_class.__name__}.Config's {', '.join(missing)}: pass "
                                f"{agent_class.__name__}.Config(...)")
        if worker is not None and (not isinstance(worker, str) or not worker):
            raise TypeError(f"worker= must be a worker name, got {worker!r}")
        if labels and not isinstance(labels, Mapping):  # dict("gpu") said "sequence element #0 has length 1"
            raise TypeError(f"labels= must map strings to strings (as given to --labels), got {labels!r}")
        labels = dict(labels) if labels else {}
        if labels and not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise TypeError(f"labels= must map strings to strings (as given to --labels), got {labels!r}")
        depends_on = _names(depends_on, "depends_on")
        policy = _restart_policy(restart, max_restarts, restart_backoff, restart_reset)
        if on_disconnect is not None and on_disconnect not in DISCONNECT_POLICIES:
            raise ValueError(f"on_disconnect={on_disconnect!r}: use 'replace' or 'keep' (or leave it out)")
        if custom_plugin is not None:
            plugins.resolve(agent_class.Plugin, custom_plugin)  # a wrong kind of plugin fails here
        key = (agent_class, type(config))
        # a Config with nothing set on the instance, checked only by our own validate(), gives the
        # same findings and the same bytes every time: worked out once per class (S3 registers
        # thousands of such agents; checking, pickling and hashing were half of registering one)
        default = custom_plugin is None and not vars(config) and checks_are_ours(type(config))
        known = self._defaults.get(key) if default else None
        if known is None:
            findings = config.check(f"agent {name!r}")
            if key not in self._classes:
                self._classes[key] = (*shipping.pack_class(agent_class, type(config)),
                                      shipping.class_fingerprint(agent_class, type(config)))
            fingerprint = self._classes[key][2]
            config_blob = shipping.pack_config(config, name, custom_plugin)
            # what a restarted coordinator compares before adopting a running copy: class and config
            definition = hashlib.blake2b(fingerprint.encode() + b"\0" + config_blob, digest_size=16).hexdigest()
            known = (findings, config_blob, definition)
            if default:
                self._defaults[key] = known
        findings, config_blob, definition = known
        for finding in findings:
            log.warning("agent %s config: %s", name, finding)
        class_id, class_blob, _ = self._classes[key]
        if len(class_blob) + len(config_blob) > MAX_AGENT_BYTES:
            raise ValueError(
                f"agent {name!r}: its class and config pickle to {_mib(len(class_blob) + len(config_blob))}, over the "
                f"{_mib(MAX_AGENT_BYTES)} an agent's start may take on the wire; pass bulky data another way "
                f"(a file, a URL, a database) and let the agent load it")
        record = AgentRecord(name=name, agent_class=agent_class, config=config, class_id=class_id,
                             class_blob=class_blob, config_blob=config_blob,
                             mode=agent_class.execution_mode, pin=worker, labels=labels,
                             depends_on=depends_on, policy=policy, on_disconnect=on_disconnect,
                             definition=definition, stop_timeout=_wire_seconds(getattr(config, "stop_timeout", 10.0)),
                             one_shot=one_shot)
        with self._lock:
            if name in self._names:
                raise ValueError(f"an agent named {name!r} is already registered; pick another name")
            if self._finished.is_set() or self._adds_closed:
                raise RuntimeError(self._ended_message())
            self._names.add(name)
            started = self._coordinator is not None
            if not started:
                self._agents[name] = record
        if started:
            if self._pid != _pid:
                self._refuse_in_a_fork("register_agent")
            # checked here, against the names registered so far, so adding needs no round trip
            # through the coordinator's loop (one would cost more than the rest of registering)
            try:
                if depends_on:  # with none, nothing to check
                    check_graph({name: depends_on, **{d: [] for d in depends_on if d in self._names and d != name}})
            except ValueError:
                with self._lock:
                    self._names.discard(name)
                raise
            assert self._coordinator is not None
            with self._lock:
                # (the run may have ended since the check above: put after that, it was never
                # taken, and register_agent returned for an agent that never ran)
                if self._adds_closed or self._finished.is_set():
                    self._names.discard(name)
                    raise RuntimeError(self._ended_message())
                self._coordinator.mailbox.put((cmd.AddAgent(record), None))
            if trace.enabled:  # in the mailbox, its owner woken: as the prototypes mark it
                trace.mark("queued", name)
        return name

    def _ended_message(self) -> str:
        if self.config.run_mode is RunMode.STOP_ON_EMPTY and not self._stop_asked:
            return ("this orchestrator's run has ended: every agent had terminated (RunMode.STOP_ON_EMPTY). "
                    "Create a new orchestrator, or use RunMode.DAEMON to add agents as others end "
                    "(from a callback, say) and call stop() when done")
        return "this orchestrator has finished; create a new one"

    def _close_adds(self) -> bool:
        """From the coordinator's loop, as it is about to end the run: False if a registration
        waits in its mailbox (the run goes on: the loop takes it next); else no registration is
        taken from now on, and True."""
        assert self._coordinator is not None
        with self._lock:
            if self._coordinator.mailbox.holds(lambda item: isinstance(item[0], cmd.AddAgent)):
                return False
            self._adds_closed = True
            return True

    def add_dependency(self, agent_name: str, deps: list[str]) -> None:
        """``agent_name`` starts only after every agent in ``deps`` is READY (or finished cleanly).

        Checked at :meth:`start` (or at once, after it): a cycle or an unknown agent raises
        ``ValueError`` naming them.  If a dependency fails for good, ``agent_name`` does not start
        and gets AGENT_ERROR "dependency <x> failed".
        """
        deps = _names(deps, "deps")
        if self._coordinator is not None:
            self._call(cmd.AddDependency(agent_name, deps))
            return
        record = self._agents.get(agent_name)
        if record is None:
            raise ValueError(f"unknown agent {agent_name!r}: register it before adding its dependencies")
        record.depends_on = list(dict.fromkeys(record.depends_on + deps))

    # ------------------------------------------------------------------ runtime control

    def start_agent(self, name: str) -> None:
        """Start a terminated agent again (its restart count starts over)."""
        self._call(cmd.StartAgent(name))

    def _stop_timeout(self, timeout: Any) -> float:
        """``timeout`` (None: Config.stop_timeout) as seconds, or a clear error (the Config's was
        checked at start; a policy that ignores errors let a bad one by, and stop() must not fail)."""
        return _wire_seconds(self.config.stop_timeout) if timeout is None else _seconds(timeout, "timeout")

    def stop_agent(self, name: str, timeout: float | None = None) -> None:
        """Stop one agent; it is not restarted, whatever its policy."""
        self._call(cmd.StopAgent(name, self._stop_timeout(timeout)))

    def restart_agent(self, name: str, timeout: float | None = None) -> None:
        """Stop an agent and start it again (not counted against ``max_restarts``)."""
        self._call(cmd.RestartAgent(name, self._stop_timeout(timeout)))

    def agent(self, name: str) -> AgentHandle:
        """A handle on a registered agent: ``state``, ``worker``, ``wait_ready(timeout)``,
        ``wait_closed(timeout)``, ``execute()``, ``stop()``."""
        if name not in self._names:
            known = ", ".join(sorted(self._names)) or "none"
            raise ValueError(f"unknown agent {name!r} (registered: {known})")
        return AgentHandle(self, name, self._states)

    def execute(self, name: str | None = None) -> None:
        """Let agents held after READY (``Config(hold_after_ready=True)``) do their work: the one
        named, or every running one."""
        self._call(cmd.Execute(name))

    def trigger(self, name: str, payload: Any = None) -> None:
        """Trigger a Triggered agent: its ``execute(payload)`` runs (an EventDriven one gets it as
        a message).  ``payload`` must be msgpack-able (numbers, strings, bytes, lists, dicts), at
        most 32 MiB packed.  Like :meth:`send`, it waits in the agent's inbox (bounded by
        ``Config.inbox_max``).  ValueError for an agent of another kind (nothing would read it)."""
        self._call(cmd.Deliver(name, "trigger", _plain(payload, "trigger")))

    def send(self, name: str, payload: Any) -> None:
        """Send a message to an EventDriven agent: its ``on_event`` gets an event ``"MESSAGE"``
        with this ``payload`` (msgpack-able, at most 32 MiB packed).  Returns once it is on its
        way; it waits in the agent's inbox, where past the agent's ``Config.inbox_max`` messages
        (default 10,000) the newest are dropped and counted (``status()["dropped"]``).  ValueError
        for an agent of another kind (nothing would read it; a Triggered one takes :meth:`trigger`)."""
        self._call(cmd.Deliver(name, "message", _plain(payload, "send")))

    def drain_worker(self, name: str) -> None:
        """Send no new agents to worker ``name``, move its restartable agents elsewhere, let the
        others finish, then release it (WORKER_LEFT)."""
        self._call(cmd.DrainWorker(name))

    def _in_a_fork(self) -> bool:
        """Is this a fork of the process that started it (``os.fork``, a ``fork`` multiprocessing
        child)?  A fork has none of its threads: nothing it asks would ever be done."""
        return self._pid != _pid and self._started

    def _refuse_in_a_fork(self, what: str) -> None:
        raise RuntimeError(f"{what}: orchestrator {self.name!r} runs in process {self._pid}; this process ({_pid}) "
                           "is a fork of it, which cannot drive it (it has none of its threads). From here, use "
                           "pyorchestrate.ControlClient on its address, or an Orchestrator of this process's own")

    def _call(self, command: cmd.Command) -> Any:
        """Run a command on the coordinator's loop and return its result (or raise its error);
        TimeoutError if the loop did not take it within :data:`CALL_TIMEOUT` seconds (then it
        is not done)."""
        timeout = CALL_TIMEOUT
        if self._coordinator is None:
            raise RuntimeError(f"{type(command).__name__}: call start() first")
        if self._in_a_fork():
            self._refuse_in_a_fork(type(command).__name__)
        if self._shut:
            raise RuntimeError("this orchestrator has shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._coordinator.mailbox.put((command, future), query=isinstance(command, cmd.Snapshot)):
            # shut down since the check above: nothing would ever take it
            raise RuntimeError("this orchestrator has shut down")
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            # withdrawn, so a timeout means "not done": the loop skips a cancelled command. Left
            # queued, it was done later all the same, and a send retried after the TimeoutError
            # was delivered twice (28 of 200 sends timed out at a 1 us timeout; 200 delivered)
            if not future.cancel():
                return future.result()  # the loop took it meanwhile: done, or being done now
            raise TimeoutError(f"{type(command).__name__}: the coordinator's loop did not take it within {timeout:g} s "
                               "(its process was stopped, or is overloaded): it was not done and will not be; "
                               "call again") from None

    def register_event(self, event: OrchestratorEvent, callback: Callable[..., Any]) -> None:
        """Call ``callback`` on every ``event``, with the keyword arguments it accepts.

        Callbacks run on a bounded thread pool; one that raises is logged and does not affect
        the others.  Common fields: ``event``, ``event_date``, ``event_time``, ``seq``,
        ``agent_name``, ``worker``, ``host``; AGENT_ERROR adds ``error_message`` and ``traceback``.
        """
        self._dispatcher.register(event, callback)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Bind, start local workers if needed, and begin placing agents.  Returns at once."""
        if self._started:
            raise RuntimeError("this orchestrator was already started")
        findings = self.config.check(f"orchestrator {self.name!r}")
        check_graph({n: r.depends_on for n, r in self._agents.items()})
        _default_logging(self.config.log_level)
        for finding in findings:  # a typo (adress=...) must not go unsaid: the run would differ
            log.warning("orchestrator %s config: %s", self.name, finding)
        cfg = self.config
        embedded = cfg.address is None
        min_workers = cfg.min_workers if cfg.min_workers is not None else (cfg.local_workers if embedded else 1)
        coordinator = Coordinator(self.name, cfg, self._dispatcher, self._finished.set, self._states.update_many,
                                  self._forget, min_workers, self._close_adds)
        coordinator.bind(cfg.address or "tcp://127.0.0.1:*", cfg.events_address)
        self._pid = _pid  # before the coordinator is there to be used (register_agent checks it)
        self._coordinator = coordinator
        self._started = True
        self.plugin.initialize(self, _log_plugin_failure)
        log.info("orchestrator %s: control %s, events %s (subscribe with: pyorchestrate events --address %s)",
                 self.name, coordinator.address, coordinator.events_address, coordinator.events_address)
        coordinator.start(list(self._agents.values()), embedded)
        self._agents.clear()  # the core owns them now
        _stop_at_exit(self)
        if embedded and cfg.local_workers:
            # they share our terminal: their agents' log lines reach it once, through the bus and
            # our logging; the workers themselves only add warnings
            key_options: list[str] = []
            if coordinator.keydir is not None:
                # a worker key of the directory (its first, if it holds several): they run here, as we do
                held = coordinator.keydir.held("worker")
                key_options = ["--keys", str(coordinator.keydir.path), *(["--key-name", held[0]] if held else [])]
            prefix = "".join(c if is_worker_name(c) else "_" for c in self.name)  # (pyorchestrate-worker --name)
            self._local.start(cfg.local_workers, coordinator.address, prefix, "WARNING",
                              key_options, nice=cfg.local_worker_nice)
        elif not embedded:
            log.info("waiting for %d worker(s): pyorchestrate-worker --coordinator %s", coordinator.min_workers,
                     coordinator.address)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the run is over (STOP_ON_EMPTY: every agent terminated; DAEMON: ``stop()``).

        Returns False if ``timeout`` passed first.  Raises :class:`WorkerWaitTimeout` if too few
        workers ever joined.  Ctrl-C stops the agents, then re-raises.
        """
        if not self._started:
            raise RuntimeError("call start() before join()")
        if self._in_a_fork():
            self._refuse_in_a_fork("join")  # it would wait for ever: nothing here ends the run
        if self._coordinator is not None and not self._finished.is_set():
            self._coordinator.mailbox.put((cmd.Join(), None))
        try:
            if not self._finished.wait(until_done_if_past_max(timeout)):
                return False
        except KeyboardInterrupt:
            log.warning("interrupted: stopping agents")
            self.stop()
            raise
        self._shutdown()
        error = self._coordinator.start_error if self._coordinator else None
        if error:
            raise WorkerWaitTimeout(error)
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Stop every agent (each finishes its current iteration), then shut down.  May be called
        from a callback (it waits for the other callbacks, not for its own)."""
        if not self._started or self._coordinator is None:
            return
        if self._in_a_fork():
            # it would wait for a loop that is not in this process: a fork that exited waited 22 s
            # in its atexit hook, saying it was stopping the script's agents
            log.warning("orchestrator %s: stop() in process %d, a fork of the process running it (%d), does "
                        "nothing: only that process can stop it", self.name, _pid, self._pid)
            return
        self._stop_asked = True
        if not self._finished.is_set():
            timeout = self._stop_timeout(timeout)
            self._coordinator.mailbox.put((cmd.RequestStop(), None))
            self._coordinator.mailbox.put((cmd.StopAll(float(timeout)), None))
            limits = Limits(self.config.heartbeat_interval, self.config.heartbeat_liveness)
            if not self._finished.wait(limits.stop_wait(timeout)):
                log.error("agents did not all stop in time; shutting down anyway")
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
            self._finished.set()
        assert self._coordinator is not None
        self._dispatcher.wait_idle(10.0)
        self._coordinator.mailbox.put((cmd.Close(), None))
        self._coordinator.join_thread(10.0)
        LOG_THREAD.flush(1.0)  # the loop's last lines are written when stop() returns (if the stream takes them)
        self._local.stop()
        self.plugin.finalize(_log_plugin_failure)
        self._dispatcher.close()

    def __enter__(self) -> "Orchestrator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ information

    @property
    def address(self) -> str:
        """The control address actually bound (after :meth:`start`)."""
        return self._coordinator.address if self._coordinator else ""

    @property
    def events_address(self) -> str:
        """The event bus address subscribers connect to (after :meth:`start`)."""
        return self._coordinator.events_address if self._coordinator else ""

    def status(self) -> dict[str, Any]:
        """Plain data, ready for JSON: ``agents`` (name, state, worker, restarts, last_error,
        started_at, pending_reason, ...) and ``workers`` (name, host, pid, labels, capacity, running
        agents, seconds since the last heartbeat, ...), plus drop counters."""
        if self._coordinator is None:
            return {"agents": {n: {"name": n, "state": "REGISTERED"} for n in self._agents}, "workers": {},
                    "dropped": {}}
        if self._shut:
            return snapshots.expand(self._coordinator.final_snapshot or {})
        return snapshots.expand(self._call(cmd.Snapshot()))

    def _forget(self, name: str) -> None:
        """The core forgot a finished agent (finished_agents_max): its name may be used again."""
        with self._lock:
            self._names.discard(name)
        self._states.forget(name)


def _log_plugin_failure(name: str, exc: BaseException) -> None:
    log.error("orchestrator plugin %s failed: %s: %s", name, type(exc).__name__, exc)


def _plain(payload: Any, what: str) -> Any:
    packed = pack_plain(payload, f"{what}: payload {type(payload).__name__} cannot travel to an agent")
    if len(packed) > MAX_AGENT_BYTES:  # sent on, it cost the worker its connection: a false death
        raise ValueError(f"{what}: the payload packs to {_mib(len(packed))}, over the {_mib(MAX_AGENT_BYTES)} one "
                         f"payload may take on the wire; send a reference to it (a file, a URL) instead")
    return payload


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@functools.lru_cache(maxsize=64, typed=True)  # typed: max_restarts=True is refused, 1 is not
def _cached_policy(restart: Any, max_restarts: Any, backoff: tuple, reset: Any) -> RestartPolicy:
    return RestartPolicy.build(restart, max_restarts, backoff, reset)


def _restart_policy(restart: Any, max_restarts: Any, backoff: Any, reset: Any) -> RestartPolicy:
    """``RestartPolicy.build``, once per distinct arguments (a policy is immutable); a mistake
    raises as it would (lru_cache keeps no exceptions)."""
    try:
        hash((restart, max_restarts, backoff, reset))
    except TypeError:  # e.g. restart_backoff as a list: built, not cached
        return RestartPolicy.build(restart, max_restarts, backoff, reset)
    return _cached_policy(restart, max_restarts, backoff, reset)


def _seconds(value: Any, what: str) -> float:
    """A number of seconds >= 0, or a clear error (a timeout of -1 stopped at once: a process
    agent terminated, a thread agent said stuck; "5" said "could not convert string to float")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < _INF:
        raise ValueError(f"{what}={value!r}: use a number of seconds >= 0")
    return float(value)


def _wire_seconds(value: Any) -> float:
    """An agent's stop timeout as it travels: validation refuses NaN and infinity, but a Config
    whose policy ignores errors lets them by, and the protocol drops a frame carrying one (a stop
    with it would never arrive). Infinity: 10**9 s; NaN, negative or not a number: the default 10 s."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 10.0
    return min(value, 1e9) if value >= 0 else 10.0


def _names(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a list of agent names, got {value!r}")
    return list(value)


_running: "weakref.WeakSet[Orchestrator]" = weakref.WeakSet()
_hooks_installed = False


def _stop_at_exit(orchestrator: Orchestrator) -> None:
    """A script that ends without stop() - an uncaught exception, Ctrl-C outside join(), SIGTERM,
    the end of the file - stops its agents the way stop() does, so none is left running on the
    workers to be confused with the next script's.  (A SIGKILLed script cannot: the next one
    adopts or replaces its agents.)"""
    global _hooks_installed
    _running.add(orchestrator)
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_stop_all_running)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM's default ends the process at once, without atexit: turn it into SystemExit,
        # which unwinds the script (finally blocks run) and then runs the exit hook above
        signal.signal(signal.SIGTERM, _exit_on_signal)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop_all_running() -> None:
    for orchestrator in list(_running):
        if orchestrator._in_a_fork():
            continue  # a fork of the script is exiting, not the script
        if orchestrator._started and not orchestrator._shut:
            log.warning("orchestrator %s: the script is exiting without stop(); stopping its agents", orchestrator.name)
            try:
                orchestrator.stop()
            except Exception:  # at exit, say what went wrong and carry on with the others
                log.exception("orchestrator %s: stopping at exit failed", orchestrator.name)


def _default_logging(level: str) -> None:
    """Show our INFO messages when the application has not set up logging itself."""
    ours = logging.getLogger("pyorchestrate")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(str(level).upper())
