"""Agents the tests run.  This module is not installed anywhere: it reaches workers by value."""

import os
import time
from pathlib import Path
from typing import Any

from pyorchestrate import (BaseProcessAgent, BaseThreadAgent, DeferredThreadAgent, EventDrivenProcessAgent,
                           EventDrivenThreadAgent, LoopingProcessAgent, LoopingThreadAgent, PluginBase, PoolThreadAgent)


class Quick(BaseThreadAgent):
    def execute(self):
        self.logger.info("quick ran in pid %d", os.getpid())


class QuickProcess(BaseProcessAgent):
    def execute(self):
        self.logger.info("quick process ran in pid %d", os.getpid())


class Boom(BaseThreadAgent):
    def execute(self):
        raise ValueError("boom from agent")


class BoomLater(BaseThreadAgent):
    """Fails after ``seconds`` of work (its message ``size`` characters longer)."""

    class Config(BaseThreadAgent.Config):
        seconds = 1.0
        size = 0

    def execute(self):
        time.sleep(self.config.seconds)
        raise ValueError("boom, later" + "x" * self.config.size)


class BoomProcess(BaseProcessAgent):
    def execute(self):
        raise RuntimeError("process boom")


class Shout(BaseThreadAgent):
    """Fails with an error message of ``size`` characters (a payload in the exception's text)."""

    class Config(BaseThreadAgent.Config):
        size = 10_000_000

    def execute(self):
        raise ValueError("x" * self.config.size)


class ShoutProcess(BaseProcessAgent):
    Config = Shout.Config
    execute = Shout.execute


class FailsEveryCycle(LoopingThreadAgent):
    """A cycle that fails, recoverably, every time: thousands of AGENT_ERRORs a second."""

    def cycle(self):
        from pyorchestrate.agents.base import RecoverableException

        raise RecoverableException("again")


class Forever(LoopingThreadAgent):
    """Loops until stopped; records its hooks in a file so tests can see them."""

    class Config(LoopingThreadAgent.Config):
        trace = ""

    def _note(self, what):
        if self.config.trace:
            with open(self.config.trace, "a") as f:
                f.write(what + "\n")

    def setup(self):
        self._note("setup")

    def cycle(self):
        self.wait_stop(0.02)

    def on_stop(self):
        self._note("on_stop")

    def on_close(self):
        self._note("on_close")


class FailsWhenTold(LoopingThreadAgent):
    """Loops until the file ``told`` exists, then fails: a long-running dependency that fails."""

    class Config(LoopingThreadAgent.Config):
        told = ""

    def cycle(self):
        if os.path.exists(self.config.told):
            raise ValueError("told to fail")
        self.wait_stop(0.02)


