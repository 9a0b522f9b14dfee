"""Thread agents reuse threads without leaking state from one agent to the next
(worker/agent_threads.py): the pool on its own, and through a real worker."""

from __future__ import annotations

import contextvars
import decimal
import json
import sys
import threading

import pytest
from agents import Leaky
from conftest import EventLog, wait_for

from pyorchestrate import RunMode
from pyorchestrate_worker import agent_threads
from pyorchestrate_worker.agent_threads import AgentThreads

pytestmark = pytest.mark.skipif(not agent_threads.REUSE, reason="thread reuse needs CPython's thread-state dict")

LOCAL = threading.local()
VAR: contextvars.ContextVar[str] = contextvars.ContextVar("var")


def _run(pool: AgentThreads, job, name: str) -> None:
    """Run one job on the pool and wait for it (a new thread is started here, as the worker's
    starter thread would)."""
    done = threading.Event()

    def wrapped() -> None:
        try:
            job()
        finally:
            done.set()

    retired = pool.retired
    needs_thread = pool.submit(wrapped, name, lambda exc: pytest.fail(f"no thread for {name}: {exc}"))
    idle = pool.idle()  # without the idle thread this job claimed, if any
    if needs_thread:
        pool.start_one()
    assert done.wait(10), f"job {name} did not run"
    # this job's thread, after the job: back among the idle ones, or retired
    wait_for(lambda: not pool.reuse or pool.retired > retired or pool.idle() > idle, 5,
             "the thread to go idle or retire")


def test_pool_reuses_clean_threads_and_retires_ones_an_agent_changed():
    pool = AgentThreads(idle_seconds=30)
    seen: dict[str, dict] = {}

    def look(name: str, leak: str = ""):
        def job() -> None:
            thread = threading.current_thread()
            seen[name] = {"ident": threading.get_ident(), "thread": thread.name, "daemon": thread.daemon,
                          "var": VAR.get(None), "prec": decimal.getcontext().prec}
            if leak == "context":
                VAR.set(name)
                decimal.getcontext().prec = 5
            elif leak == "local":
                LOCAL.value = name
            elif leak == "trace":
                sys.settrace(lambda *a: None)
        return job

    try:
        _run(pool, look("a"), "agent-a")
        _run(pool, look("b", leak="context"), "agent-b")
        _run(pool, look("c"), "agent-c")
        # context variables and decimal's context do not follow an agent; its thread is reused
        assert seen["c"] == {"ident": seen["a"]["ident"], "thread": "agent-c", "daemon": True, "var": None, "prec": 28}
        assert seen["b"]["ident"] == seen["a"]["ident"] and (pool.started, pool.reused, pool.retired) == (1, 2, 0)
        # a thread-local set: that thread exits, the next agent gets a new one and sees nothing
        _run(pool, look("d", leak="local"), "agent-d")
        assert pool.retired == 1 and pool.idle() == 0
        got: list = []
        _run(pool, lambda: got.append(getattr(LOCAL, "value", None)), "agent-e")
        assert got == [None] and pool.started == 2
        # a trace function installed by an agent retires its thread as well
        _run(pool, look("f", leak="trace"), "agent-f")
        assert pool.retired == 3  # agent-e read LOCAL (it now has a dict there): retired too
    finally:
        pool.close()


def test_pool_without_reuse_starts_a_thread_per_agent():
    pool = AgentThreads(reuse=False)
    for i in range(3):
        _run(pool, lambda: None, f"agent-{i}")
    assert (pool.started, pool.reused) == (3, 0)


def test_a_burst_of_short_jobs_runs_on_threads_that_come_free_not_a_new_thread_each():
    """1,000 jobs queued at once: the first thread started takes the next waiting job when its
    own ends, so most start_one calls find nothing left to start a thread for."""
    pool = AgentThreads(idle_seconds=30)
    done: list[int] = []
    lock = threading.Lock()

    def job(i: int):
        def run() -> None:
            with lock:
                done.append(i)
        return run

    try:
        needs = [pool.submit(job(i), f"agent-{i}", lambda exc: pytest.fail(str(exc))) for i in range(1000)]
        assert all(needs)  # nobody idles yet: each asks for a thread
        for _ in needs:  # as the worker's starter thread does, one after the other
            pool.start_one()
        wait_for(lambda: len(done) == 1000, 10, "every job to run")
        assert sorted(done) == list(range(1000))
        assert pool.started < 100, pool.started  # a new thread each before
    finally:
        pool.close()


def test_a_job_that_gets_no_thread_is_failed(monkeypatch):
    pool = AgentThreads(idle_seconds=30)
    failed: list[str] = []

    class NoThreads(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(agent_threads.threading, "Thread", NoThreads)
    try:
        assert pool.submit(lambda: None, "agent-x", lambda exc: failed.append(str(exc)))
        pool.start_one()
        assert failed == ["can't start new thread"]
    finally:
        monkeypatch.undo()
        pool.close()


def test_an_idle_thread_leaves_after_its_idle_time():
    pool = AgentThreads(idle_seconds=0.2)
    _run(pool, lambda: None, "agent-x")
    assert pool.idle() == 1
    wait_for(lambda: pool.idle() == 0, 5, "the idle thread to leave")
    _run(pool, lambda: None, "agent-y")
    assert pool.started == 2
    pool.close()


def test_agents_on_a_real_worker_see_nothing_of_the_agent_before(cluster, tmp_path):
    orch = cluster.orchestrator(min_workers=1, run_mode=RunMode.DAEMON)
    events = EventLog(orch)
    orch.start()
    cluster.worker(orch.address, "w1")

    def run(name: str, **settings) -> dict:
        out = tmp_path / f"{name}.json"
        orch.register_agent(Leaky, name, Leaky.Config(out=str(out), **settings))
        events.wait("AGENT_TERMINATED", name)
        return json.loads(out.read_text())

    try:
        first = run("first")
        # a thread is reused once it is idle again, a moment after its agent's end was reported;
        # on a loaded machine the next start can come first (then a new thread runs it), so try
        # a few pairs: every one must be clean, and at least one must have shared a thread
        pairs = []
        for i in range(5):
            setter, after = run(f"setter{i}", set_context=True), run(f"after{i}")
            pairs.append((setter, after))
            assert (after["var"], after["prec"]) == (None, 28), f"pair {i}: the setter's context leaked"
            assert (setter["thread"], after["thread"]) == (f"agent-setter{i}", f"agent-after{i}")
            assert setter["daemon"] and after["daemon"]
            if setter["ident"] == after["ident"]:
                break
        assert any(s["ident"] == a["ident"] for s, a in pairs), "no agent ever ran on a reused thread"
        assert first["thread"] == "agent-first" and first["daemon"]
        local_setter = run("local-setter", touch_local=True)
        assert local_setter["local"] is None
        reader = run("reader", read_local=True)
        assert reader["local"] is None and (reader["var"], reader["prec"]) == (None, 28)
        assert all(e["ok"] for e in events.of("AGENT_TERMINATED"))
    finally:
        orch.stop(timeout=5)
