"""Database faults under real processes: PostgreSQL connections killed mid-run, SQLite contention.

The runner's PostgreSQL connections are terminated from another connection while a slow run is
in Draining or Patching; several processes write to one database at once. Either way every run
must end Done with each transition exactly once and no database error reaching the user.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine import db
from tests import durability as d
from tests.conftest import postgres_database
from workflows.backends.simulated import SimulatedCluster

STEPS = [
    ("Preflight", "Draining"),
    ("Draining", "Patching"),
    ("Patching", "Enabling"),
    ("Enabling", "Rebalancing"),
    ("Rebalancing", "Done"),
]
KILL_OTHERS = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database of its own."""
    yield from postgres_database()


def _state(conn: sa.Connection) -> str | None:
    return conn.exec_driver_sql("SELECT state FROM run").scalar()


@pytest.mark.postgres
def test_runner_whose_connections_are_killed_mid_run_reconnects_and_finishes(
    tmp_path: Path, pg_url: str
) -> None:
    """While the run is in Draining and Patching, every connection of the runner is terminated
    again and again (pg_terminate_backend): it reconnects and ends Done, with every transition
    exactly once and every cluster operation exactly once."""
    cli = d.make_cli(tmp_path, pg_url, d.config(lease_ttl_s=3, patch_seconds=5))
    big = 8192  # drain ~40 and patch ~125 simulated seconds: about 1 s and 3 s of real time
    scenario = d.scenario(
        d.vm("h1", "hv1", memory=big), d.vm("h2", "hv1", memory=big), d.vm("o1", "hv2")
    )
    sim = SimulatedCluster.create(cli.sim, scenario, speed=40)
    before = d.placement(sim)
    proc = d.spawn(cli, "start", "--cluster", "c1", "--node", "hv1", "--json")
    admin = sa.create_engine(db.normalise_url(pg_url), isolation_level="AUTOCOMMIT")
    kills: dict[str, int] = {}
    try:
        with admin.connect() as conn:
            d.wait_for(lambda: _state(conn) not in (None, "Preflight"), timeout=60)
            while proc.proc.poll() is None:
                state = _state(conn)
                if state not in ("Draining", "Patching"):
                    if kills:
                        break
                    time.sleep(0.02)
                    continue
                killed = conn.exec_driver_sql(KILL_OTHERS).scalar() or 0
                if killed:
                    kills[str(state)] = kills.get(str(state), 0) + 1
                time.sleep(0.1)
    finally:
        admin.dispose()
    result = proc.wait()
    assert result.code == 0, result.err
    assert set(kills) == {"Draining", "Patching"}, kills
    run_id = result.json()["run_id"]
    with d.store(pg_url) as s:
        events = s.events(run_id)
    assert d.transitions(events) == STEPS
    assert d.placement(sim) == before
    assert d.operations(sim.counts()) == d.ONCE


def test_many_processes_writing_at_once_all_finish_without_lock_errors(
    tmp_path: Path, db_url: str
) -> None:
    """Six runs on six clusters, driven by six processes at once on one database while other
    processes read it: every run ends Done with each transition once, and no process reports
    a locked or unavailable database."""
    clis = []
    for index in range(6):
        cli = d.make_cli(tmp_path / f"c{index}", db_url)
        scenario = d.scenario(
            *(d.vm(f"v{index}-{n}", "hv1") for n in range(3)), cluster=f"c{index}"
        )
        SimulatedCluster.create(cli.sim, scenario)
        clis.append(cli)
    writers = [
        d.spawn(cli, "start", "--cluster", f"c{i}", "--node", "hv1", "--json")
        for i, cli in enumerate(clis)
    ]
    readers = [d.spawn(clis[0], "runs", "--json") for _ in range(3)]
    results = [p.wait() for p in writers]
    others = [p.wait() for p in readers]
    for result in results + others:
        assert result.code == 0, result.err
        assert "locked" not in result.err and "unavailable" not in result.err, result.err
    with d.store(db_url) as s:
        runs = s.runs()
        assert sorted(r.state for r in runs) == ["Done"] * 6
        for run in runs:
            assert d.transitions(s.events(run.id)) == STEPS


@pytest.mark.postgres
def test_an_idle_pooled_connection_that_died_is_replaced_before_use(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections are pinged only after sitting idle (IDLE_PING_S), not on every checkout: a
    pooled connection terminated while idle is found dead by that ping and replaced, so the
    next transaction, retried or not, runs on a new connection without an error; a connection
    reused at once is not pinged (one round trip fewer on every transaction of a busy worker)."""
    engine = db.connect(pg_url)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    pings: list[object] = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(c) or ping(c))
    admin = sa.create_engine(db.normalise_url(pg_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            first = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with engine.connect() as conn:  # at once: the same connection, no ping
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == first
        assert (len(statements), len(pings)) == (2, 0)
        with admin.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({first})").scalar()
        monkeypatch.setattr(db, "IDLE_PING_S", 0.0)  # as if it had sat idle for long
        with engine.connect() as conn:
            second = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert second != first
        assert len(pings) == 1
    finally:
        admin.dispose()
        engine.dispose()
