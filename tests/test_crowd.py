"""How a worker copes with thousands of agent threads: its GIL and GC tuning (worker/crowd.py,
pure), the lock-free queue agent threads report through, and thread starts off its loop."""

import threading

from conftest import wait_for

from pyorchestrate.mailbox import WakeQueue
from pyorchestrate_worker import crowd
from pyorchestrate_worker.crowd import FreezePolicy, GcAction


def test_switch_interval_grows_with_threads_and_is_capped_by_the_window():
    assert crowd.switch_interval(10, 5.0) == crowd.SWITCH_DEFAULT
    assert crowd.switch_interval(crowd.MANY_AGENTS - 1, 5.0) == crowd.SWITCH_DEFAULT
    assert crowd.switch_interval(1_000, 5.0) == 1_000 * crowd.SWITCH_PER_THREAD
    assert crowd.switch_interval(10_000, 5.0) == crowd.SWITCH_MAX
    assert crowd.switch_interval(100_000, 5.0) == crowd.SWITCH_MAX
    # a 0.5 s liveness window: a CPU-bound agent may keep the GIL at most 20 ms per hand-over
    assert crowd.switch_interval(10_000, 0.5) == 0.5 / 25
    assert crowd.switch_interval(10_000, 0.01) == crowd.SWITCH_DEFAULT


def test_a_crowded_agent_host_takes_the_largest_interval_whatever_its_thread_count():
    # the herd is summed over processes: five hosts at 40 ms wake five times as often as one
    # process at 200 ms (a 20,000-agent burst tipped the machine over that way)
    assert crowd.host_switch_interval(crowd.MANY_AGENTS - 1) == crowd.SWITCH_DEFAULT
    assert crowd.host_switch_interval(crowd.MANY_AGENTS) == crowd.SWITCH_MAX
    assert crowd.host_switch_interval(2_000) == crowd.SWITCH_MAX > crowd.switch_interval(2_000, 5.0)


def test_freeze_only_with_many_agents_and_after_starts():
    policy = FreezePolicy()
    policy.started(10)
    assert policy.decide(10) is GcAction.NOTHING  # few agents: the collector is cheap
    policy.started(600)
    assert policy.decide(610) is GcAction.FREEZE
    assert policy.decide(610) is GcAction.NOTHING  # nothing new since
    policy.started(5)
    assert policy.decide(615) is GcAction.FREEZE


def test_frozen_agents_that_ended_are_reclaimed_once_per_that_many_endings():
    policy = FreezePolicy()
    policy.started(10_000)
    assert policy.decide(10_000) is GcAction.FREEZE
    policy.ended(9_999)  # fewer ended than run now: no pause yet
    assert policy.decide(10_000) is GcAction.NOTHING
    policy.ended(1)
    assert policy.decide(10_000) is GcAction.REFRESH
    assert policy.decide(10_000) is GcAction.NOTHING
    policy.ended(10_000)
    assert policy.decide(100) is GcAction.REFRESH  # few left: reclaimed once, then no more freezing
    assert not policy.frozen
    assert policy.decide(100) is GcAction.NOTHING


def test_wake_queue_keeps_every_item_in_order_per_producer_and_wakes_the_owner():
    box = WakeQueue()
    try:
        import select

        assert select.select([box.wake_socket], [], [], 0)[0] == []
        per_thread, threads = 5_000, 8

        def produce(t: int) -> None:
            for i in range(per_thread):
                box.put((t, i))

        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        got: list = []
        while len(got) < per_thread * threads:
            # the owner sleeps only while the wake fd says nothing is there
            ready = select.select([box.wake_socket], [], [], 5)[0]
            assert ready, f"no wake with {len(box)} queued and {len(got)} taken"
            got += box.drain(limit=1000)
        for w in workers:
            w.join(5)
        assert box.drain() == []
        for t in range(threads):
            assert [i for tt, i in got if tt == t] == list(range(per_thread))
        assert select.select([box.wake_socket], [], [], 0)[0] == []
    finally:
        box.close()
    box.put("after close")  # never raises (an agent may report while the worker shuts down)


def test_wake_queue_never_leaves_an_item_without_a_wake():
    """Many short-lived producers, as agent threads are: an item put just as the owner drains
    must still wake it (a flag cleared before the pipe was read once left items waiting for the
    next heartbeat: S3 took 1.0 s instead of 0.1 s, one run in three)."""
    import select

    for _ in range(20):
        box = WakeQueue()
        try:
            threads = [threading.Thread(target=lambda: [box.put(k) for k in range(3)]) for _ in range(200)]
            starter = threading.Thread(target=lambda: [t.start() for t in threads])
            starter.start()
            got = 0
            while got < 600:
                assert select.select([box.wake_socket], [], [], 2)[0], f"{len(box)} item(s) queued, no wake"
                got += len(box.drain())
            starter.join(5)
            for t in threads:
                t.join(5)
        finally:
            box.close()


