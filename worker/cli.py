"""``pyorchestrate-worker``: run agents for a coordinator."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pyorchestrate import fd_limit, protocol, sockets, trace
from pyorchestrate.keys import KeysError
from pyorchestrate.limits import ORPHAN_TIMEOUT
from pyorchestrate.log_thread import EXIT_WAIT, LOG_THREAD, QueuedHandler
from pyorchestrate.versions import local_versions

from . import agent_logs, crowd, group_guard, init, priority, stack_dump, std_fds, stop_signals
from .node import THREADS_PER_PROCESS, Worker


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"label {item!r} is not of the form key=value (e.g. --labels gpu=1,zone=a)")
        labels[key.strip()] = value.strip()
    return labels


def _count(text: str, what: str = "count", zero: str = "0 = no limit") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{what} must be >= 0 ({zero})")
    return value


def _capacity(text: str) -> int:
    return _count(text, "capacity")


def _threads(text: str) -> int:
    return _count(text, "threads per process", "0 = all in the worker's process")


def _nice(text: str) -> int:
    try:
        return priority.check(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if text.lstrip("-").isdigit() else
                                         f"nice {text!r} is not a whole number from 0 to {priority.MAX_NICE}") from None


def _address(text: str) -> str:
    try:
        _, port = sockets.parse_tcp(text)
    except sockets.AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if port in ("*", "0"):  # it retried connecting to port 0 for ever
        raise argparse.ArgumentTypeError(f"{text!r}: a worker connects to the port its coordinator listens on; "
                                         "give that number")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):  # -5 stopped kept agents the moment a coordinator went away
        raise argparse.ArgumentTypeError(f"{text!r}: use a number of seconds >= 0 (0 = never)")
    return value


def _name(text: str) -> str:
    if not protocol.is_worker_name(text):  # '' took HOSTNAME-PID, silently
        raise argparse.ArgumentTypeError(f"{text!r}: a worker's name is printable characters without spaces or '/' "
                                         "(on the bus, '/' separates it from its agents' names)")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyorchestrate-worker",
        description="Run pyorchestrate agents for a coordinator. Waits (retrying with backoff) until the "
                    "coordinator is there, serves one coordinator script after another, and stops its agents "
                    "gracefully on SIGTERM.",
    )
    p.add_argument("--coordinator", required=True, type=_address, metavar="tcp://HOST:PORT",
                   help="the coordinator's control address (Orchestrator.Config.address)")
    p.add_argument("--name", type=_name,
                   help="this worker's name, unique in the cluster: printable characters without spaces or '/' "
                        "(default: HOSTNAME-PID)")
    p.add_argument("--labels", type=_labels, default={}, metavar="k=v,...",
                   help="labels reported at registration, e.g. gpu=1,zone=a")
    p.add_argument("--capacity", type=_capacity, default=0, metavar="N",
                   help="most agents this worker runs at once, reported at registration (0 = no limit)")
    p.add_argument("--orphan-timeout", type=_seconds, default=ORPHAN_TIMEOUT, metavar="SECONDS",
                   help="stop this worker's agents after SECONDS without a coordinator (0 = never; default 60)")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="key directory (pyorchestrate keys init/export): connect with CurveZMQ using this host's "
                        "worker key, and only to the coordinator whose public key DIR holds (default: "
                        "$PYORCHESTRATE_KEYS; none: no keys)")
    p.add_argument("--key-name", metavar="NAME", default=None,
                   help="which worker key in DIR, if it holds several (default: $PYORCHESTRATE_KEY_NAME)")
    p.add_argument("--pulse", choices=["auto", "always", "never"], default="auto",
                   help="a small process that tells the coordinator this worker is alive when its own loop "
                        "cannot (GIL starvation): auto = once it runs 500 agents; always = agents in C code that "
                        "holds the GIL for seconds; never")
    p.add_argument("--threads-per-process", type=_threads, default=THREADS_PER_PROCESS, metavar="N",
                   help="thread agents run in this worker's process up to N at once; more run in agent host "
                        "processes of up to N each, so no process holds more threads than CPython serves well "
                        f"(default {THREADS_PER_PROCESS}; 0 = all in this process)")
    p.add_argument("--nice", type=_nice, default=0, metavar="N",
                   help="lower this worker's CPU priority (and its agents') by N, 0-19, so a coordinator on the "
                        "same machine is served first; a worker that leads its session (setsid) lowers the "
                        "session's too (Linux autogroup). Many workers beside their coordinator: 19 (default 0)")
    p.add_argument("--agent-logs", choices=["print", "bus"], default="print",
                   help="print: agents' log lines go to this worker's stderr and the bus; bus: only to the bus "
                        "(an embedded worker: its coordinator prints them, once)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # embedded workers exit with their coordinator
    p.add_argument("--version", action="version",
                   version="pyorchestrate-worker " + " ".join(f"{k}={v}" for k, v in local_versions().items()))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    name = args.name
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(args.log_level)  # the level is the handler's: agents' INFO records still reach the bus
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s [worker {name or ''}] %(name)s: %(message)s".replace("[worker ]", "[worker]")))
    if args.agent_logs == "bus":
        agent_logs.bus_only(handler)
    root = logging.getLogger()
    # written by a thread of its own: a stderr that takes no data must not stop this worker's loop
    # (its coordinator would take it for lost while its agents ran on) nor its agents
    root.addHandler(QueuedHandler(handler))
    root.setLevel(min(logging.getLevelName(args.log_level), logging.INFO))
    # a process agent takes about four descriptors, a connection one (fd_limit.py)
    fd_limit.raise_open_files_limit(f"worker {name or ''}".strip())
    for done in priority.lower(args.nice):  # first: whatever this worker starts inherits it
        logging.getLogger("pyorchestrate.worker").info("priority lowered: %s", done)
    try:
        worker = Worker(args.coordinator, name=name, labels=args.labels, capacity=args.capacity,
                        parent_pid=args.parent_pid, orphan_timeout=args.orphan_timeout, keys=args.keys,
                        key_name=args.key_name, pulse=args.pulse, threads_per_process=args.threads_per_process)
    except KeysError as exc:
        print(f"pyorchestrate-worker: {exc}", file=sys.stderr)
        return 2

    # never Event.set() in a handler: see there
    stop_signals.request_on_signals(worker.request_shutdown, force=worker.exit_now)
    # started as a background job of a shell, the whole worker was stopped (SIGTTIN) the moment one
    # agent read the terminal (input(), a breakpoint() left in, a library asking for a password):
    # its coordinator took it for lost and every agent of it moved.  Ignored, such a read fails
    # (EIO) in that agent alone; in the foreground, reading the terminal works as before
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # writing to it with `stty tostop` set, likewise
    # SIGUSR1 prints every thread's stack to stderr, the worker going on: what a worker that seems
    # stuck is doing, without stopping it (the test suite asks a worker that ignored SIGTERM)
    stack_dump.register()
    crowd.settle()  # our own process: its code loaded, tune the collector (crowd.py)
    group_guard.start()  # what thread agents start ends with this process (group_guard.py)
    return worker.run()


def entry(argv: list[str] | None = None) -> None:
    """The command: ``main``, then the process ends without the interpreter's teardown, which
    waits for every non-daemon thread. A thread an agent started (or a thread agent stuck past its
    stop) would keep a stopped worker alive for ever, still doing that agent's work after the
    coordinator has replaced it. So is an error of ours that escapes ``main``: logged, exit 1
    (it ended in that teardown, and a non-daemon thread kept the broken worker alive for ever)."""
    std_fds.ensure_open()  # first: what is opened next must not take 0, 1 or 2 (std_fds.py)
    init.reap_if_init()  # PID 1 (a container's only process) reaps; the worker runs in a child
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors and --help, as sys.exit would
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:  # before the stop signals were ours
        code = 130
    except BaseException:  # noqa: BLE001 - whatever it is, the process must end
        logging.getLogger("pyorchestrate.worker").critical("worker failed", exc_info=True)
        code = 1
    # its agents have stopped (or are given up on): what thread agents started goes with them
    group_guard.end_members(1.0, "stops")
    trace.write()  # what atexit would have done (os._exit skips it): --trace's worker hops
    if LOG_THREAD.flush(EXIT_WAIT):  # else stderr takes nothing: flushing it would wait for ever
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
