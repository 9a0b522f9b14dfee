"""The thread floor under S11: plain CPython threads, no pyorchestrate, each waking once a second
(``Event.wait(1.0)`` in a loop, like S11's idle agents), and how late a main thread's 50 ms sleeps
come back meanwhile.  Shows where one process of N such threads stops keeping time on this
machine, whatever runs them.

    python -m benchmarks.threads 5000 10000 --switch 0.005 0.2

Each case runs in a fresh process (bounded: start, 2 s settle, 100 x 50 ms samples)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def one(n: int, switch: float) -> dict:
    sys.setswitchinterval(switch)
    stop = threading.Event()

    def agent() -> None:
        while not stop.wait(1.0):
            pass

    threads = [threading.Thread(target=agent, daemon=True) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    started = time.perf_counter() - t0
    time.sleep(2.0)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    late = []
    for _ in range(100):
        a = time.perf_counter()
        time.sleep(0.05)
        late.append(time.perf_counter() - a - 0.05)
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    stop.set()
    late.sort()
    return {"threads": n, "switch_s": switch, "start_s": round(started, 2),
            "cpu_percent": round(100 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (w1 - w0)),
            "late_ms_p50": round(late[50] * 1000, 1), "late_ms_max": round(late[-1] * 1000, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("threads", type=int, nargs="+")
    p.add_argument("--switch", type=float, nargs="+", default=[0.005])
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.threads[0], args.switch[0])))
        return
    for switch in args.switch:
        for n in args.threads:
            try:
                out = subprocess.run([sys.executable, "-m", "benchmarks.threads", str(n), "--switch", str(switch),
                                      "--one"], capture_output=True, text=True, timeout=300,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                print(out.stdout.strip() or json.dumps({"threads": n, "switch_s": switch, "error": out.stderr[-300:]}),
                      flush=True)
            except subprocess.TimeoutExpired:
                print(json.dumps({"threads": n, "switch_s": switch, "error": "no answer in 300 s"}), flush=True)


if __name__ == "__main__":
    main()
