"""Which threads of a worker pyorchestrate started, and which its agents did (own_threads.py):
what a worker ends at its lease's end rests on telling them apart."""

from __future__ import annotations

import _thread
import threading

import zmq

from pyorchestrate import own_threads
from pyorchestrate_worker.agent_threads import AgentThreads


def test_threads_we_start_are_ours_and_any_other_is_an_agents():
    done = threading.Event()
    ours = own_threads.thread(done.wait, "ours")
    theirs = threading.Thread(target=done.wait, name="theirs", daemon=True)
    marked = own_threads.mark(threading.Thread(target=done.wait, name="marked", daemon=True))
    ran = threading.Event()
    pool = AgentThreads()  # the threads that run agents are ours, idle or busy
    if pool.submit(lambda: (ran.set(), done.wait()), "agent-x", lambda exc: None):
        pool.start_one()
    dummy_seen = threading.Event()

    def foreign() -> None:  # a thread threading did not start: seen only once it calls in, then for ever
        threading.current_thread()
        dummy_seen.set()

    for thread in (ours, theirs, marked):
        thread.start()
    _thread.start_new_thread(foreign, ())
    # pyzmq's garbage collector, which its zero-copy sends start (an agent's too): no agent's work
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    b.connect(f"tcp://127.0.0.1:{a.bind_to_random_port('tcp://127.0.0.1')}")
    a.send(b"x" * 100_000, copy=False)
    b.recv()
    assert any(type(t).__name__ == "GarbageCollectorThread" for t in threading.enumerate())
    try:
        assert ran.wait(10) and dummy_seen.wait(10)
        names = {t.name for t in own_threads.others()}
        assert "theirs" in names
        assert not names & {"ours", "marked", "agent-x", threading.main_thread().name}
        assert not any(name.startswith("Dummy-") for name in names)
        assert not any(type(t).__module__.startswith("zmq.") for t in own_threads.others())
        assert ours.daemon and ours.name == "ours"
    finally:
        done.set()
        pool.close()
        a.close(0)
        b.close(0)
        ctx.term()
        for thread in (ours, theirs, marked):
            thread.join(10)
    assert "theirs" not in {t.name for t in own_threads.others()}  # ended: no longer counted
