"""Threads for thread agents, reused from one agent to the next without leaking anything between
them.

Starting a thread costs ~95 µs of CPU here, more than everything else a worker does to launch an
agent, and ``Thread.start()`` waits until the new thread runs (with thousands of agent threads
queued for the GIL that wait took seconds).  So a thread whose agent ended waits a while for the
next agent instead of exiting.  What one agent leaves in its thread must not reach the next:

* **context variables** (and ``decimal``'s context, which lives in one): every agent runs in a
  fresh ``contextvars.Context()``, as it would in a new thread;
* **``threading.local`` data** lives in the thread state's dict (``PyThreadState_GetDict``), as
  do a few other things of C extensions (asyncio's running loop): a thread whose dict differs after
  its agent from before is *retired* (it exits; the next agent gets a new thread).  So an agent
  that touched a thread-local never hands its thread on;
* a trace or profile function the agent installed (``sys.settrace``): retired too;
* the thread's name is the agent's (``agent-<name>``) while it runs, and it is a daemon thread,
  as before.  ``threading.current_thread()`` is the pool's thread object: the same object for two
  agents that ran one after the other on it (its name tells them apart).

Where the thread-state dict cannot be read (not CPython), or where ``threading.local`` does not
keep its data there (checked once, at import, on a probe thread), threads are never reused.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import queue
import sys
import threading
from typing import Callable

from pyorchestrate import own_threads
from pyorchestrate.log_thread import deferrable

log = deferrable(logging.getLogger("pyorchestrate.worker.threads"))

#: an idle thread waits this long for the next agent, then exits
IDLE_SECONDS = 10.0
#: at most this many idle threads wait (each holds a little memory until its idle time runs out).
#: A coordinator places up to 250 agents a pass, so a burst of short agents finds threads for a
#: whole pass: at 64, S3 (10,000 trivial agents) started 1,800 threads a worker and ran at
#: ~5,700/s; at 256 it starts ~100 and runs at ~8,200/s
MAX_IDLE = 256


def _thread_dict_reader() -> Callable[[], dict] | None:
    """A function returning the calling thread's thread-state dict, or None if unavailable."""
    try:
        get = ctypes.pythonapi.PyThreadState_GetDict
    except (AttributeError, ValueError):
        return None
    get.argtypes = []
    # a *borrowed* reference: taken as an address, then turned into an object with its own
    # reference (``cast(..., py_object).value`` increments it); ``restype = py_object`` would
    # treat it as owned and decrement a reference nobody gave us (a crash at exit)
    get.restype = ctypes.c_void_p

    def read() -> dict:
        address = get()
        if not address:
            return {}
        return ctypes.cast(address, ctypes.py_object).value

    return read


def _locals_live_in_thread_dict(read: Callable[[], dict]) -> bool:
    """Does touching a ``threading.local`` change the thread-state dict (as CPython 3.11 does)?"""
    seen: list[bool] = []
    local = threading.local()

    def probe() -> None:
        before = dict(read())
        local.x = 1
        seen.append(dict(read()) != before)

    thread = own_threads.thread(probe, "thread-local-probe")
    thread.start()
    thread.join(5.0)
    return seen == [True]


def _check_support() -> Callable[[], dict] | None:
    read = _thread_dict_reader()
    try:
        if read is not None and _locals_live_in_thread_dict(read):
            return read
    except Exception:  # noqa: BLE001 - whatever goes wrong, reuse is off and agents run as before
        log.debug("thread reuse unavailable", exc_info=True)
    return None


_read_thread_dict = _check_support()
REUSE = _read_thread_dict is not None


def _snapshot() -> list[tuple[object, object]]:
    assert _read_thread_dict is not None
    return list(_read_thread_dict().items())


def _same(before: list[tuple[object, object]], after: list[tuple[object, object]]) -> bool:
    return len(before) == len(after) and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(before, after))


#: what to run, the thread's name while it runs, and what to call if no thread could be started
Job = tuple[Callable[[], None], str, Callable[[BaseException], None]]


