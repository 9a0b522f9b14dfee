"""``python -m benchmarks --lines``: how many Python lines one S2 thread launch runs, ours beside
the lean prototype, per process and thread, and in which of our functions.

A launch's time on this VM moves with its wake-ups (the floor itself ranged 190-963 µs in one
day), so a change of 5 % to the launch path drowns in it.  A count of the lines the interpreter
runs (``sys.settrace`` line events) does not move with the machine: it is the yardstick for
trimming the launch path (issue #13), where the latency and CPU figures of ``--prototype`` are
the judge.  The counts are of S2's steady state: ten launches warm up (the class is shipped),
the next ``reps`` are counted.

Workers count their own lines (:func:`worker_main`, started in place of the plain worker or lean
worker); SIGUSR2 turns their count on and off, and they write it to ``<dir>/<pid>.json`` when
they exit.  A traced thread is never handed to a second agent (a tracer is thread state an agent
may have set, see ``worker/agent_threads.py``), so the workers here skip that check: every
launch reuses a thread as it does untraced, and the check's few lines are not counted.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable

ENV = "PYORCHESTRATE_BENCH_LINES"  # the directory a counting worker writes its count to


def _thread_kind(name: str) -> str:
    """One row of the table for threads of one kind (callback_0..9, agent-l12, host-3)."""
    if name.startswith("agent-"):
        return "agent"
    return re.sub(r"[-_]?\d+$", "", name)


class LineCount:
    """Line events of every thread of this process (threads started after :meth:`install`, and
    the one that installs it), counted while :attr:`on`."""

    def __init__(self) -> None:
        self.on = False
        self.by_thread: collections.Counter[str] = collections.Counter()
        self.by_function: collections.Counter[str] = collections.Counter()

    def _trace(self, frame: Any, event: str, arg: Any) -> Callable | None:
        # always returned, also while off: a frame entered while off (a loop's run()) must still
        # count its lines once the count is on
        if self.on and event == "line":
            code = frame.f_code
            self.by_function[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
            self.by_thread[_thread_kind(threading.current_thread().name)] += 1
        return self._trace

    def install(self) -> None:
        threading.settrace(self._trace)
        sys.settrace(self._trace)

    def remove(self) -> None:
        threading.settrace(None)  # type: ignore[arg-type]
        sys.settrace(None)


def worker_main() -> None:
    """A worker (``ours`` or ``lean`` as argv[1]) that counts its lines while toggled on."""
    count = LineCount()
    signal.signal(signal.SIGUSR2, lambda *_: setattr(count, "on", not count.on))
    out = os.environ[ENV]

    def dump() -> None:
        # written whole, then renamed: the benchmark may read while a lean worker writes its
        # count the second time (at return and at exit), and must never see half a file
        path = os.path.join(out, f"{os.getpid()}.json")
        with open(path + ".part", "w") as f:
            json.dump({"by_thread": count.by_thread, "by_function": count.by_function}, f)
        os.replace(path + ".part", path)

    import atexit

    atexit.register(dump)
    count.install()
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "lean":
        from . import lean

        lean._worker(*args)
        dump()  # a spawned process may end without atexit
        return
    from pyorchestrate_worker import agent_threads, cli

    agent_threads.AgentThreads._clean = lambda self, baseline: True  # see the module's docstring
    raise SystemExit(cli.main(args))


def _lean_worker(address: str, name: str) -> None:
    """multiprocessing's target for a counting lean worker (the environment carries ENV)."""
    sys.argv = ["lines", "lean", address, name]
    worker_main()


def _collect(directory: str) -> tuple[collections.Counter, collections.Counter]:
    threads: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for path in glob.glob(os.path.join(directory, "*.json")):
        with open(path) as f:
            one = json.load(f)
        threads.update(one["by_thread"])
        functions.update(one["by_function"])
    return threads, functions


def _count(side: str, reps: int) -> dict[str, Any]:
    """S2 of ``side`` with every process counting; lines per launch by process and thread."""
    from . import lean, ours

    directory = tempfile.mkdtemp(prefix="pyorchestrate-lines-")
    os.environ[ENV] = directory
    count = LineCount()
    count.install()  # before the cluster: its loop and callback threads start traced
    try:
        cluster: Any
        if side == "ours":
            cluster = ours.Cluster(2, worker_command=(sys.executable, "-m", "benchmarks.lines", "ours"))

            def launch(name: str) -> None:
                cluster.orch.register_agent(ours.agents.Trivial, name)
        else:
            cluster = lean.Lean(worker_target=_lean_worker)
            launch = cluster.launch
        pids = [proc.pid for proc in cluster.procs]
        try:
            for i in range(reps + 10):
                if i == 10:
                    for pid in pids:
                        os.kill(pid, signal.SIGUSR2)
                    time.sleep(0.2)  # the workers' loops take the signal at their next turn
                    count.on = True
                done = cluster.counts["AGENT_TERMINATED"]
                launch(f"l{i}")
                cluster.wait("AGENT_TERMINATED", done + 1)
            count.on = False
            for pid in pids:
                os.kill(pid, signal.SIGUSR2)
            time.sleep(0.2)
        finally:
            cluster.close()
    finally:
        count.remove()
        del os.environ[ENV]
    deadline = time.monotonic() + 10
    while len(glob.glob(os.path.join(directory, "*.json"))) < len(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_threads, worker_functions = _collect(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "coordinator": {k: round(v / reps, 1) for k, v in count.by_thread.most_common()},
        "workers": {k: round(v / reps, 1) for k, v in worker_threads.most_common()},
        "coordinator_functions": {k: round(v / reps, 1) for k, v in count.by_function.most_common(25)},
        "worker_functions": {k: round(v / reps, 1) for k, v in worker_functions.most_common(25)},
    }


def lines(reps: int) -> dict[str, dict[str, Any]]:
    """Lines per S2 launch, ours and lean's, counted one after the other in this process."""
    return {side: _count(side, reps) for side in ("ours", "lean")}


def table(result: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'Python lines a launch':<34} {'ours':>8} {'lean':>8}"]
    for where in ("coordinator", "workers"):
        sides = result["ours"][where], result["lean"][where]
        rows.append(f"{where + ' process(es)':<34} {sum(sides[0].values()):>8.0f} {sum(sides[1].values()):>8.0f}")
        for name in sorted(set(sides[0]) | set(sides[1]), key=lambda n: -max(sides[0].get(n, 0), sides[1].get(n, 0))):
            if max(sides[0].get(name, 0), sides[1].get(name, 0)) >= 1:
                rows.append(f"  thread {name:<25} {sides[0].get(name, 0):>8.0f} {sides[1].get(name, 0):>8.0f}")
    for where in ("coordinator_functions", "worker_functions"):
        rows.append(f"\nours, {where.replace('_', ' ')} (lines a launch):")
        rows += [f"  {n:>7.1f}  {name}" for name, n in list(result["ours"][where].items())[:15]]
    return "\n".join(rows)


if __name__ == "__main__":  # a counting worker started with -m (see worker_main)
    worker_main()
