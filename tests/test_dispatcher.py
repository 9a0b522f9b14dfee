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
