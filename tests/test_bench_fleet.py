"""The fleet benchmark (benchmarks/fleet.py) in a quick mode, end to end, so that it cannot rot:
real worker processes on a real simulated fleet, on SQLite and (when reachable) PostgreSQL.
Speed is not asserted here; what is asserted is that every run ended Done with no side effect
twice, and that the figures were measured."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import sqlalchemy as sa

from benchmarks import fleet
from engine import db
from tests.conftest import PG_URL, REQUIRE_PG

pytestmark = pytest.mark.slow


def _postgres_reachable() -> bool:
    admin = sa.create_engine(db.normalise_url(PG_URL))
    try:
        with admin.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        admin.dispose()


@pytest.mark.timeout(900)
def test_the_fleet_benchmark_runs_end_to_end() -> None:
    """Quick mode: 3 clusters of 2 hosts, 2 runs each, driven by 2 workers per database; 4
    runs waiting for a signal for the idle count. No duplicate side effect; every figure is
    there; the idle workers' statements are counted (they poll every second)."""
    figures = fleet.main(
        [
            "--runs",
            "6",
            "--clusters",
            "3",
            "--hosts",
            "2",
            "--vms",
            "4",
            "--pg-workers",
            "2",
            "--sqlite-workers",
            "2",
            "--concurrency",
            "2",
            "--idle-runs",
            "4",
            "--idle-seconds",
            "3",
            "--idle-poll",
            "1",
            "--timeout",
            "300",
            "--no-record",
        ]
    )
    assert figures["fleet_duplicate_side_effects"] == 0
    assert figures["fleet_sqlite_runs_per_s"] > 0
    assert figures["fleet_rss_growth"] > 0
    if REQUIRE_PG or _postgres_reachable():
        assert figures["fleet_pg_runs_per_s"] > 0
        assert figures["idle_statements_per_s"] > 0
        assert figures["idle_statements_per_s_no_runs"] > 0


def _document(moves: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fleet of one cluster (hosts a, b; VM v1 on a, v2 on b) before and after 2 runs."""
    before = {
        "clusters": [{"name": "cluster1", "hosts": [{"name": "a"}, {"name": "b"}]}],
        "vms": [{"id": "1", "name": "v1", "host": "a"}, {"id": "2", "name": "v2", "host": "b"}],
        "operations": {"live_migrate": 0, "move_vm": 0},
    }
    after = copy.deepcopy(before)
    after["operations"] = {
        "enter_maintenance": 2,
        "exit_maintenance": 2,
        "reboot_host": 2,
        **moves,
    }
    return before, after


def test_duplicates_counts_every_side_effect_beyond_what_the_runs_needed() -> None:
    """Two runs (a, then b), one VM each: 2 moves per VM are expected; a third is one
    duplicate; a missing one fails the benchmark; a VM not back home fails it too."""
    before, exact = _document({"live_migrate": 2, "move_vm": 2})
    assert fleet.duplicates(before, exact, runs=2, clusters=1) == 0
    _, extra = _document({"live_migrate": 3, "move_vm": 2})
    assert fleet.duplicates(before, extra, runs=2, clusters=1) == 1
    _, saved = _document({"live_migrate": 2, "move_vm": 2, "save_vm": 1})
    assert fleet.duplicates(before, saved, runs=2, clusters=1) == 1
    _, short = _document({"live_migrate": 2, "move_vm": 1})
    with pytest.raises(fleet.BenchFailed, match="missing"):
        fleet.duplicates(before, short, runs=2, clusters=1)
    _, moved = _document({"live_migrate": 2, "move_vm": 2})
    moved["vms"][0]["host"] = "b"
    with pytest.raises(fleet.BenchFailed, match="not back"):
        fleet.duplicates(before, moved, runs=2, clusters=1)