class AgentThreads:
    """Runs each job on an idle pooled thread, or on the first thread that needs one: a job no
    idle thread takes waits in a queue, and a new thread is started for it (by a starter thread,
    see ``Supervisor``: :meth:`start_one`) unless a thread whose agent ended takes it first.  A
    burst of short agents thus runs on a few threads instead of one new thread each: S3 handed
    1,000 agents a worker at once and each waited for a thread of its own to start (the last ran
    400 ms after it was handed; most threads were started for agents that had long finished).
    ``reuse=False``: a new thread for every job (the old behaviour)."""

    def __init__(self, reuse: bool = REUSE, idle_seconds: float = IDLE_SECONDS, max_idle: int = MAX_IDLE) -> None:
        self.reuse = reuse and REUSE
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # under _lock; never both above zero (a job is queued unclaimed only while nobody idles)
        self._idle = 0  # threads waiting on _jobs, not yet claimed by a submit
        self._unclaimed = 0  # queued jobs no thread has claimed yet (each has a start_one coming)
        self._closed = False
        self.started = 0  #: threads started so far
        self.retired = 0  #: threads that exited after an agent that changed their thread state
        self.reused = 0  #: jobs run on a thread that had run an agent before

    def submit(self, job: Callable[[], None], name: str, on_fail: Callable[[BaseException], None]) -> bool:
        """Queue ``job``; True if no idle thread took it: then call :meth:`start_one` once, on a
        thread that may wait (``Thread.start()`` waits until the new thread runs).  ``on_fail``
        is called with the error if the job gets no thread (one could not be started)."""
        with self._lock:
            if self._idle and not self._closed:
                self._idle -= 1
                self.reused += 1
                self._jobs.put((job, name, on_fail))
                return False
            self._unclaimed += 1
            self._jobs.put((job, name, on_fail))
        return True

    def start_one(self) -> None:
        """Start a thread for a queued job, unless a thread took every queued job meanwhile."""
        with self._lock:
            if not self._unclaimed or self._closed:
                return
            self._unclaimed -= 1
            self.started += 1
        try:
            own_threads.thread(self._serve, "agent-starting").start()
        except Exception as exc:  # noqa: BLE001 - e.g. RuntimeError: can't start new thread (limits)
            job = self._jobs.get()  # the one claimed above: it gets no thread
            assert job is not None
            job[2](exc)

    def idle(self) -> int:
        with self._lock:
            return self._idle

    def close(self) -> None:
        """Let idle threads exit now (threads running agents exit after them; jobs still queued
        get no thread)."""
        with self._lock:
            self._closed = True
            waiting, self._idle = self._idle, 0
        for _ in range(waiting):
            self._jobs.put(None)

    def _serve(self) -> None:
        thread = threading.current_thread()
        baseline = _snapshot() if self.reuse else []
        job = self._jobs.get()  # claimed by start_one
        while job is not None:
            target, name, _ = job
            job = None
            thread.name = name
            contextvars.Context().run(target)
            target = None  # the finished agent is not kept alive while this thread waits
            if not self.reuse or not self._clean(baseline):
                return
            thread.name = "agent-idle"
            job = self._next()

    def _clean(self, baseline: list[tuple[object, object]]) -> bool:
        """May this thread serve another agent?  Not if the agent changed its thread state."""
        if sys.gettrace() is not None or sys.getprofile() is not None or not _same(baseline, _snapshot()):
            with self._lock:
                self.retired += 1
            return False
        return True

    def _next(self) -> Job | None:
        with self._lock:
            if self._closed:
                return None
            if self._unclaimed:  # a job waits for a thread to be started: this one takes it
                self._unclaimed -= 1
                self.reused += 1
                claimed = True
            elif self._idle >= self.max_idle:
                return None
            else:
                self._idle += 1
                claimed = False
        if claimed:
            return self._jobs.get()
        try:
            return self._jobs.get(timeout=self.idle_seconds)
        except queue.Empty:
            pass
        with self._lock:
            if self._idle:  # nobody claimed an idle thread meanwhile: this one leaves
                self._idle -= 1
                return None
        # a submit claimed an idle thread after our wait ran out: its job is (about to be) queued
        return self._jobs.get()
