"""The run marker (pyorchestrate/runmarker.py): what a coordinator leaves for the next one started
with its name on its address."""

from __future__ import annotations

from pyorchestrate import runmarker


def test_a_marker_says_how_the_last_run_ended(tmp_path):
    path = tmp_path / "state" / "c.run"
    assert runmarker.previous(path) is None  # never started here
    runmarker.mark(path, "running")
    assert runmarker.previous(path) == "running"  # read after a crash
    runmarker.mark(path, "clean")
    assert runmarker.previous(path) == "clean"


def test_a_running_that_cannot_be_written_removes_the_clean_left_from_before(tmp_path):
    # a full disk: the last run's "clean" stayed, and a start after this run crashed read it and
    # did not wait for the agents its workers still ran; no marker makes it wait the window
    path = tmp_path / "c.run"
    runmarker.mark(path, "clean")
    path.with_suffix(".tmp").mkdir()  # the write fails as a full disk's would (root ignores modes)
    runmarker.mark(path, "running")
    assert runmarker.previous(path) is None
