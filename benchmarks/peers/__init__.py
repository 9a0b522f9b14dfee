"""The tools users would otherwise pick (Ray, Dask, ipyparallel), run through our scenarios.

Each peer runs in a process of its own session, so a peer that hangs or crashes costs its own
results and nothing else, and whatever it started is ended with its process group."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

#: peer name -> (module that must be importable, our module that runs it)
PEERS = {"ray": ("ray", "ray_peer"), "dask": ("distributed", "dask_peer"),
         "ipyparallel": ("ipyparallel", "ipyparallel_peer")}


def run_peers(quick: bool, scale: float, timeout: float) -> dict[str, dict]:
    """Every installed peer's scenarios (``{"not_installed": ...}`` for the others)."""
    out: dict[str, dict] = {}
    for peer, (needs, module) in PEERS.items():
        if importlib.util.find_spec(needs) is None:
            out[peer] = {"not_installed": f"pip install -e '.[peers]' (needs {needs})"}
            print(f"  [{peer}] not installed: skipped", file=sys.stderr)
            continue
        out[peer] = _run_one(peer, module, quick, scale, timeout)
    return out


def _run_one(peer: str, module: str, quick: bool, scale: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", f"benchmarks.peers.{module}", "--scale", str(scale), "--json", result]
        if quick:
            cmd.append("--quick")
        # ipyparallel writes its profile and connection files under IPYTHONDIR: keep them here
        env = {**os.environ, "IPYTHONDIR": os.path.join(tmp, "ipython"), "RAY_USAGE_STATS_ENABLED": "0"}
        log_path = os.path.join(tmp, "log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                    start_new_session=True)
            echo = threading.Thread(target=_echo, args=(proc.stderr, log), daemon=True)
            echo.start()
            try:
                proc.wait(timeout)
                error = None if proc.returncode == 0 else f"exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout:.0f} s"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever the peer left running
                except ProcessLookupError:
                    pass
                proc.wait()
                echo.join(5)
        try:
            with open(result) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {"versions": {}, "scenarios": {}}
        if error:
            with open(log_path) as f:
                tail = f.read()[-2000:]
            print(f"  [{peer}] {error}; the end of its output:\n{tail}", file=sys.stderr)
            report["error"] = error
        return report


def _echo(stream, log) -> None:
    # progress lines to our stderr; everything (peers are chatty) to the log
    for line in stream:
        log.write(line)
        if line.startswith("  ["):
            sys.stderr.write(line)
            sys.stderr.flush()
