"""The cycle benchmark (`benchmarks/cycle.py`) on a small cluster, so that it cannot rot: both
cycles end Done with every VM home (the benchmark refuses otherwise), every running VM moved
exactly twice, no host ever held more running-VM memory than it has, and the nodes of one wave
were patched side by side. Nothing here is timed: the speed is the benchmark's to report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cycle as bench

pytestmark = pytest.mark.slow


def _entered(folder: Path, run_id: str) -> dict[str, str]:
    """When the node run entered each state (ISO times, UTC)."""
    history = json.loads(bench.nodepatch(folder, "history", run_id, "--json").stdout)
    return {e["to"]: e["time"] for e in history["events"] if e["kind"] == "transition"}


def test_the_quick_cycle_benchmark_keeps_its_invariants(tmp_path: Path) -> None:
    figures, (serial, auto) = bench.measure(tmp_path, bench.QUICK)

    assert set(figures) == {
        "cycle_serial_s",
        "cycle_auto_s",
        "cycle_speedup",
        "cycle_migrations_per_moved_vm",
        "cycle_memory_overcommits",
    }
    for run in (serial, auto):
        assert run.moved_vms == run.running_vms > 0  # every running VM had to leave its node
        assert run.migrations == 2 * run.moved_vms  # off the node and back, nothing more
        assert run.overcommits == 0
        assert sorted(n for w in run.waves for n in w) == [
            f"hv{i:02d}" for i in range(1, bench.QUICK.hosts + 1)
        ]
    assert figures["cycle_migrations_per_moved_vm"] == 2.0
    assert figures["cycle_memory_overcommits"] == 0
    assert all(len(w) == 1 for w in serial.waves)
    wide = [w for w in auto.waves if len(w) > 1]
    assert wide, auto.waves  # the small cluster has room for waves of several nodes

    # The nodes of a wave were patched side by side: each entered Draining before any other of
    # its wave was Done (driven one after another, a node would start after the last ended).
    doc = json.loads((tmp_path / "auto" / "cycle.json").read_text(encoding="utf-8"))
    runs = {n["node"]: n["run_id"] for n in doc["nodes"]}
    for wave in wide:
        entered = [_entered(tmp_path / "auto", runs[node]) for node in wave]
        assert max(e["Draining"] for e in entered) < min(e["Done"] for e in entered), wave


def test_report_prints_one_line_per_figure_with_its_target(tmp_path: Path) -> None:
    """The printed lines name every figure's target (no cluster needed: made-up runs)."""
    run = bench.CycleRun("1", 90.0, 100.0, 110.0, 1.0, [["hv01"]], 4, 2, 2, 0)
    figures = {
        "cycle_serial_s": 100.0,
        "cycle_auto_s": 50.0,
        "cycle_speedup": 2.0,
        "cycle_migrations_per_moved_vm": 2.0,
        "cycle_memory_overcommits": 0.0,
    }
    lines = bench.report(bench.QUICK, figures, [run, run])
    assert len(lines) == 6
    assert "target >= 1.8x" in lines[3]
    assert "target exactly 2" in lines[4]
    assert "target 0" in lines[5]