def test_an_agent_whose_thread_cannot_start_is_reported_failed_not_running_for_ever(monkeypatch):
    """Threads are started off the worker's loop; one that cannot start (the process hit its
    thread limit) must still end its agent's run, or the worker would count it running for ever."""
    import time

    from agents import Quick
    from pyorchestrate import shipping
    from pyorchestrate_worker.supervisor import Supervisor

    reports: list = []
    supervisor = Supervisor(lambda *report: reports.append(report), "w1")
    real_start = threading.Thread.start

    def start(thread):
        if thread.name.startswith("agent-"):
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    class_id, blob = shipping.pack_class(Quick, Quick.Config)
    supervisor.start("q", "run1", 1, class_id, blob, shipping.pack_config(Quick.Config(), "q"), "thread")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(r[3] == "AGENT_TERMINATED" for r in reports):
        time.sleep(0.01)
    assert [r[3] for r in reports] == ["AGENT_STARTED", "AGENT_ERROR", "AGENT_TERMINATED"]
    assert "can't start new thread" in reports[1][4]["error_message"] and reports[2][4]["ok"] is False
    assert supervisor.count() == 0 and supervisor.forget_finished() == 1
    supervisor.close()
    assert not [t for t in threading.enumerate() if t.name == "thread-starter"]


def test_ended_agents_are_freed_by_reference_counting_not_left_to_the_cyclic_collector():
    """A worker runs agents by the hundred thousand: each one left as cyclic garbage (it was: its
    report closure held its record, which held it) fed the collector's full passes, ~15 µs of the
    worker's CPU per agent in S3.  200 agents run, end and are forgotten: nothing of them is left
    for the collector."""
    import gc
    import time

    from agents import Quick
    from pyorchestrate import publisher, shipping
    from pyorchestrate_worker.supervisor import Supervisor

    ended = threading.Semaphore(0)

    def report(name, run, epoch, event, fields):
        if event == "AGENT_TERMINATED":
            ended.release()

    supervisor = Supervisor(report, "w1", publisher.BusOutbox(wake=lambda: None))
    class_id, blob = shipping.pack_class(Quick, Quick.Config)
    config = shipping.pack_config(Quick.Config(), "q")
    gc.collect()
    gc.disable()
    try:
        for i in range(200):
            supervisor.start(f"q{i}", "run1", 1, class_id, blob if i == 0 else None, config, "thread")
        for _ in range(200):
            assert ended.acquire(timeout=10)
        deadline = time.monotonic() + 10  # the last threads finish their run() after the report
        forgotten = 0
        while forgotten < 200 and time.monotonic() < deadline:
            forgotten += supervisor.forget_finished()
            time.sleep(0.01)
        assert forgotten == 200
        time.sleep(0.2)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__name__ in ("Quick", "Running", "LazyEvent")]
        assert left == [], f"{len(left)} objects of ended agents were cyclic garbage"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        supervisor.close()


def test_settle_freezes_the_workers_own_objects_and_the_crowds_last_reclaim_keeps_them_frozen():
    import gc

    before = gc.get_threshold()
    try:
        crowd.settle()
        frozen = gc.get_freeze_count()
        assert frozen > 1000 and gc.get_threshold()[0] == crowd.YOUNG_THRESHOLD
        policy = FreezePolicy(frozen=True, ended_since_refresh=crowd.MANY_AGENTS)
        crowd.apply(policy.decide(0))  # what a worker does when its crowd of agents has gone
        assert not policy.frozen
        assert gc.get_freeze_count() >= frozen * 0.9
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_copy_asked_to_stop_is_listed_as_stopping_until_it_has_ended(tmp_path):
    """What a registering worker lists: a copy asked to stop (by its lease, the orphan timeout, a
    coordinator) says so while it is ending, so no coordinator adopts it or takes it for its
    agent's only copy."""
    import time

    from agents import Traced
    from pyorchestrate import shipping
    from pyorchestrate_worker.supervisor import Supervisor

    reports: list = []
    supervisor = Supervisor(lambda *report: reports.append(report), "w1")
    class_id, blob = shipping.pack_class(Traced, Traced.Config)
    config = Traced.Config(trace=str(tmp_path / "trace.txt"), deaf=1.0, stop_timeout=0.2)
    supervisor.start("t", "run1", 1, class_id, blob, shipping.pack_config(config, "t"), "thread")
    try:
        wait_for(lambda: any(r[3] == "AGENT_READY" for r in reports), 10, "the agent to be READY")
        assert [(r["agent"], r["stopping"]) for r in supervisor.running()] == [("t", False)]
        assert supervisor.stop("t", "run1", 1)
        time.sleep(0.3)  # past its stop timeout: deaf, it still runs
        assert [(r["agent"], r["stopping"]) for r in supervisor.running()] == [("t", True)]
        wait_for(lambda: any(r[3] == "AGENT_TERMINATED" for r in reports), 10, "the agent to end")
        assert supervisor.running() == []
    finally:
        supervisor.close()
