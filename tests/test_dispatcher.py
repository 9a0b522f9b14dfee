"""The callback dispatcher (pyorchestrate/events.py), without sockets."""

from __future__ import annotations


def test_dispatcher_hands_over_a_held_batch_at_once_and_in_order():
    """The loop holds callbacks while it carries out a batch (events.EventDispatcher.hold):
    nothing runs until release, then everything in order; flush() hands over while holding, so
    wait_idle() counts it."""
    from pyorchestrate.events import EventDispatcher, OrchestratorEvent

    dispatcher = EventDispatcher(max_threads=2)
    seen: list[tuple[str, str]] = []
    dispatcher.register(OrchestratorEvent.AGENT_STARTED, lambda agent_name: seen.append(("started", agent_name)))
    dispatcher.register(OrchestratorEvent.AGENT_TERMINATED, lambda agent_name: seen.append(("ended", agent_name)))
    try:
        dispatcher.hold()
        dispatcher.hold()  # nested: only the outer release hands over
        for name in ("a", "b"):
            dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": name})
            dispatcher.dispatch(OrchestratorEvent.AGENT_TERMINATED, {"agent_name": name})
        dispatcher.release()
        assert dispatcher.wait_idle(2.0) and seen == []
        dispatcher.flush()
        assert dispatcher.wait_idle(5.0)
        assert [e for e in seen if e[1] == "a"] == [("started", "a"), ("ended", "a")] and len(seen) == 4
        dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": "c"})
        dispatcher.release()
        assert dispatcher.wait_idle(5.0) and seen[-1] == ("started", "c")
    finally:
        dispatcher.close()


def test_callbacks_of_one_subject_run_in_order_however_many_runners_take_batches():
    """Events dispatched one by one (the bus path) are taken by several runner threads at once:
    they must still be filed, and run, in the order they were dispatched (20,000 log lines of one
    agent once came out of order in CI)."""
    from pyorchestrate.events import EventDispatcher, OrchestratorEvent

    dispatcher = EventDispatcher(max_threads=10)
    dispatcher.max_backlog = 10**9  # all of them, however far behind the runners are
    seen: list[int] = []
    dispatcher.register(OrchestratorEvent.AGENT_LOG, lambda agent_name, n: seen.append(n))
    try:
        for n in range(20_000):
            dispatcher.dispatch(OrchestratorEvent.AGENT_LOG, {"agent_name": "chatty", "n": n})
        assert dispatcher.wait_idle(30.0)
        assert len(seen) == 20_000
        assert seen == sorted(seen), f"first out of order at {next(i for i, (a, b) in enumerate(zip(seen, seen[1:])) if a > b)}"
    finally:
        dispatcher.close()


def test_a_slow_callback_holds_up_only_its_own_subject():
    """Runners drain subjects they find ready before waiting for the next batch: a callback that
    blocks must still leave the other subjects of its batch (and later batches) to other runners,
    and its own subject's later events wait for it, in order."""
    import threading
    import time

    from pyorchestrate.events import EventDispatcher, OrchestratorEvent

    dispatcher = EventDispatcher(max_threads=3)
    release = threading.Event()
    seen: list[tuple[str, int]] = []

    def callback(agent_name, n):
        if agent_name == "slow" and n == 0:
            assert release.wait(30)
        seen.append((agent_name, n))

    dispatcher.register(OrchestratorEvent.AGENT_STARTED, callback)
    try:
        dispatcher.hold()  # one batch: the slow subject first, then 50 others, then slow's second event
        dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": "slow", "n": 0})
        for i in range(50):
            dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": f"a{i}", "n": 0})
        dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": "slow", "n": 1})
        dispatcher.release()
        for i in range(50):  # and 50 more batches of one
            dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": f"b{i}", "n": 0})
        deadline = time.monotonic() + 30
        while len(seen) < 100 and time.monotonic() < deadline:  # everything else runs
            time.sleep(0.01)
        assert len(seen) == 100 and not any(name == "slow" for name, _ in seen)
        assert not dispatcher.wait_idle(0.1)  # the slow one still blocks
        release.set()
        assert dispatcher.wait_idle(10.0)
        assert seen[-2:] == [("slow", 0), ("slow", 1)]
    finally:
        release.set()
        dispatcher.close()


def test_a_callback_gets_only_the_fields_its_signature_names_and_its_defaults_for_the_rest():
    """Each callback is called with the event's fields that it names (a field it names that the
    event lacks keeps the callback's default); one taking ``**kwargs`` gets every field."""
    from pyorchestrate.events import EventDispatcher, OrchestratorEvent

    dispatcher = EventDispatcher(max_threads=2)
    seen: list[tuple] = []
    dispatcher.register(OrchestratorEvent.AGENT_READY, lambda agent_name, error_message="none": seen.append(
        ("named", agent_name, error_message)))
    dispatcher.register(OrchestratorEvent.AGENT_READY, lambda **fields: seen.append(("all", sorted(fields))))

    def keyword_only(*, worker: str, epoch: int = -1) -> None:
        seen.append(("keyword-only", worker, epoch))

    dispatcher.register(OrchestratorEvent.AGENT_READY, keyword_only)
    try:
        dispatcher.dispatch(OrchestratorEvent.AGENT_READY, {"event": "AGENT_READY", "agent_name": "a", "worker": "w1",
                                                            "host": "h", "seq": 3})
        assert dispatcher.wait_idle(5.0)
        assert seen == [("named", "a", "none"), ("all", ["agent_name", "event", "host", "seq", "worker"]),
                        ("keyword-only", "w1", -1)]
        assert dispatcher.failures == 0
    finally:
        dispatcher.close()


