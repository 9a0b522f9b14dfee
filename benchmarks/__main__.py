"""python -m benchmarks [--quick] [--scale X] [--json FILE]: our costs next to the raw-pyzmq floor."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata

from . import floor, ours


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("pyorchestrate", "pyzmq", "msgpack", "cloudpickle", "tenacity"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def run(quick: bool, scale: float) -> dict:
    def n(full: int, fast: int) -> int:
        return max(2, int((fast if quick else full) * scale))

    results: dict[str, dict] = {}
    step = time.perf_counter()

    def done(key: str, value: dict) -> None:
        nonlocal step
        results[key] = value
        print(f"  {key:<22} {json.dumps(value)}  ({time.perf_counter() - step:.1f} s)", file=sys.stderr, flush=True)
        step = time.perf_counter()

    done("floor.rtt", floor.rtt(n(5000, 500)))
    latency_, throughput = floor.dispatch(n(2000, 300), n(20000, 2000))
    done("floor.dispatch", latency_)
    done("floor.dispatch_throughput", throughput)
    done("floor.pubsub", floor.pubsub(n(100_000, 20_000)))
    done("S1", ours.s1_cold_start())
    for variant, value in ours.s2_launch(n(200, 30)).items():
        value["floor_ratio"] = round(value["median_us"] / results["floor.dispatch"]["median_us"], 2)
        done(f"S2.{variant}", value)
    s3 = ours.s3_throughput(n(2000, 300))
    s3["floor_ratio"] = round(s3["per_s"] / results["floor.dispatch_throughput"]["per_s"], 3)
    done("S3", s3)
    for variant, value in ours.s4_long_lived(n(100, 20)).items():
        done(f"S4.{variant}", value)
    s5 = ours.s5_event_bus(n(100_000, 20_000))
    s5["floor_ratio"] = round(s5["per_s"] / results["floor.pubsub"]["per_s"], 3) if results["floor.pubsub"]["per_s"] else None
    done("S5", s5)
    for variant, value in ours.s6_detection(quick).items():
        done(f"S6.{variant}", value)
    done("S7", ours.s7_idle(n(20, 5), 10.0 if not quick else 2.0))
    done("S8", ours.s8_scale(n(50, 6), 20 if not quick else 4))
    return results


def table(scenarios: dict) -> str:
    rows = [f"{'scenario':<24} {'result':<40} floor ratio"]
    for key, value in scenarios.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("floor_ratio", "n"))
        ratio = value.get("floor_ratio")
        rows.append(f"{key:<24} {shown:<40} {'' if ratio is None else ratio}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts, fast settings only (< 2 min)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count (the smoke test uses 0.05)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--peers", action="store_true", help="also run Ray, Dask and ipyparallel (not built yet)")
    args = parser.parse_args()
    if args.peers:
        print("--peers: the peer scenarios are not implemented yet; running ours only", file=sys.stderr)
    started = time.perf_counter()
    scenarios = run(args.quick, args.scale)
    report = {"machine": _machine(), "versions": _versions(), "scenarios": scenarios,
              "seconds": round(time.perf_counter() - started, 1)}
    print(table(scenarios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
