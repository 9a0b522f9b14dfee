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
                "S7", "S8"}
    assert expected <= set(report["scenarios"])
    assert report["scenarios"]["S5"]["lost"] == report["scenarios"]["floor.pubsub"]["lost"] == 0
    assert "floor ratio" in result.stdout