def test_callbacks_too_far_behind_are_dropped_and_counted_but_never_lifecycle_ones():
    """A callback slower than the events it gets: beyond max_backlog waiting events, callbacks of
    logs, an agent's own events and heartbeats are dropped and counted (the coordinator's memory
    grew 15 MB a second without bound, and each agent's lifecycle callbacks waited behind its
    backlog); lifecycle ones always run, in order."""
    import threading

    from pyorchestrate.events import EventDispatcher, OrchestratorEvent as E

    dispatcher = EventDispatcher(max_threads=2)
    dispatcher.max_backlog = 100
    drops: list[str] = []
    dispatcher.on_drop = lambda kind, detail: drops.append(kind)
    gate = threading.Event()
    seen: list[str] = []

    def slow(event):
        gate.wait(10)  # stuck until the test has dispatched everything
        seen.append(event)

    for event in (E.AGENT_LOG, E.AGENT_EVENT, E.AGENT_TERMINATED):
        dispatcher.register(event, slow)
    try:
        for i in range(500):
            dispatcher.dispatch(E.AGENT_LOG if i % 2 else E.AGENT_EVENT, {"agent_name": "a", "event": "x"})
        for i in range(50):
            dispatcher.dispatch(E.AGENT_TERMINATED, {"agent_name": "a", "event": "AGENT_TERMINATED"})
        assert drops == ["callback_backlog"] * 399  # 101 went in before the backlog passed 100
        gate.set()
        assert dispatcher.wait_idle(10.0)
        assert seen == ["x"] * 101 + ["AGENT_TERMINATED"] * 50
    finally:
        gate.set()
        dispatcher.close()


def test_wait_idle_from_a_callback_waits_for_the_others_not_for_itself():
    """Orchestrator.stop() in a callback (on ALL_AGENTS_TERMINATED, say) waits for the callbacks to
    be idle: it waited for its own, 15 s of timeouts, while the script's join() had long returned
    (and the script, exiting, cut it short: the orchestrator's plugins were never finalized)."""
    import threading
    import time

    from pyorchestrate.events import EventDispatcher, OrchestratorEvent

    dispatcher = EventDispatcher(max_threads=2)
    other_done = threading.Event()
    results: list[tuple[bool, bool]] = []

    def slow(agent_name):
        time.sleep(0.5)
        other_done.set()

    def waits(agent_name):
        results.append((dispatcher.wait_idle(5.0), other_done.is_set()))

    dispatcher.register(OrchestratorEvent.AGENT_STARTED, slow)
    dispatcher.register(OrchestratorEvent.AGENT_TERMINATED, waits)
    try:
        dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": "other"})
        time.sleep(0.1)  # its runner has it
        dispatcher.dispatch(OrchestratorEvent.AGENT_TERMINATED, {"agent_name": "me"})
        assert dispatcher.wait_idle(10.0)
        # idle once the other subject's callback returned, without timing out on its own
        assert results == [(True, True)]
    finally:
        dispatcher.close()


def test_a_callback_that_calls_sys_exit_costs_its_subject_no_later_callback():
    """``sys.exit()`` in a callback raises SystemExit in a runner thread: it was not caught there,
    the runner died holding its subject, and that agent's later callbacks never ran (wait_idle, and
    so stop(), waited out their timeouts for them).  It is logged and counted like any error."""
    from pyorchestrate.events import EventDispatcher, OrchestratorEvent

    dispatcher = EventDispatcher(max_threads=1)  # one runner: its death would stop every callback
    seen: list[str] = []

    def on_started(agent_name):
        seen.append(f"started {agent_name}")
        raise SystemExit(1)

    dispatcher.register(OrchestratorEvent.AGENT_STARTED, on_started)
    dispatcher.register(OrchestratorEvent.AGENT_TERMINATED, lambda agent_name: seen.append(f"ended {agent_name}"))
    try:
        for name in ("a", "b"):
            dispatcher.dispatch(OrchestratorEvent.AGENT_STARTED, {"agent_name": name})
        dispatcher.dispatch(OrchestratorEvent.AGENT_TERMINATED, {"agent_name": "a"})
        assert dispatcher.wait_idle(10.0), seen
        assert seen == ["started a", "started b", "ended a"] and dispatcher.failures == 2
    finally:
        dispatcher.close(timeout=1.0)
