"""Entry point of a process agent's child process (started by the worker's forkserver).

Lifecycle events go back to the worker over a pipe as msgpack; a stop request comes the other
way.  If the worker dies, the pipe closes and this process ends at once (see worker_gone).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import msgpack

from pyorchestrate import publisher, shipping
from pyorchestrate.events import stamp
from pyorchestrate.log_thread import EXIT_WAIT, LOG_THREAD, QueuedHandler

from . import agent_logs, stack_dump, stop_signals
from .errors import error_fields
from .lease_guard import LeaseGuard
from .pulse import process_stat

BUS = "_BUS"  # a pipe message that is a bus event, not a report
WORKER_GONE = 70  #: the exit status of a child process whose worker died (see worker_gone)


#: seconds the processes an agent left behind get, after a SIGTERM, before a SIGKILL
STRAY_GRACE = 1.0

_own_group = False  # this process leads a process group of its own (see leave_the_worker_group)
_worker_pid = 0  # the worker this process runs agents for (see end_strays)
_stop_by: float | None = None  # when the agent, asked to stop, must be gone (monotonic; see stopping)


def stopping(seconds_left: float | None) -> None:
    """The agent is asked to stop, and must be gone, with what it started, ``seconds_left`` from
    now (its stop timeout, less what has passed since the stop: a lease's counts from its end)."""
    global _stop_by
    if seconds_left is not None and _stop_by is None:
        _stop_by = time.monotonic() + seconds_left


def worker_gone() -> None:
    """The worker's end of our pipe closed: it closes it only once we have exited, so it died.  Its
    connection to the coordinator closed with it, which the coordinator takes for certain: the
    worker's agents are gone and are started elsewhere at once.  So they must be gone: asked to
    stop instead, an agent whose cycle never came back to its loop ran on beside its replacement
    (and nobody is left to report to).  So must any process they started that is still in our
    group (``subprocess.Popen`` without a session of its own, and what that started)."""
    end_with_group(WORKER_GONE)


def end_with_group(code: int) -> None:
    """End this process at once, and every process of its group with it (SIGKILL to the group),
    where no one else can be trusted to (a dead worker; a stopped one whose lease ran out); else,
    or if that fails, exit with ``code``."""
    if _own_group:
        try:
            os.killpg(os.getpid(), signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)


def end_strays(grace: float = STRAY_GRACE) -> int:
    """End every other process of our group: what the agent started and left running (a
    ``Popen`` never waited for, ``sh -c "job &"``), before its TERMINATED is told.  That report
    lets the coordinator start the agent again elsewhere, and a child doing its work must not run
    on beside the new copy.  SIGTERM, then SIGKILL after ``grace`` seconds (no more than what is
    left of a stopped agent's stop timeout) for those still there.  Returns how many groups were
    signalled (0: nothing was left, the common case: six system calls, no wait).

    To signal the group and not ourselves, we first step into the worker's group: the group we
    leave lives on while anything is in it, and SIGTERM/SIGINT sent to the worker's group
    meanwhile are ignored (the agent is done)."""
    if not _own_group:
        return 0  # our group is not ours (a session leader): nothing of it is ours to signal
    group = os.getpid()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # the worker's group: our parent, its forkserver, may be gone (a SIGTERM to the worker's
        # group ends it), and an orphan's parent is init, whose group 0 would mean our own
        os.setpgid(0, os.getpgid(_worker_pid or os.getppid()))
    except OSError:
        return 0  # the worker is gone or in another session: nowhere to step to
    if os.getpgrp() == group:
        return 0
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    if _stop_by is not None:  # stopped: within what is left of its stop timeout
        grace = max(0.0, min(grace, _stop_by - time.monotonic()))
    if not wait_group_gone(group, grace):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_group_gone(group, STRAY_GRACE)  # a SIGKILLed process still runs until it is scheduled
    return 1


def wait_group_gone(group: int, timeout: float, reap: bool = True) -> bool:
    """Wait up to ``timeout`` seconds until no process of ``group`` runs; True if none does.
    ``reap``: reap our own ended children meanwhile (never in the worker: it would take their
    exit status from the forkserver's and the pulse's owners)."""
    deadline = time.monotonic() + timeout
    while True:
        if reap:
            _reap()  # a stray that was our own child stays in the group, a zombie, until reaped
        if not _group_alive(group):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _group_alive(group: int) -> bool:
    """Is a process of ``group`` still running?  Zombies are not: an orphan's zombie stays in the
    group until its new parent reaps it, and a container's PID 1 may never do so."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc: the group's existence is all we can know
        return True
    # (a pid whose stat is gone ended meanwhile)
    return any(stat[1] == group and stat[0] not in ("Z", "X") for stat in map(process_stat, pids) if stat)


def _reap() -> None:
    """Reap our children that have ended (the agent is done: no Popen of it waits for them now)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def leave_the_worker_group(worker_pid: int = 0) -> None:
    """Take this process (a process agent's, or an agent host) out of its worker's process group
    into one of its own.  A signal to that group (Ctrl-C at the worker's terminal sends SIGINT to
    the whole foreground group; ``kill -- -PGID``) is for the worker, which stops its agents in
    order.  Reaching these processes too, it killed their agents mid-cycle while the worker was
    stopping them: KeyboardInterrupt, or exit code 255, an AGENT_ERROR, no ``on_stop``.  They
    still end with their worker: through the pipe (see :func:`worker_gone`).  The same session,
    not a new one (as the pulse has): whoever looks for what a worker left behind finds it there.
    (A systemd unit that signals the whole cgroup, its default ``KillMode=control-group``, reaches
    them directly: they take SIGTERM and SIGINT as a stop, see :func:`main`; ``KillMode=mixed``,
    as deploy/systemd's unit has, leaves the order to the worker.)  The group is also what the
    agent's own processes are ended by (:func:`end_strays`, and the worker's forced stop)."""
    global _own_group, _worker_pid
    try:
        os.setpgid(0, 0)
    except OSError:  # a session's leader: not a child of the worker's forkserver
        return
    _own_group, _worker_pid = True, worker_pid


def bus_marker(item: Any) -> dict[str, Any]:
    """What a TERMINATED report says of a child's last bus event (``item`` as the publisher numbered
    it): the coordinator waits for the events still on their way instead of dropping them as stale."""
    return {"bus_publisher": item[0], "bus_incarnation": item[1], "bus_seq": item[3]}


def _listen(conn: Any, agent: Any, guard: LeaseGuard) -> None:
    """Stop requests, deliveries and the worker's lease from the worker."""
    try:
        while True:
            message = msgpack.unpackb(conn.recv_bytes(), raw=False)
            if message[0] == "stop":
                stopping(message[1] if len(message) > 1 else None)
                agent.stop()
            elif message[0] == "deliver":
                agent.deliver(message[1], message[2])
            elif message[0] == "lease":
                guard.renewed(message[1], message[2])
    except (EOFError, OSError):
        worker_gone()


def setup_logging(label: str, log_level: int) -> None:
    """The forkserver's children start with no logging set up: log like the worker does."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(log_level)  # the level is the handler's: records still reach the bus
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{label} pid {os.getpid()}] %(name)s: %(message)s"))
    agent_logs.follow_parent(handler)
    logging.getLogger().addHandler(QueuedHandler(handler))  # as the worker's: never waits on stderr
    logging.getLogger().setLevel(min(log_level, logging.INFO))
    logging.getLogger("pyorchestrate.agent").setLevel(logging.INFO)  # INFO records reach the bus


def main(class_blob: bytes, config_blob: bytes, name: str, conn: Any, log_level: int = logging.INFO,
         events_address: str | None = None, bus: list | None = None, hold: bool = False,
         events_key: Any = None, worker_pid: int = 0, tally: Any = None) -> None:
    """Run one process agent to completion, reporting through ``conn``; ``tally``: where its
    inbox keeps what it took and dropped, for the worker to read if this process is killed."""
    leave_the_worker_group(worker_pid)
    stack_dump.register()  # SIGUSR1: its stacks, as the worker's, not its end
    setup_logging(f"agent {name}", log_level)
    lock = threading.Lock()
    # SIGTERM or SIGINT sent to this process itself (systemd's default KillMode=control-group
    # signals every process of the unit; an operator's kill): a stop, as its worker's would be.
    # Before, it ended the agent mid-cycle, an AGENT_ERROR without on_stop.  Listened to from here:
    # one that arrives while the agent is made (unpickling imports the user's code) stops it once made
    made: list[Any] = []
    stop_asked = threading.Event()

    def stop_signalled() -> None:
        if stop_asked.is_set() or _stop_by is not None:
            # asked to stop before: by its worker, whose SIGTERM past the stop timeout means "now"
            # (as the default action made it, two seconds before the SIGKILL), or by an earlier one
            os._exit(128 + signal.SIGTERM)
        stop_asked.set()
        if made:
            made[0].stop()

    stop_signals.request_on_signals(stop_signalled)

    def report(event: str, **fields: Any) -> None:
        if event == "AGENT_TERMINATED":
            end_strays()  # before the end is told: see there
        fields.update(stamp())
        with lock:
            try:
                conn.send_bytes(msgpack.packb([event, fields], use_bin_type=True, default=repr))
            except (OSError, ValueError):
                pass

    try:
        agent_class, config_class = shipping.unpack_class(class_blob)
        config, plugin = shipping.unpack_config(config_class, config_blob)
        agent = agent_class(name, config, plugin)
    except BaseException as exc:  # noqa: BLE001 - any failure to load must be reported
        report("AGENT_STARTED")
        report("AGENT_ERROR", **error_fields(exc))
        report("AGENT_TERMINATED", ok=False, messages_taken=0)  # (see BaseAgent.run's end)
        conn.close()
        sys.exit(1)
    agent._report = report
    agent._inbox.tally = tally
    agent.events_address = events_address
    agent.events_key = events_key
    if hold:
        agent.control_events.execute_event.clear()  # until the coordinator says execute
    made.append(agent)
    if stop_asked.is_set():  # signalled while it was being made (see stop_signalled)
        agent.stop()

    def stop_at_lease() -> None:
        stopping(guard.stop_timeout)
        agent.stop()

    guard = LeaseGuard(worker_pid, stop_at_lease, end=end_with_group)
    agent._lease = guard  # told a lease only if it covers the agent (not kept)
    threading.Thread(target=_listen, args=(conn, agent, guard), daemon=True).start()
    if bus:
        def sink(item: Any) -> None:
            # over the pipe the worker already reads: no socket of our own, nothing to wait
            # for at exit (the pipe is flushed before the TERMINATED report behind it)
            with lock:
                try:
                    conn.send_bytes(msgpack.packb([BUS, *item], use_bin_type=True))
                except (OSError, ValueError):
                    pass
        publisher.attach(agent, sink, *bus)
    try:
        ok = agent.run()
    finally:
        publisher.detach(agent)
    conn.close()
    sys.stdout.flush()
    if LOG_THREAD.flush(EXIT_WAIT):  # else stderr takes nothing: flushing it would wait for ever
        sys.stderr.flush()
    # skip interpreter teardown: a stray non-daemon thread of user code must not keep us alive
    os._exit(0 if ok else 1)
