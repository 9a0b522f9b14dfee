"""The benchmark suite runs (tiny sizes; no timing assertions: numbers live in benchmarks/)."""

from __future__ import annotations

import json

from conftest import REPO, run_script


def test_benchmarks_quick_tiny_runs_and_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script(["-m", "benchmarks", "--quick", "--scale", "0.05", "--json", str(out)], cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert {"machine", "versions", "scenarios"} <= set(report)
    expected = {"floor.rtt", "floor.dispatch", "floor.dispatch_throughput", "floor.pubsub", "S1", "S2.thread",
                "S2.process", "S3", "S4.thread", "S4.process", "S5", "S6.kill", "S6.hung.fast", "S6.process_agent",
                "S7", "S8", "S5.lossless", "S9.2w", "S2.curve.thread", "S2.curve.process", "S3.curve", "S5.curve"}
    assert expected <= set(report["scenarios"])
    assert report["scenarios"]["S5"]["lost"] == report["scenarios"]["floor.pubsub"]["lost"] == 0
    assert report["scenarios"]["S5.curve"]["lost"] == 0  # every event through the encrypted bus
    assert report["scenarios"]["S5.lossless"]["silent"] == 0
    s9 = report["scenarios"]["S9.2w"]
    assert s9["executions_min"] == s9["executions_max"] == 1 and s9["worker_lost"] == 0
    assert "floor ratio" in result.stdout


def test_prototype_runs_s2_and_s3_four_ways(tmp_path):
    """--prototype: the floor, the bare prototype (the same hand-offs, nothing else), the lean one
    (those plus the least code keeping our guarantees) and ours."""
    out = tmp_path / "proto.json"
    result = run_script(["-m", "benchmarks", "--prototype", "1", "--quick", "--scale", "0.2", "--json", str(out)],
                        cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr
    (one,) = json.loads(out.read_text())["rounds"]
    for side in ("prototype", "lean", "ours"):
        assert one[side]["S2_us"] > 0 and one[side]["S3_per_s"] > 0 and one[side]["S2_floor_ratio"] > 0, one
        # the CPU of a launch's path, both processes (read from /proc: this suite runs on Linux)
        assert one[side]["S2_coordinator_cpu_us"] > 0 and one[side]["S2_workers_cpu_us"] > 0, one
    assert "1 round(s); the floor's dispatch" in result.stdout and "S2 <= 2.5x" in result.stdout


def test_prototype_table_counts_the_rounds_that_met_each_target():
    """The summary after --prototype's rounds, from made-up rounds (pure: no benchmark runs)."""
    from benchmarks.__main__ import prototype_table

    def side(s2: float, s3: float) -> dict:
        return {"S2_floor_ratio": s2, "S3_floor_ratio": s3}

    # floors 100, 110 (the faster half) and 300, 400; ours meets S2 only in the slow-floor rounds;
    # the bare prototype's 2.5x meets the target (at most 2.5x)
    rounds = [{"floor": {"dispatch_us": f}, "prototype": side(b, 1.0), "lean": side(l, 0.5), "ours": side(o, s3)}
              for f, b, l, o, s3 in ((100, 2.6, 3.5, 5.0, 0.20), (110, 2.5, 3.3, 4.6, 0.22),
                                     (300, 1.5, 2.1, 2.4, 0.26), (400, 1.3, 1.9, 2.2, 0.30))]
    table = prototype_table(rounds).splitlines()
    assert table[0] == "4 round(s); the floor's dispatch 100-400 us (median 205)"
    ours = next(row for row in table if row.startswith("ours"))
    assert ours.split()[1:] == ["3.50x", "(2.20-5.00)", "2", "of", "4", "24.0%", "(20.0%-30.0%)", "2", "of", "4",
                                "4.80x", "/", "2.30x"]
    bare = next(row for row in table if row.startswith("bare"))
    assert bare.split()[3:6] == ["3", "of", "4"] and bare.endswith("2.55x / 1.40x")


def test_lines_counts_a_launch_in_every_process_of_both_sides(tmp_path):
    """--lines: the Python lines one S2 launch runs, ours and the lean prototype's, counted in the
    coordinator's process and (toggled by SIGUSR2) in the workers."""
    out = tmp_path / "lines.json"
    result = run_script(["-m", "benchmarks", "--lines", "--quick", "--scale", "0.2", "--json", str(out)],
                        cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr
    counted = json.loads(out.read_text())["lines"]
    for side in ("ours", "lean"):
        # the coordinator's loop, the workers' loops and the agents' threads all ran lines
        assert sum(counted[side]["coordinator"].values()) > 50, counted[side]
        assert counted[side]["workers"].get("agent", 0) > 5 and counted[side]["workers"].get("MainThread", 0) > 50
    assert counted["ours"]["coordinator"]["pyorchestrate-coordinator"] > 50
    assert any(name.startswith("supervisor.py:") for name in counted["ours"]["worker_functions"])
    assert "Python lines a launch" in result.stdout

def test_peer_table_compares_like_with_like_and_says_why_not():
    from benchmarks.__main__ import peer_table

    ours = {"S2.thread": {"median_us": 500.0, "p99_us": 900.0}, "S3": {"per_s": 4000},
            "S6.hung.default": {"seconds": 5.2}, "S7": {"rss_mb": 30.0, "seconds": 10.0}}
    peers = {"ray": {"scenarios": {"S2.thread": {"median_us": 1500.0, "differs": "a task"},
                                   "S3": {"per_s": 8000},
                                   "S6.hung.default": {"seconds": None, "not_within_s": 90.0},
                                   "S7": {"rss_mb": 60.0}}},
             "dask": {"scenarios": {"S2.thread": {"error": "RuntimeError: boom"}, "S3": {"not_run": "no"}}},
             "ipyparallel": {"not_installed": "pip install -e '.[peers]'"}}
    rows = {line.split()[0]: line.split()[1:] for line in peer_table(ours, peers).splitlines()[1:] if line.strip()}
    assert rows["S2.thread"][:4] == ["500", "us", "1,500", "us"] and "3.0x" in rows["S2.thread"]
    assert "0.5x" in rows["S3"] and "n/a" in rows["S3"]  # ours slower: said, not hidden
    assert "error" in rows["S2.thread"]
    assert rows["S6.hung.default"][2:5] == ["none", "in", "90"]
    assert rows["S7"][:2] == ["30", "MB"] and "2.0x" in rows["S7"]  # S7's headline is memory
    assert "ray S2.thread: a task" in peer_table(ours, peers)


def test_trace_times_every_hop_of_a_launch_in_every_process(tmp_path):
    """--trace: each hop of S2's launches, the workers' hops too (a worker ends through os._exit,
    which skips atexit: its marks are written before it, or the worker's six hops go missing)."""
    out = tmp_path / "trace.json"
    result = run_script(["-m", "benchmarks", "--trace", "--quick", "--scale", "0.2", "--json", str(out)],
                        cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr
    rows = {row["hop"]: row for row in json.loads(out.read_text())["trace"]}
    hops = ["register", "queued", "loop", "sent", "received", "handed", "running", "ended", "flushed", "reported",
            "published", "callback", "woke"]
    expected = [f"{a} -> {b}" for a, b in zip(hops, hops[1:])] + ["register -> woke"]
    assert list(rows) == expected, list(rows)
    for row in rows.values():
        # a number, not necessarily >= 0: each side marks a hand-off once its send returned, and on
        # a busy machine the receiver often marks first (CI: flushed -> reported, -362 us)
        assert row["n"] >= 5 and isinstance(row["median_us"], float), row
        # the prototypes time the same hops in the same run
        assert row["lean_us"] != "" and row["prototype_us"] != "", row


def test_backlog_runs_every_case(tmp_path):
    """--backlog: placement with many agents waiting (tiny sizes: that it runs and counts, not how fast)."""
    out = tmp_path / "backlog.json"
    result = run_script(["-m", "benchmarks", "--backlog", "--quick", "--scale", "0.1", "--json", str(out)],
                        cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["backlog"]
    assert set(results) == {"floor", "capacity", "max_workers", "pinned", "beside_waiting", "fan_out", "pairs"}
    assert all(value["per_s"] > 0 for value in results.values())
    assert "of the floor" in result.stdout