class ForeverProcess(LoopingProcessAgent):
    """Loops until stopped, in a child process; writes its pid to ``pid_file``."""

    class Config(LoopingProcessAgent.Config):
        pid_file = ""

    def setup(self):
        if self.config.pid_file:
            with open(self.config.pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(self.config.pid_file + ".tmp", self.config.pid_file)

    def cycle(self):
        self.wait_stop(0.02)


class ForeverTracedProcess(LoopingProcessAgent):
    """:class:`Forever` in a child process: its hooks in ``trace``."""

    class Config(LoopingProcessAgent.Config):
        trace = ""

    _note = Forever._note
    setup = Forever.setup
    cycle = Forever.cycle
    on_stop = Forever.on_stop
    on_close = Forever.on_close


class DeafProcess(ForeverProcess):
    """Ignores SIGTERM and never returns from its cycle: only SIGKILL ends it.  Its pid file is
    written from inside that cycle, so a stop asked once the file is there is never seen.  (Written
    in setup, before READY, a stop asked between READY and the first cycle was seen by the loop
    before that cycle, and the agent ended cleanly: a CI run saw it, ok=True within 0.3 s.)"""

    def setup(self):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def cycle(self):
        ForeverProcess.setup(self)  # the pid file: see above
        while True:  # never back to the loop that would see the stop
            time.sleep(0.05)


class DeafThread(LoopingThreadAgent):
    """A thread agent that never returns from its cycle; writes its process's pid to ``pid_file``
    (the worker's, or an agent host's) from inside that cycle (see DeafProcess)."""

    class Config(LoopingThreadAgent.Config):
        pid_file = ""

    def cycle(self):
        ForeverProcess.setup(self)  # the pid file
        while True:  # never back to the loop that would see the stop
            time.sleep(0.05)


class Sleeper(BaseThreadAgent):
    class Config(BaseThreadAgent.Config):
        seconds = 0.5

    def execute(self):
        time.sleep(self.config.seconds)


class CpuBurner(BaseThreadAgent):
    """Pure-Python CPU burn (the GIL is switched every 5 ms, so the heartbeat thread still runs)."""

    class Config(BaseThreadAgent.Config):
        seconds = 3.0

    def execute(self):
        end = time.monotonic() + self.config.seconds
        n = 0
        while time.monotonic() < end:
            n += 1


class GilHolder(BaseThreadAgent):
    """Sorts a big list: one C call that holds the GIL throughout (about a second per call here:
    3 million floats took 0.74 s on a fast day, short of the 0.75 s the detection tests need).
    It sleeps between sorts so that its worker's loop speaks between them: each silence is one sort,
    well inside the busy cap (3 s in the tests) even beside other tests (two sorts back to back, at
    5 million floats, ran past it in CI: 'loop silent for 3.0 s')."""

    class Config(BaseThreadAgent.Config):
        size = 4_000_000
        rounds = 2
        pause = 0.5

    def execute(self):
        import random

        data = [random.random() for _ in range(self.config.size)]
        for i in range(self.config.rounds):
            if i:
                time.sleep(self.config.pause)  # lets the GIL go: the loop heartbeats
            start = time.monotonic()
            sorted(data)
            self.logger.info("sorted with the GIL held for %.2f s", time.monotonic() - start)


def append_line(path: str, line: str) -> None:
    """One whole line per write (O_APPEND): many agents in many processes share one file."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class Traced(LoopingThreadAgent):
    """Loops until stopped; writes "setup NAME VERSION" and "close NAME" lines to ``trace``, so a
    test sees every copy that ever started or ended, on any worker."""

    class Config(LoopingThreadAgent.Config):
        trace = ""
        version = 1
        deaf = 0.0  #: seconds it goes on after a stop request (a thread stuck in its cycle)

    def setup(self):
        append_line(self.config.trace, f"setup {self.name} {self.config.version}")

    def cycle(self):
        if self.wait_stop(0.05) and self.config.deaf:
            time.sleep(self.config.deaf)  # threads cannot be killed: this copy runs on, stuck

    def on_close(self):
        append_line(self.config.trace, f"close {self.name}")


class CountedOnce(BaseThreadAgent):
    """A one-shot agent that logs and publishes, and counts its executions in ``runs``."""

    class Config(BaseThreadAgent.Config):
        runs = ""

    def execute(self):
        append_line(self.config.runs, self.name)
        for i in range(3):
            self.logger.info("%s working (%d)", self.name, i)
        self.publish("progress", done=True)
        time.sleep(0.02)


class CopyTracer(LoopingThreadAgent):
    """Each copy appends "start/alive/close COPY_ID TIME" to ``trace`` and logs every cycle: a
    test reads from the file which copies ran when, and sees their logs on the bus."""

    class Config(LoopingThreadAgent.Config):
        trace = ""
        linger = 0.0  #: seconds it keeps working after a stop request (a slow stopper)
        chdir = ""  #: a directory it makes the process's working directory (as some jobs do)

    def setup(self):
        import uuid

        self.copy = uuid.uuid4().hex[:8]
        if self.config.chdir:
            os.chdir(self.config.chdir)
        append_line(self.config.trace, f"start {self.copy} {time.time():.3f}")

    def cycle(self):
        append_line(self.config.trace, f"alive {self.copy} {time.time():.3f}")
        self.logger.info("copy %s alive", self.copy)
        self.wait_stop(0.05)

    def on_stop(self):
        end = time.time() + self.config.linger
        while time.time() < end:
            append_line(self.config.trace, f"alive {self.copy} {time.time():.3f}")
            time.sleep(0.05)

    def on_close(self):
        append_line(self.config.trace, f"close {self.copy} {time.time():.3f}")


def copy_spans(path: Any, work_only: bool = True) -> dict[str, list]:
    """What a CopyTracer trace at ``path`` shows of each copy: ``[first, last, closed]``, the
    times of its first and last line (``work_only``: its start and cycles, not its close, which is
    cleanup) and whether it closed."""
    spans: dict[str, list] = {}
    for line in Path(path).read_text().splitlines():
        kind, copy, when = line.split()
        span = spans.setdefault(copy, [None, None, False])
        if kind == "close":
            span[2] = True
            if work_only:
                continue
        t = float(when)
        span[0] = t if span[0] is None else min(span[0], t)
        span[1] = t if span[1] is None else max(span[1], t)
    return {copy: span for copy, span in spans.items() if span[0] is not None}


class SlowJob(BaseThreadAgent):
    """A one-shot job of ``seconds`` that does not look at stop requests (as most execute()s do
    not): "begin" and "done" into ``trace``."""

    class Config(BaseThreadAgent.Config):
        trace = ""
        seconds = 2.0

    def execute(self):
        append_line(self.config.trace, "begin")
        time.sleep(self.config.seconds)
        append_line(self.config.trace, "done")


class LateJob(DeferredThreadAgent):
    """A one-shot job due ``delay`` seconds after READY: "done" into ``trace``."""

    class Config(DeferredThreadAgent.Config):
        trace = ""

    def execute(self):
        append_line(self.config.trace, "done")


class SlowGoodbye(LoopingThreadAgent):
    """Logs "stopping N" ``lines`` times over ``seconds`` in on_stop (a flush, say)."""

    class Config(LoopingThreadAgent.Config):
        lines = 30
        seconds = 3.0

    def cycle(self):
        self.wait_stop(0.05)

    def on_stop(self):
        for i in range(self.config.lines):
            self.logger.info("stopping %d", i)
            time.sleep(self.config.seconds / self.config.lines)


class StuckTalker(CopyTracer):
    """A copy that, asked to stop, never does: it goes on tracing and logging (so its worker has
    bus output to send for as long as it runs)."""

    def on_stop(self):
        while True:
            append_line(self.config.trace, f"alive {self.copy} {time.time():.3f}")
            self.logger.info("copy %s still here", self.copy)
            time.sleep(0.01)


class HelperThread(LoopingThreadAgent):
    """Starts a non-daemon thread of its own that runs for ever (as some libraries do), tracing
    "helper TIME" into ``trace``."""

    class Config(LoopingThreadAgent.Config):
        trace = ""

    def setup(self):
        import threading

        def helper():
            while True:
                append_line(self.config.trace, f"helper {time.time():.3f}")
                time.sleep(0.05)

        threading.Thread(target=helper, name="helper", daemon=False).start()

    def cycle(self):
        self.wait_stop(0.05)


class Burst(BaseThreadAgent):
    """Publishes ``count`` numbered events of ``pad`` bytes each as fast as it can."""

    class Config(BaseThreadAgent.Config):
        count = 1000
        pad = 0

    def execute(self):
        pad = "x" * self.config.pad
        for i in range(self.config.count):
            self.publish("burst", i=i, pad=pad)


class Ticker(BaseThreadAgent):
    """Publishes numbered events (``i`` from 0) at ``rate`` a second until stopped."""

    class Config(BaseThreadAgent.Config):
        rate = 1000

    def execute(self):
        period, i = 1.0 / self.config.rate, 0
        due = time.monotonic()
        while not self.wait_stop(max(0.0, due - time.monotonic())):
            self.publish("tick", i=i)
            i += 1
            due += period


class LastWords(BaseProcessAgent):
    """Logs, then leaves with os._exit(1): no TERMINATED of its own, no flush."""

    def execute(self):
        for i in range(5):
            self.logger.info("last words %d", i)
        os._exit(1)


class Talker(BaseThreadAgent):
    """Logs ``lines`` lines and ends."""

    class Config(BaseThreadAgent.Config):
        lines = 5

    def execute(self):
        for i in range(self.config.lines):
            self.logger.info("line %d", i)


class NeedsModule:
    """A config value whose unpickling imports a module no worker has (as a class from a package
    installed only beside the coordinator would)."""

    def __reduce__(self):
        import importlib

        return importlib.import_module, ("pyorchestrate_no_such_module",)


def _per_process(name, factory):
    """One object per worker process, shared by every agent that runs there: this module reaches
    workers by value (each agent gets its own copy of its globals), so it lives in a module of
    its own in ``sys.modules``."""
    import sys
    import types

    holder = sys.modules.setdefault("_pyorchestrate_test_shared", types.ModuleType("_pyorchestrate_test_shared"))
    if not hasattr(holder, name):
        setattr(holder, name, factory())
    return getattr(holder, name)


class Leaky(BaseThreadAgent):
    """Writes what it sees of thread-local, decimal and contextvar state, then (if told) sets them:
    the next agent on the same worker must see none of it."""

    class Config(BaseThreadAgent.Config):
        out = ""
        touch_local = False  #: read and set a threading.local (its thread may not be reused)
        set_context = False  #: set a contextvar and the decimal context
        read_local = False

    def execute(self):
        import contextvars
        import decimal
        import json
        import threading

        local = _per_process("local", threading.local)
        var = _per_process("var", lambda: contextvars.ContextVar("leaky"))
        thread = threading.current_thread()
        seen = {"var": var.get(None), "prec": decimal.getcontext().prec, "thread": thread.name,
                "daemon": thread.daemon, "ident": threading.get_ident()}
        if self.config.read_local or self.config.touch_local:
            seen["local"] = getattr(local, "value", None)
        if self.config.touch_local:
            local.value = self.name
        if self.config.set_context:
            var.set(self.name)
            decimal.getcontext().prec = 7
        with open(self.config.out, "w") as f:
            json.dump(seen, f)


class GilHog(BaseThreadAgent):
    """Holds the GIL for seconds in one C call (a huge power), starving its worker's loop: what a
    busy extension module does to a worker."""

    class Config(BaseThreadAgent.Config):
        exponent = 12_000_000  # about 3.3 s here
        first = 0.3  # seconds before it starts, so its worker's loop can report it running

    def execute(self):
        time.sleep(self.config.first)
        3 ** self.config.exponent


class BigEvents(BaseThreadAgent):
    """Publishes ``before`` small events, ``big`` events of ``size`` bytes, then ``after`` small ones."""

    class Config(BaseThreadAgent.Config):
        size = 5_000_000
        before = 0
        big = 3
        after = 1

    def execute(self):
        c = self.config
        for i in range(c.before):
            self.publish("small", i=i)
        for i in range(c.big):
            self.publish("big", i=i, data="x" * c.size)
        for i in range(c.after):
            self.publish("small", i=c.before + c.big + i)


class FailsLoudly(LoopingThreadAgent):
    """Fails, recoverably, every cycle with a long message and a deep traceback (~16 + 64 KB)."""

    def cycle(self):
        from pyorchestrate.agents.base import RecoverableException

        def deep(n):
            if n == 0:
                raise RecoverableException("y" * 20_000)
            return deep(n - 1)

        try:
            deep(400)
        finally:
            self.wait_stop(0.01)


class CopyTracerProcess(LoopingProcessAgent):
    """:class:`CopyTracer` in a child process, which writes its pid to ``pid_file``."""

    class Config(LoopingProcessAgent.Config):
        trace = ""
        linger = 0.0
        pid_file = ""
        deaf_to_sigterm = False  #: ignores SIGTERM (a worker's terminate after its stop timeout)
        chdir = ""  #: as CopyTracer's (it runs CopyTracer.setup)

    def setup(self):
        CopyTracer.setup(self)
        if self.config.pid_file:
            append_line(self.config.pid_file, str(os.getpid()))
        if self.config.deaf_to_sigterm:
            import signal

            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    cycle = CopyTracer.cycle
    on_stop = CopyTracer.on_stop
    on_close = CopyTracer.on_close


class Spawner(LoopingProcessAgent):
    """Starts two processes it never ends, both in its process group, and writes their pids to
    ``pid_file`` (one per line): a ``Popen`` never waited for, and a ``sh -c "... &"`` whose
    shell exits (its job then has no parent of ours).  With ``stubborn`` they ignore SIGTERM; with
    ``deaf`` the agent ignores its stop."""

    class Config(LoopingProcessAgent.Config):
        pid_file = ""
        stubborn = False
        deaf = False

    def setup(self):
        import shlex
        import subprocess
        import sys

        code = ("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if self.config.stubborn else "") \
            + "import time; time.sleep(600)"
        popen = subprocess.Popen([sys.executable, "-c", code])
        job = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} > /dev/null 2>&1 & echo $!",
                             shell=True, capture_output=True, text=True, check=True)  # noqa: S602 - our own command
        with open(self.config.pid_file + ".tmp", "w") as f:
            f.write(f"{popen.pid}\n{job.stdout.strip()}\n{os.getpid()}\n")
        os.replace(self.config.pid_file + ".tmp", self.config.pid_file)

    def cycle(self):
        if self.config.deaf:
            time.sleep(0.05)  # never looks at its stop
        else:
            self.wait_stop(0.02)


class Forker(LoopingProcessAgent):
    """Forks a helper that sleeps (it holds the agent's end of its worker's pipe, as any forked
    child does) and writes ``<helper pid>\\n<own pid>`` to ``pid_file``."""

    class Config(LoopingProcessAgent.Config):
        pid_file = ""

    def setup(self):
        helper = os.fork()
        if helper == 0:
            time.sleep(600)
            os._exit(0)
        with open(self.config.pid_file + ".tmp", "w") as f:
            f.write(f"{helper}\n{os.getpid()}\n")
        os.replace(self.config.pid_file + ".tmp", self.config.pid_file)

    def cycle(self):
        self.wait_stop(0.02)


class ForkerThread(LoopingThreadAgent):
    """:class:`Forker` as a thread agent (run it in an agent host: ``--threads-per-process``)."""

    Config = Forker.Config
    setup = Forker.setup

    def cycle(self):
        self.wait_stop(0.02)


class ThreadLeaver(CopyTracer):
    """A thread agent that starts a thread of its own (as a reader or a keep-alive would), which
    appends "alive COPY-helper TIME" to ``trace`` every 50 ms until told to end: told and joined
    as the agent stops with ``join_on_stop``, else left running."""

    class Config(CopyTracer.Config):
        join_on_stop = False

    def setup(self):
        import threading

        CopyTracer.setup(self)
        self.helper_done = threading.Event()

        def helper(copy=self.copy, trace=self.config.trace, done=self.helper_done):
            while not done.wait(0.05):
                append_line(trace, f"alive {copy}-helper {time.time():.3f}")

        self.helper = threading.Thread(target=helper, name=f"helper-{self.copy}", daemon=True)
        self.helper.start()

    def on_stop(self):
        if self.config.join_on_stop:
            self.helper_done.set()
            self.helper.join()


class SpawnerThread(CopyTracer):
    """A thread agent that leaves processes running in its worker's process group: a ``Popen``
    never waited for, a ``sh -c "... &"`` job whose shell exits, and (``fork``) a forked copy of
    the worker that sleeps.  Each copy appends one line of their pids to ``pid_file``; with ``deaf``
    it ignores its stop, as a cycle stuck in ``subprocess.run`` does; with ``detached`` a fourth,
    started with a session of its own (``start_new_session=True``), ends the line.  With ``trace``,
    it traces its copies as :class:`CopyTracer` does."""

    class Config(CopyTracer.Config):
        pid_file = ""
        fork = False
        deaf = False
        detached = False

    def setup(self):
        import subprocess

        if self.config.trace:
            CopyTracer.setup(self)
        pids = [subprocess.Popen(["sleep", "600"]).pid]
        job = subprocess.run("sleep 600 > /dev/null 2>&1 & echo $!", shell=True, capture_output=True,  # noqa: S602
                             text=True, check=True)
        pids.append(int(job.stdout))
        if self.config.fork:
            helper = os.fork()
            if helper == 0:
                time.sleep(600)
                os._exit(0)
            pids.append(helper)
        if self.config.detached:
            pids.append(subprocess.Popen(["sleep", "600"], start_new_session=True).pid)
        append_line(self.config.pid_file, " ".join(map(str, pids)))

    def cycle(self):
        if self.config.deaf:
            time.sleep(0.05)  # never looks at its stop
        elif self.config.trace:
            CopyTracer.cycle(self)
        else:
            self.wait_stop(0.02)

    def on_stop(self):
        if self.config.trace:
            CopyTracer.on_stop(self)

    def on_close(self):
        if self.config.trace:
            CopyTracer.on_close(self)


class Chatty(LoopingThreadAgent):
    """Logs a long INFO line every 5 ms: fills a log stream nobody reads within a second."""

    def cycle(self):
        self.logger.info("chatter %s", "x" * 400)
        self.wait_stop(0.005)


class QuietTracer(CopyTracer):
    """:class:`CopyTracer` that never logs: it goes on working while its worker's stderr is full."""

    def cycle(self):
        append_line(self.config.trace, f"alive {self.copy} {time.time():.3f}")
        self.wait_stop(0.05)


class _QuitsPlugin(PluginBase):
    """Quits (see :class:`Quits`) from its ``initialize`` or ``finalize`` when its owner says so."""

    def initialize(self):
        if self.owner.config.where == "plugin initialize":
            self.owner.quit()

    def finalize(self):
        if self.owner.config.where == "plugin finalize":
            self.owner.quit()


class Quits(LoopingThreadAgent):
    """Leaves the way a script would, by ``sys.exit(7)`` (``how="exit"``) or Ctrl-C's
    KeyboardInterrupt (``how="interrupt"``), from ``where``: its ``__init__``, ``on_stop``,
    ``on_close``, or its plugin's ``initialize`` or ``finalize``; else loops until stopped."""

    class Config(LoopingThreadAgent.Config):
        where = ""
        how = "exit"

    class Plugin(LoopingThreadAgent.Plugin):
        quitter = _QuitsPlugin()

    def __init__(self, name=None, config=None, plugin=None):
        super().__init__(name, config, plugin)
        if self.config.where == "__init__":
            self.quit()

    def quit(self):
        import sys

        if self.config.how == "exit":
            sys.exit(7)
        raise KeyboardInterrupt

    def cycle(self):
        self.wait_stop(0.05)

    def on_stop(self):
        if self.config.where == "on_stop":
            self.quit()

    def on_close(self):
        if self.config.where == "on_close":
            self.quit()


class PoolQuits(PoolThreadAgent):
    """A pool whose every run calls ``sys.exit(7)``."""

    class Config(PoolThreadAgent.Config):
        execution_interval = 0.05
        limit = 3

    def runner(self):
        import sys

        sys.exit(7)


class SlowToMake(EventDrivenThreadAgent):
    """Its ``__init__`` takes ``Config.seconds`` (as a big import or a connection made there would);
    each message it is sent (``orchestrator.send``) becomes a line "message PAYLOAD" in ``trace``."""

    class Config(EventDrivenThreadAgent.Config):
        seconds = 3.0
        trace = ""

    def __init__(self, name=None, config=None, plugin=None):
        append_line(config.trace, f"making {name}")
        time.sleep(config.seconds)
        super().__init__(name, config, plugin)
        append_line(config.trace, f"made {name}")

    def on_event(self, event):
        append_line(self.config.trace, f"message {event.payload}")



class MadeOnCue(EventDrivenThreadAgent):
    """Its ``__init__`` waits (at most 120 s) for the file ``cue`` to exist, as one that connects
    somewhere would wait for the other end; each message it is sent becomes a line "message
    PAYLOAD" in ``trace``."""

    class Config(EventDrivenThreadAgent.Config):
        cue = ""
        trace = ""

    def __init__(self, name=None, config=None, plugin=None):
        append_line(config.trace, f"making {name}")
        deadline = time.monotonic() + 120
        while not os.path.exists(config.cue) and time.monotonic() < deadline:
            time.sleep(0.02)
        super().__init__(name, config, plugin)

    def on_event(self, event):
        append_line(self.config.trace, f"message {event.payload}")


class Inboxed(EventDrivenThreadAgent):
    """Each message it is sent (``orchestrator.send``) becomes a line "message PAYLOAD" in ``trace``."""

    class Config(EventDrivenThreadAgent.Config):
        trace = ""

    def on_event(self, event):
        append_line(self.config.trace, f"message {event.payload}")


class FirstOnly(EventDrivenThreadAgent):
    """Takes the first message it is sent, writes "took PAYLOAD" in ``trace`` (after its process's
    pid in ``pid_file``, if given), and handles it until stopped: whatever is sent after waits in
    its inbox."""

    class Config(EventDrivenThreadAgent.Config):
        trace = ""
        pid_file = ""

    def on_event(self, event):
        if self.config.pid_file:
            Path(self.config.pid_file).write_text(str(os.getpid()))
        append_line(self.config.trace, f"took {event.payload}")
        self.wait_stop(None)


class FirstOnlyProcess(EventDrivenProcessAgent):
    """:class:`FirstOnly` in a process of its own."""

    class Config(EventDrivenProcessAgent.Config):
        trace = ""
        pid_file = ""

    on_event = FirstOnly.on_event


class FirstOnlyDeafProcess(EventDrivenProcessAgent):
    """:class:`FirstOnlyProcess` that ignores its stop: its process is killed at its stop timeout."""

    class Config(EventDrivenProcessAgent.Config):
        trace = ""

    def on_event(self, event):
        append_line(self.config.trace, f"took {event.payload}")
        while True:
            time.sleep(0.05)


class EndsAfter(EventDrivenThreadAgent):
    """Handles ``count`` messages, writes how many it handled in ``trace``, and ends (stops itself)
    while more may be on their way."""

    class Config(EventDrivenThreadAgent.Config):
        trace = ""
        count = 100

    def setup(self):
        self.handled = 0

    def on_event(self, event):
        self.handled += 1
        if self.handled == self.config.count:
            Path(self.config.trace).write_text(str(self.handled))
            self.stop()


class EndsAfterProcess(EventDrivenProcessAgent):
    """:class:`EndsAfter` in a process of its own."""

    class Config(EventDrivenProcessAgent.Config):
        trace = ""
        count = 100

    setup, on_event = EndsAfter.setup, EndsAfter.on_event


class RootLogShipper(LoopingThreadAgent):
    """Ships every log record of its process to a log collector over HTTP, as agents configure
    logging in ``setup()``: a handler on the *root* logger, which the worker's own records reach too.
    ``logging.handlers.HTTPHandler`` waits for the collector's answer, without a timeout."""

    class Config(LoopingThreadAgent.Config):
        collector = ""  #: host:port

    def setup(self):
        import logging.handlers

        logging.getLogger().addHandler(logging.handlers.HTTPHandler(self.config.collector, "/log", method="POST"))

    def cycle(self):
        self.wait_stop(0.2)


class Asker(BaseThreadAgent):
    """Reads a line from the terminal (``input()``, as a ``breakpoint()`` left in or a library
    asking for a password would)."""

    def execute(self):
        input("continue? ")


class OrphanMaker(LoopingThreadAgent):
    """Each cycle, a shell's background job that ends at once: an orphan handed to whoever reaps
    for the worker (its PID namespace's init: in a container without ``--init``, the worker)."""

    class Config(LoopingThreadAgent.Config):
        jobs = 20

    def setup(self):
        self.made = 0

    def cycle(self):
        import subprocess

        if self.made < self.config.jobs:
            subprocess.run("true &", shell=True, check=True)  # noqa: S602 - the shell exits before its job
            self.made += 1
        self.wait_stop(0.02)


class PidsFiller(LoopingProcessAgent):
    """Forks sleeping helpers until no more process (or thread) can be had (at most ``most``),
    before its worker tells it its first lease; writes ``<own pid> <helpers>`` to ``pid_file``."""

    class Config(LoopingProcessAgent.Config):
        pid_file = ""
        most = 200

    def setup(self):
        made = 0
        while made < self.config.most:
            try:
                helper = os.fork()
            except OSError:  # EAGAIN: the pids limit
                break
            if helper == 0:
                time.sleep(600)
                os._exit(0)
            made += 1
        with open(self.config.pid_file + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {made}\n")
        os.replace(self.config.pid_file + ".tmp", self.config.pid_file)

    def cycle(self):
        self.wait_stop(0.05)


class StuckProcess(ForeverProcess):
    """Never returns from its cycle (its stop is never seen), and leaves SIGTERM as we set it;
    writes its pid file from inside that cycle (see DeafProcess)."""

    def setup(self):
        pass

    def cycle(self):
        ForeverProcess.setup(self)  # the pid file
        while True:
            time.sleep(0.05)


class Ballast(LoopingThreadAgent):
    """Loops until stopped; its config carries ``ballast`` (bytes on the wire to its worker)."""

    class Config(LoopingThreadAgent.Config):
        ballast = ""

    def cycle(self):
        time.sleep(0.05)


class DeepBoom(BaseThreadAgent):
    """Fails at once with a long message and a deep traceback (a report of ~40 kB)."""

    def execute(self):
        def deep(k):
            if k == 0:
                raise ValueError(f"{self.name} " + "x" * 20000)
            return deep(k - 1)
        deep(200)


class MessageSizes(EventDrivenThreadAgent):
    """Each message it is sent becomes a line "size N" in ``trace`` (N: the payload's length)."""

    class Config(EventDrivenThreadAgent.Config):
        trace = ""

    def on_event(self, event):
        append_line(self.config.trace, f"size {len(event.payload)}")
