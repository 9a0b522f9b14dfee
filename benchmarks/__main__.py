"""python -m benchmarks [--quick] [--peers] [--scale X] [--soak S] [--json FILE]: our costs next to the raw-pyzmq
floor and (``--peers``) to Ray, Dask and ipyparallel, in one run on this machine.  ``--trace``,
``--lines`` and ``--prototype N`` look inside one launch instead; ``--backlog`` at placement's cost
with thousands of agents waiting."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata

from . import backlog, floor, lean, lines, ours, prototype


def _keys() -> str:
    """A fresh key directory for the CURVE runs (in a temporary directory, kept until exit)."""
    import atexit
    import shutil
    import tempfile

    from pyorchestrate.keys import KeyDir

    path = tempfile.mkdtemp(prefix="pyorchestrate-bench-keys-")
    atexit.register(shutil.rmtree, path, True)
    KeyDir(os.path.join(path, "keys")).init()
    return os.path.join(path, "keys")
from .peers import run_peers
from .stats import count

#: the figure the peer table shows (the first a result has), and whether more is better
MAIN_FIGURE = {"median_us": False, "per_s": True, "seconds": False, "rss_mb": False, "cpu_percent": False}
#: where a scenario's headline is not its first figure
HEADLINE = {"S7": "rss_mb"}


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


def run(quick: bool, scale: float, soak: float = 0.0, burst: int = 0) -> dict:
    def n(full: int, fast: int) -> int:
        return count(full, fast, quick, scale)

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
    keys = _keys()  # the same runs with CurveZMQ on every connection (S2.curve, S3.curve, S5.curve)
    for variant, value in ours.s2_launch(n(200, 30), keys=keys).items():
        value["floor_ratio"] = round(value["median_us"] / results["floor.dispatch"]["median_us"], 2)
        done(f"S2.curve.{variant}", value)
    s3 = ours.s3_throughput(n(2000, 300))
    s3["floor_ratio"] = round(s3["per_s"] / results["floor.dispatch_throughput"]["per_s"], 3)
    done("S3", s3)
    s3 = ours.s3_throughput(n(2000, 300), keys=keys)
    s3["floor_ratio"] = round(s3["per_s"] / results["floor.dispatch_throughput"]["per_s"], 3)
    done("S3.curve", s3)
    for variant, value in ours.s4_long_lived(n(100, 20)).items():
        done(f"S4.{variant}", value)
    s5 = ours.s5_event_bus(n(100_000, 20_000))
    s5["floor_ratio"] = round(s5["per_s"] / results["floor.pubsub"]["per_s"], 3) if results["floor.pubsub"]["per_s"] else None
    done("S5", s5)
    s5 = ours.s5_event_bus(n(100_000, 20_000), keys=keys)
    s5["floor_ratio"] = round(s5["per_s"] / results["floor.pubsub"]["per_s"], 3) if results["floor.pubsub"]["per_s"] else None
    done("S5.curve", s5)
    for variant, value in ours.s6_detection(quick).items():
        done(f"S6.{variant}", value)
    done("S7", ours.s7_idle(n(20, 5), 10.0 if not quick else 2.0))
    done("S8", ours.s8_scale(n(50, 6), 20 if not quick else 4))
    done("S5.lossless", ours.s5_lossless(n(100_000, 20_000)))
    for workers in ((50, 100) if not quick else (n(10, 5),)):
        done(f"S9.{workers}w", ours.s9_scale(workers, n(10_000, 1_000)))
    if not quick:  # as the README advises for many workers beside their coordinator: --nice 19
        done("S9.100w.nice19", ours.s9_scale(100, 10_000, nice=19))
    if soak:
        done("S10", ours.s10_soak(soak))
    if burst:
        done("S11", ours.s11_burst(burst))
    return results


def four_ways(quick: bool, scale: float) -> dict:
    """S2 (thread) and S3 as the floor, the bare prototype, the lean prototype and we do them, one
    after the other: what the hand-offs alone cost here, what the least code keeping our
    guarantees adds to them, and what ours adds."""
    reps, n = count(200, 30, quick, scale), count(2000, 300, quick, scale)
    latency_, throughput = floor.dispatch(reps, n * 10)
    out = {"floor": {"dispatch_us": latency_["median_us"], "per_s": throughput["per_s"]}}
    for side, s2, s3 in (("prototype", prototype.s2, prototype.s3), ("lean", lean.s2, lean.s3),
                         ("ours", lambda r: ours.s2_launch(r)["thread"], ours.s3_throughput)):
        two, three = s2(reps), s3(n)
        out[side] = {"S2_us": two["median_us"], "S2_floor_ratio": round(two["median_us"] / latency_["median_us"], 2),
                     **_s2_cpu(two),
                     "S3_per_s": three["per_s"], "S3_floor_ratio": round(three["per_s"] / throughput["per_s"], 3)}
    return out


#: issue #13's targets against the floor: S2 at most this many times its latency, S3 at least
#: this share of its throughput
S2_TARGET, S3_TARGET = 2.5, 0.25


def prototype_table(rounds: list[dict]) -> str:
    """What ``--prototype N``'s rounds say, side by side: each side's S2 and S3 against each
    round's own floor (median and range), how many rounds met each target, and, from four rounds
    on, S2's median in the rounds whose floor was faster than the rounds' median floor and in the
    rest.  This VM's floor moves several-fold in a day (its thread wake-ups), and S2's ratio with
    it: that last column shows how much."""
    floors = [r["floor"]["dispatch_us"] for r in rounds]
    middle = statistics.median(floors)
    split = len(rounds) >= 4
    out = [f"{len(rounds)} round(s); the floor's dispatch {min(floors):.0f}-{max(floors):.0f} us (median {middle:.0f})",
           (f"{'':10} {'S2 / floor':<22} {'S2 <= ' + str(S2_TARGET) + 'x':<12} {'S3 / floor':<22} "
            f"{'S3 >= ' + format(S3_TARGET, '.0%'):<12}" + ("S2 median, faster / slower floors" if split else "")).rstrip()]
    for side, label in (("prototype", "bare"), ("lean", "lean"), ("ours", "ours")):
        s2 = [r[side]["S2_floor_ratio"] for r in rounds]
        s3 = [r[side]["S3_floor_ratio"] for r in rounds]
        row = (f"{label:10} {f'{statistics.median(s2):.2f}x ({min(s2):.2f}-{max(s2):.2f})':<22} "
               f"{f'{sum(x <= S2_TARGET for x in s2)} of {len(s2)}':<12} "
               f"{f'{statistics.median(s3):.1%} ({min(s3):.1%}-{max(s3):.1%})':<22} "
               f"{f'{sum(x >= S3_TARGET for x in s3)} of {len(s3)}':<12}")
        if split:
            fast = [x for x, f in zip(s2, floors) if f <= middle]
            slow = [x for x, f in zip(s2, floors) if f > middle] or fast
            row += f"{statistics.median(fast):.2f}x / {statistics.median(slow):.2f}x"
        out.append(row.rstrip())
    return "\n".join(out)


def _s2_cpu(s2: dict) -> dict:
    """S2's CPU per launch, beside its latency: one launch at a time, a launch's latency is
    about the CPU its hops use one after the other, so what our work adds shows here too."""
    return {"S2_coordinator_cpu_us": s2["coordinator_cpu_us"], "S2_workers_cpu_us": s2["workers_cpu_us"]}


def table(scenarios: dict) -> str:
    rows = [f"{'scenario':<24} {'result':<40} floor ratio"]
    for key, value in scenarios.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("floor_ratio", "n"))
        ratio = value.get("floor_ratio")
        rows.append(f"{key:<24} {shown:<40} {'' if ratio is None else ratio}")
    return "\n".join(rows)


def _figure(value: dict | None, key: str) -> tuple[str, float | None, bool]:
    """(the figure's name, its value, more is better) of one scenario's result."""
    names = [HEADLINE[key]] if key in HEADLINE else list(MAIN_FIGURE)
    for name in names:
        if value and isinstance(value.get(name), (int, float)):
            return name, float(value[name]), MAIN_FIGURE[name]
    return "", None, False


def _cell(value: dict | None, key: str) -> str:
    if not value:
        return "-"
    if "not_run" in value or "not_installed" in value:
        return "n/a"
    if "error" in value:
        return "error"
    name, figure, _ = _figure(value, key)
    if figure is None:
        return f"none in {value['not_within_s']:.0f} s" if "not_within_s" in value else "-"
    unit = {"median_us": " us", "per_s": "/s", "seconds": " s", "rss_mb": " MB", "cpu_percent": " %"}[name]
    return f"{figure:,.0f}{unit}" if figure >= 100 else f"{figure:.3g}{unit}"


def _advantage(ours: dict, theirs: dict | None, key: str) -> str:
    """How many times better ours is (>1: ours is better)."""
    name, mine, more = _figure(ours, key)
    other_name, other, _ = _figure(theirs, key)
    if mine is None or other is None or name != other_name or not mine or not other:
        return ""
    ratio = mine / other if more else other / mine
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2g}x"


def peer_table(scenarios: dict, peers: dict) -> str:
    """Ours next to each peer's same scenario, with how many times better ours is."""
    names = list(peers)
    head = f"{'scenario':<18} {'ours':>12} " + " ".join(f"{n:>13} {'ours/x':>7}" for n in names)
    rows = [head]
    extra = {k: {} for name in names for k in peers[name].get("scenarios", {}) if k not in scenarios}
    for key, value in {**scenarios, **extra}.items():  # then what only peers ran (e.g. S3.actor)
        if key.startswith("floor."):
            continue
        cells = []
        for name in names:
            theirs = peers[name].get("scenarios", {}).get(key)
            cells.append(f"{_cell(theirs, key):>13} {_advantage(value, theirs, key):>7}")
        rows.append(f"{key:<18} {_cell(value, key):>12} " + " ".join(cells))
    notes = [f"  {name} {key}: {value['differs']}" for name in names
             for key, value in peers[name].get("scenarios", {}).items() if value.get("differs")]
    return "\n".join(rows + ["", "Where a peer's scenario differs from ours:"] + notes)


def _dump(path: str | None, key: str, value: object) -> None:
    """``--json`` of a mode that looks at one thing: its results, with the machine and versions."""
    if path:
        with open(path, "w") as f:
            json.dump({"machine": _machine(), "versions": _versions(), key: value}, f, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts, fast settings only (< 2 min)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count (the smoke test uses 0.05)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--soak", type=float, default=0.0, metavar="S",
                        help="also run S10: S seconds of agents registered and finished at 500/s (e.g. 300)")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="also run S11: N long-lived agents registered at once on 2 workers (e.g. 20000)")
    parser.add_argument("--trace", action="store_true",
                        help="only time each hop of S2's thread launches and print the table (see pyorchestrate/trace.py)")
    parser.add_argument("--lines", action="store_true",
                        help="only count the Python lines one S2 thread launch runs, ours beside the lean prototype, "
                             "per process and thread (benchmarks/lines.py)")
    parser.add_argument("--prototype", type=int, default=0, metavar="ROUNDS",
                        help="only S2 and S3 four ways per round, in the same run: the floor, the bare "
                             "prototype (the same hand-offs, nothing else: benchmarks/prototype.py), the lean "
                             "prototype (those plus the least code keeping our guarantees: benchmarks/lean.py) "
                             "and ours")
    parser.add_argument("--backlog", action="store_true",
                        help="only what a backlog of pending agents costs placement (benchmarks/backlog.py: "
                             "20,000 agents over full workers, under max_workers, pinned to one full worker, "
                             "2,000 beside 20,000 waiting for a dependency, 20,000 that depend on one "
                             "setup agent over full workers, and 10,000 pairs, one depending on the other)")
    parser.add_argument("--peers", action="store_true",
                        help="also run Ray, Dask and ipyparallel (pip install -e '.[peers]')")
    parser.add_argument("--peer-timeout", type=float, default=600.0, metavar="S",
                        help="give up on a peer after S seconds (default 600)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.trace:
        reps = count(300, 50, args.quick, args.scale)
        rows = ours.s2_trace(reps)
        # the prototypes' same hops in the same run: what each hop costs with nothing of ours
        # (bare) and with the least code that keeps our guarantees (lean)
        proto = {row["hop"]: row for row in prototype.s2_trace(reps)}
        leaner = {row["hop"]: row for row in lean.s2_trace(reps)}
        print(f"{'hop':<22} {'ours us':>9} {'lean us':>9} {'bare us':>9}  what")
        for row in rows:
            bare = proto.get(row["hop"], {}).get("median_us", "")
            row["prototype_us"] = bare
            row["lean_us"] = leaner.get(row["hop"], {}).get("median_us", "")
            print(f"{row['hop']:<22} {row['median_us']:>9} {row['lean_us']:>9} {bare:>9}  {row['what']}")
        _dump(args.json, "trace", rows)
        return 0
    if args.lines:
        counted = lines.lines(count(300, 50, args.quick, args.scale))
        print(lines.table(counted))
        _dump(args.json, "lines", counted)
        return 0
    if args.backlog:
        results = backlog.run(count(20000, 2000, args.quick, args.scale))
        print(backlog.table(results))
        _dump(args.json, "backlog", results)
        return 0
    if args.prototype:
        rounds = [four_ways(args.quick, args.scale) for _ in range(args.prototype)]
        for one in rounds:
            print(json.dumps(one))
        print()
        print(prototype_table(rounds))
        _dump(args.json, "rounds", rounds)
        return 0
    scenarios = run(args.quick, args.scale, args.soak, args.burst)
    report = {"machine": _machine(), "versions": _versions(), "scenarios": scenarios}
    print(table(scenarios))
    if args.peers:
        peers = run_peers(args.quick, args.scale, args.peer_timeout)
        report["peers"] = {name: value.get("scenarios", value) for name, value in peers.items()}
        for value in peers.values():
            report["versions"].update(value.get("versions", {}))
        print()
        print(peer_table(scenarios, peers))
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
