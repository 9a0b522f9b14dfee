"""The coordinator's garbage-collection policy (pure), and its wiring to the real collector."""

from __future__ import annotations

import gc

from pyorchestrate.collector import COUNT_EVERY, REFRESH_MIN, AfterFullCollection, Collector, GcAction


def _count(n):
    return lambda: n


def _never():
    raise AssertionError("the frozen objects are counted only right after a full collection")


def _begun(many: int = 100, frozen: int = 300_000) -> AfterFullCollection:
    """A policy past its first decision: the loop's start, which collects and freezes once."""
    policy = AfterFullCollection(many=many)
    assert policy.decide(0, _never, 0.0) is GcAction.REFRESH
    policy.applied(GcAction.REFRESH, _count(frozen))
    assert policy.base == frozen
    return policy


def test_collects_and_freezes_at_the_start_then_freezes_with_many_agents_and_after_each_full_collection():
    policy = _begun()
    assert policy.decide(50, _never, 0.0) is GcAction.NOTHING
    policy.collected(2)
    assert policy.decide(50, _never, 0.0) is GcAction.NOTHING  # few agents: the collector is cheap
    assert policy.decide(150, _never, 0.0) is GcAction.FREEZE  # many: frozen now, no pass of our own
    policy.applied(GcAction.FREEZE, _never)
    assert policy.decide(150, _never, 1.0) is GcAction.NOTHING  # no full pass since: nothing counted
    policy.collected(0)
    policy.collected(1)
    assert policy.decide(150, _never, 2.0) is GcAction.NOTHING  # young passes leave garbage behind
    policy.collected(2)  # a full pass walks only what came since; its survivors join
    assert policy.decide(150, _count(400_000), 3.0) is GcAction.FREEZE
    policy.applied(GcAction.FREEZE, _never)
    assert policy.base == 300_000  # growth is measured from the last reclaim
    policy.collected(2)  # counted at most every COUNT_EVERY seconds: counting walks them all
    assert policy.decide(150, _never, 4.0) is GcAction.FREEZE


def test_reclaims_once_the_frozen_population_doubled_and_stops_freezing_with_few_agents():
    policy = _begun(frozen=1_000_000)
    assert policy.decide(150, _never, 0.0) is GcAction.FREEZE
    policy.collected(2)
    assert policy.decide(150, _count(1_900_000), 1.0) is GcAction.FREEZE
    policy.collected(2)
    assert policy.decide(150, _never, 2.0) is GcAction.FREEZE  # doubled, but not counted yet
    policy.collected(2)
    assert policy.decide(150, _count(2_000_001), 1.0 + COUNT_EVERY) is GcAction.REFRESH
    policy.collected(2)  # the reclaim's own pass: not a reason to freeze again
    policy.applied(GcAction.REFRESH, _count(1_200_000))  # what was cyclic garbage went
    assert policy.decide(150, _never, 2.0 + COUNT_EVERY) is GcAction.NOTHING
    # a small population is not worth a pause: at least REFRESH_MIN objects of growth
    small = _begun(frozen=1_000)
    small.decide(150, _never, 0.0)
    small.collected(2)
    assert small.decide(150, _count(2_500), 0.0) is GcAction.FREEZE
    small.collected(2)
    assert small.decide(150, _count(1_000 + REFRESH_MIN + 1), COUNT_EVERY) is GcAction.REFRESH
    # under half the threshold: no more freezing after passes, and no pause unless it has grown
    # (the records of agents that ended left the frozen population as they were freed)
    assert policy.decide(49, _count(1_300_000), 100.0) is GcAction.NOTHING
    assert not policy.active
    policy.collected(2)
    assert policy.decide(49, _never, 101.0) is GcAction.NOTHING
    assert policy.decide(150, _never, 102.0) is GcAction.FREEZE
    assert policy.decide(49, _count(2_400_001), 103.0) is GcAction.REFRESH  # grown: reclaimed once


def test_the_collector_hears_real_full_collections_freezes_and_undoes_it_all_on_close():
    assert gc.get_freeze_count() == 0
    keep = [[i] for i in range(1000)]  # tracked objects that survive
    collector = Collector(many=10)
    try:
        assert collector.tick(5, 0.0) is GcAction.REFRESH  # the loop's start
        assert gc.get_freeze_count() >= len(keep)
        assert collector.tick(5, 0.0) is GcAction.NOTHING
        assert collector.tick(20, 0.0) is GcAction.FREEZE
        assert collector.tick(20, 1.0) is GcAction.NOTHING
        gc.collect()  # a real full collection, heard through gc.callbacks
        assert collector.tick(20, 2.0) is GcAction.FREEZE
    finally:
        collector.close()
    assert gc.get_freeze_count() == 0
    assert collector._on_gc not in gc.callbacks
