"""Folding a short run's reports into its end (worker/fold.py, protocol 9): pure, no sockets."""

from pyorchestrate_worker.fold import fold

S, R, T, E = "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED", "AGENT_ERROR"


def rep(agent: str, event: str, epoch: int = 1, **fields):
    return (agent, "run1", epoch, event, fields)


def events(reports):
    return [(r[0], r[3], r[4].get("folded", False)) for r in reports]


def test_runs_that_went_from_started_to_their_end_in_one_batch_are_their_end_alone():
    # two runs interleaved, as pooled threads report them
    out = fold([rep("a", S), rep("b", S), rep("a", R), rep("b", R),
                rep("a", T, ok=True, reached="READY"), rep("b", T, ok=True, reached="READY")])
    assert events(out) == [("a", T, True), ("b", T, True)]
    assert out[0][4] == {"ok": True, "reached": "READY", "folded": True}


def test_a_run_that_ended_before_ready_folds_its_started_only():
    out = fold([rep("a", S), rep("a", T, ok=False, reached="STARTED")])
    assert events(out) == [("a", T, True)]


def test_everything_else_keeps_its_items_and_its_order():
    batch = [
        rep("err", S), rep("err", E, error_message="x"), rep("err", T, ok=False, reached="STARTED"),  # an error between
        rep("pid", S, pid=7), rep("pid", R), rep("pid", T, reached="READY"),  # STARTED with fields
        rep("said", S), rep("said", R, recovered=True), rep("said", T, reached="READY"),  # READY with fields
        rep("late", T, reached="READY"),  # its STARTED went in an earlier batch
        rep("odd", S), rep("odd", R), rep("odd", T, reached="STARTED"),  # an end that contradicts its reports
        rep("open", S), rep("open", R),  # still running
        rep("again", S, epoch=1), rep("again", S, epoch=2), rep("again", R, epoch=2),  # another run of it
    ]
    out = fold([(*r[:4], dict(r[4])) for r in batch])
    assert out == batch


def test_other_runs_reports_between_stay_in_place():
    out = fold([rep("a", S), rep("b", S), rep("b", E, error_message="x"), rep("a", R),
                rep("b", T, ok=False, reached="STARTED"), rep("a", T, reached="READY"), rep("c", S)])
    assert events(out) == [("b", S, False), ("b", E, False), ("b", T, False), ("a", T, True), ("c", S, False)]


def test_one_short_run_alone_folds_into_its_end():
    out = fold([rep("a", S), rep("a", R), rep("a", T, ok=True, reached="READY")])
    assert out == [("a", "run1", 1, T, {"ok": True, "reached": "READY", "folded": True})]


def test_three_reports_fold_as_any_longer_batch_does():
    # three reports take a shortcut: whatever they are, it must give what the general walk gives
    # (forced here by a fourth report of another agent, which nothing folds)
    import itertools

    kinds = [(S, {}), (S, {"pid": 7}), (R, {}), (R, {"x": 1}), (E, {"error_message": "x"}),
             (T, {"reached": "READY"}), (T, {"reached": "STARTED"}), (T, {})]
    copies = [("a", 1), ("a", 2), ("b", 1)]
    other = ("zz", "run1", 1, E, {"error_message": "y"})
    for triple in itertools.product(kinds, repeat=3):  # every three reports, of every copies
        for whose in itertools.product(copies, repeat=3):
            batch = [(agent, "run1", epoch, event, fields) for (event, fields), (agent, epoch) in zip(triple, whose)]
            walked = fold([(*r[:4], dict(r[4])) for r in batch] + [other])
            assert walked[-1] == other
            assert fold([(*r[:4], dict(r[4])) for r in batch]) == walked[:-1], batch
