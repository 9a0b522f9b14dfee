"""A worker's lease runs on CLOCK_BOOTTIME (worker/clock.py), which goes on while the machine is
suspended, where CLOCK_MONOTONIC stands still: a worker whose host slept past its lease must find
it over when it wakes.  A suspend cannot be made here, so the worker runs in a time namespace
(``unshare --time``) whose boot clock is 100,000 s ahead of its monotonic clock: every stamp it
sends (its register, its heartbeats, its pulse process's pulses) must be on the boot clock, or
the two clocks were mixed and an echo would be taken for one 100,000 s old.  The coordinator is
a bare ROUTER socket of this test, outside the namespace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import zmq

from pyorchestrate import protocol

OFFSET = 100_000.0


def _time_namespaces() -> str:
    if not hasattr(time, "CLOCK_BOOTTIME"):
        return "no CLOCK_BOOTTIME here"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "--time", "--boottime", "1", "true"], capture_output=True, text=True,
                           timeout=20)
    return f"no time namespaces here: {probe.stderr.strip()}" if probe.returncode else ""


def _own_offset() -> float:
    """This process's own boot clock offset, if it runs in a time namespace (the suite run in one,
    to see that no stamp mixes the clocks): a namespace's offsets count from the initial one's
    clocks, not from its parent's."""
    try:
        with open("/proc/self/timens_offsets") as f:
            for line in f:
                name, seconds, nanoseconds = line.split()
                if name in ("boottime", "7"):
                    return int(seconds) + int(nanoseconds) / 1e9
    except OSError:
        pass
    return 0.0


_NO_TIME_NAMESPACES = _time_namespaces()  # why not, or "": asked once (it runs unshare)


@pytest.mark.skipif(bool(_NO_TIME_NAMESPACES), reason=_NO_TIME_NAMESPACES or "-")
def test_every_stamp_of_a_worker_and_its_pulse_is_on_the_boot_clock(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(["unshare", "--time", "--boottime", str(int(OFFSET)), sys.executable, "-m",
                               "pyorchestrate_worker", "--coordinator", f"tcp://127.0.0.1:{port}", "--name", "w1",
                               "--pulse", "always"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stamps: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 30
        while set(stamps) != {"register", "heartbeat", "pulse"} and time.monotonic() < deadline:
            if not router.poll(500):
                continue
            identity, frame = router.recv_multipart()
            message = protocol.decode(frame)
            kind = message["type"]
            if kind in ("register", "heartbeat", "pulse"):
                # the boot clock here, read now: the stamp was taken a moment ago inside the namespace
                stamps.setdefault(kind, message["t"] - time.clock_gettime(time.CLOCK_BOOTTIME) + _own_offset())
            if kind == "register":
                router.send_multipart([identity, protocol.encode(
                    "welcome", n=1, coordinator="test", session="s1", heartbeat_interval=0.2, heartbeat_liveness=5,
                    bus_port=port, events_port=None, stop=[], warnings=[], echo=message["t"])])
            elif kind == "heartbeat":
                router.send_multipart([identity, protocol.encode("heartbeat_reply", n=0, echo=message["t"])])
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        log.close()
        router.close()
        ctx.term()
    assert set(stamps) == {"register", "heartbeat", "pulse"}, (stamps, (tmp_path / "worker.log").read_text()[-2000:])
    for kind, ahead in stamps.items():
        # on the monotonic clock a stamp would be about -100,000 s from here
        assert abs(ahead - OFFSET) < 10.0, f"the worker's {kind} stamp is {ahead:.1f} s from the boot clock + offset"
