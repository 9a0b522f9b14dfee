"""worker/group_guard.py on its own: a process leading its group ends the group's other processes,
all of them or only those it found (and what they start meanwhile), in real processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DRIVER = """
import json, os, subprocess, sys, threading, time
from pyorchestrate_worker import group_guard
from pyorchestrate.proc_state import worker_state

everything = sys.argv[1] == "all"
assert group_guard.start()
# found: a process that ignores SIGTERM and starts a child of its own 0.3 s into the grace
found = subprocess.Popen([sys.executable, "-c", "import signal, subprocess, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(0.3); "
                          "print(subprocess.Popen(['sleep', '600']).pid, flush=True); time.sleep(600)"],
                         stdout=subprocess.PIPE, text=True)
time.sleep(0.2)
ending = threading.Thread(target=group_guard.end_members, args=(1.0, "is tested", everything))
ending.start()
time.sleep(0.1)
later = subprocess.Popen(["sleep", "600"])  # started after the call: an agent's of a worker serving again
grandchild = int(found.stdout.readline())
ending.join(30)
runs = lambda pid: worker_state(pid) not in (None, "Z", "X")
print(json.dumps({"found": runs(found.pid), "grandchild": runs(grandchild), "later": runs(later.pid)}), flush=True)
for pid in (later.pid, grandchild):
    if runs(pid):
        os.kill(pid, 9)
"""


@pytest.mark.parametrize("everything", [True, False])
def test_the_group_ends_whole_or_as_it_was_found(everything):
    out = subprocess.run([sys.executable, "-c", DRIVER, "all" if everything else "found"], capture_output=True,
                         text=True, timeout=60, start_new_session=True)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout.splitlines()[-1])
    # SIGKILL for one that ignores SIGTERM, and for what it started during the grace
    assert runs["found"] is False and runs["grandchild"] is False
    assert runs["later"] is (not everything)
