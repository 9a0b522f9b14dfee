"""A worker's supervisor holds each stopping copy to its stop timeout (real agent threads, no
sockets), the latest said: a stop said again with a shorter one is held to that."""

from __future__ import annotations

import os
import time

from pyorchestrate import LoopingThreadAgent, shipping
from pyorchestrate_worker.supervisor import Supervisor


class HoldsOn(LoopingThreadAgent):
    """Deaf to a stop (its cycle does not return) until the file ``release`` is there."""

    class Config(LoopingThreadAgent.Config):
        release = ""

    def cycle(self):
        deadline = time.monotonic() + 30
        while not os.path.exists(self.config.release) and time.monotonic() < deadline:
            time.sleep(0.02)


def _wait(predicate, seconds: float, supervisor: Supervisor) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        supervisor.enforce_stop_timeouts()  # (as the worker's loop does every turn)
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_stop_said_again_with_a_shorter_timeout_is_held_to_the_shorter_one(tmp_path):
    reports: list = []
    supervisor = Supervisor(lambda *report: reports.append(report), "w1")
    release = tmp_path / "release"
    try:
        class_id, blob = shipping.pack_class(HoldsOn, HoldsOn.Config)
        config = HoldsOn.Config(release=str(release))
        for name in ("long", "short"):
            supervisor.start(name, "run1", 1, class_id, blob, shipping.pack_config(config, name), "thread")
        assert _wait(lambda: sum(r[3] == "AGENT_READY" for r in reports) == 2, 10, supervisor)
        supervisor.stop("long", "run1", 1, timeout=30.0)
        supervisor.stop("short", "run1", 1, timeout=30.0)
        supervisor.stop("short", "run1", 1, timeout=0.2)  # said again: 0.2 s it is
        stuck = lambda: [r[0] for r in reports if r[3] == "AGENT_ERROR" and r[4].get("stuck")]  # noqa: E731
        assert _wait(lambda: stuck(), 10, supervisor), "the 0.2 s timeout was not held to"
        time.sleep(0.3)
        supervisor.enforce_stop_timeouts()
        assert stuck() == ["short"]  # (the other one has 30 s)
    finally:
        release.touch()
        _wait(lambda: sum(r[3] == "AGENT_TERMINATED" for r in reports) == 2, 10, supervisor)
        supervisor.close()
    assert sum(r[3] == "AGENT_TERMINATED" for r in reports) == 2
