"""Races between real processes on one run, and between runs on one cluster.

The simulated cluster runs at a crawl (`speed` 0.001) while the contenders arrive, so the first
holder is certainly still inside its step; the test then speeds the cluster up to let it finish.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine import db
from tests import durability as d
from workflows.backends.simulated import SimulatedCluster

CRAWL, FAST = 0.001, 100_000.0
SCENARIO = d.scenario(
    d.vm("h1", "hv1"),
    d.vm("h2", "hv1"),
    d.vm("g1", "hv2"),
    d.vm("g2", "hv2", state="PowerOff"),
    d.vm("o1", "hv3"),
)
STEPS = [
    ("Draining", "Patching"),
    ("Patching", "Enabling"),
    ("Enabling", "Rebalancing"),
    ("Rebalancing", "Done"),
]

pytestmark = pytest.mark.slow


def _started(cli: d.Cli, sim: SimulatedCluster) -> str:
    """A run stopped on entering Draining, on a cluster now crawling."""
    result = cli("start", "--cluster", "c1", "--node", "hv1", "--until", "Draining", "--json")
    assert result.code == 3, result.err
    sim.set_speed(CRAWL)
    return str(result.json()["run_id"])


def _journaled(db_url: str, run_id: str, job: str) -> bool:
    with d.store(db_url) as s:
        entries = s.journal_entries(run_id)
    return any(e.step_key.endswith(f":{job}") and e.status == "submitted" for e in entries)


def test_eight_resumes_at_once_one_drives_and_the_others_exit_busy_naming_it(
    tmp_path: Path, db_url: str
) -> None:
    """Eight processes resume one run at once: one drives every step (each transition once,
    each cluster operation once), the seven others exit 4 naming the holder."""
    cli = d.make_cli(tmp_path, db_url, d.config(lease_ttl_s=10))
    sim = SimulatedCluster.create(cli.sim, SCENARIO)
    before = d.placement(sim)
    run_id = _started(cli, sim)
    procs = [d.spawn(cli, "resume", run_id) for _ in range(8)]
    d.wait_for(lambda: sum(p.proc.poll() is not None for p in procs) >= 7, timeout=60)
    sim.set_speed(FAST)
    results = {p.proc.pid: p.wait() for p in procs}
    winners = [pid for pid, r in results.items() if r.code == d.EXIT_DONE]
    assert len(winners) == 1, {pid: (r.code, r.err) for pid, r in results.items()}
    (winner,) = winners
    for pid, result in results.items():
        if pid != winner:
            assert result.code == d.EXIT_BUSY, result.err
            assert f":{winner} " in result.err and "held by" in result.err, result.err
    with d.store(db_url) as s:
        events = s.events(run_id)
    assert d.transitions(events)[1:] == STEPS
    driving = [e for e in events if e.kind in ("lease", "transition") and e.run_version > 2]
    assert {e.actor.rsplit(":", 1)[1] for e in driving} == {str(winner)}
    assert d.operations(sim.counts()) == d.ONCE
    assert d.placement(sim) == before


def test_holder_killed_with_sigkill_is_taken_over_after_its_lease_expires(
    tmp_path: Path, db_url: str
) -> None:
    """A holder killed mid-drain keeps the run busy (exit 4, naming it) until its lease
    expires; then a new process takes over, re-attaches to the drain job and finishes, every
    cluster operation done once."""
    # A lease long enough to outlive the start-up of the `busy` probe on a loaded machine.
    cli = d.make_cli(tmp_path, db_url, d.config(lease_ttl_s=5))
    sim = SimulatedCluster.create(cli.sim, SCENARIO)
    before = d.placement(sim)
    run_id = _started(cli, sim)
    holder = d.spawn(cli, "resume", run_id)
    # Kill once the drain job's reference is journaled: the window between a submit and its
    # journaling is the crash matrix's `after_submit:*` points, killed deterministically there.
    d.wait_for(lambda: _journaled(db_url, run_id, "enter_maintenance"), timeout=60)
    os.kill(holder.proc.pid, signal.SIGKILL)
    assert holder.wait().code == -signal.SIGKILL
    busy = cli("resume", run_id)
    assert busy.code == d.EXIT_BUSY
    assert f":{holder.proc.pid} " in busy.err, busy.err
    sim.set_speed(FAST)
    result = d.resume_until_settled(cli, run_id)
    assert result.code == 0, result.err
    with d.store(db_url) as s:
        events = s.events(run_id)
    takeovers = [e for e in events if e.kind == "lease" and "taken_over_from" in e.details]
    assert [e.details["taken_over_from"].rsplit(":", 1)[1] for e in takeovers] == [
        str(holder.proc.pid)
    ]
    assert d.transitions(events)[1:] == STEPS
    assert d.operations(sim.counts()) == d.ONCE
    assert d.placement(sim) == before


def test_second_node_of_a_cluster_started_at_the_same_time_is_refused_untouched(
    tmp_path: Path, db_url: str
) -> None:
    """Two runs start at once on two nodes of one cluster: one takes the cluster, the other
    fails (exit 1) naming the run that holds it, and nothing of its node or VMs is touched."""
    cli = d.make_cli(tmp_path, db_url)
    sim = SimulatedCluster.create(cli.sim, SCENARIO, speed=CRAWL)
    before = d.placement(sim)
    procs = {
        node: d.spawn(cli, "start", "--cluster", "c1", "--node", node, "--json")
        for node in ("hv1", "hv2")
    }
    d.wait_for(lambda: any(p.proc.poll() is not None for p in procs.values()), timeout=60)
    time.sleep(0.2)
    sim.set_speed(FAST)
    results = {node: p.wait() for node, p in procs.items()}
    losers = [node for node, r in results.items() if r.code == d.EXIT_FAILED]
    assert len(losers) == 1, {n: (r.code, r.err) for n, r in results.items()}
    (loser,) = losers
    (winner,) = {"hv1", "hv2"} - {loser}
    assert results[winner].code == 0, results[winner].err
    refused = results[loser].json()
    assert refused["state"] == "Refused"
    assert refused["error"]["state"] == "Preflight"
    assert results[winner].json()["run_id"] in refused["error"]["reason"]
    ops = d.operations(sim.counts())
    theirs = {vm for vm, (host, _) in before.items() if host == loser}
    touched = {k for k in ops if k.split(":", 1)[1] in theirs | {loser}}
    assert touched == set()
    assert d.placement(sim) == before
    assert not any(d.maintenance(sim).values())


def _outside_a_write(db_url: str) -> bool:
    """Whether the database takes a write right now: a process frozen inside a transaction
    would hold its locks for as long as it is frozen."""
    engine = sa.create_engine(
        db.normalise_url(db_url),
        connect_args={"timeout": 0.2} if db_url.startswith("sqlite") else {},
    )
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("SET lock_timeout = '200ms'")
                conn.exec_driver_sql("LOCK TABLE run, step_journal, run_event IN EXCLUSIVE MODE")
            conn.rollback()
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def _cluster_free(sim: Path) -> bool:
    """Whether the simulated cluster's file lock is free."""
    fd = os.open(sim.with_name(sim.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _freeze(proc: d.Spawned, cli: d.Cli) -> None:
    """SIGSTOP the process at a moment it holds no lock: none in the database, none on the
    simulated cluster."""
    for _ in range(100):
        os.kill(proc.proc.pid, signal.SIGSTOP)
        if _outside_a_write(cli.db_url) and _cluster_free(cli.sim):
            return
        os.kill(proc.proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the holder never left its transaction")


def test_a_frozen_holder_taken_over_writes_nothing_when_it_wakes(
    tmp_path: Path, db_url: str
) -> None:
    """A holder frozen with SIGSTOP mid-drain, past its lease: another process takes the run
    over and finishes it. Woken with SIGCONT, the old holder writes nothing, makes no cluster
    operation, and exits 4 with one clear line."""
    cli = d.make_cli(tmp_path, db_url, d.config(lease_ttl_s=2))
    sim = SimulatedCluster.create(cli.sim, SCENARIO)
    before = d.placement(sim)
    run_id = _started(cli, sim)
    holder = d.spawn(cli, "resume", run_id)
    d.wait_for(lambda: _journaled(db_url, run_id, "enter_maintenance"), timeout=60)
    _freeze(holder, cli)
    try:
        time.sleep(2.5)  # past the frozen holder's lease
        sim.set_speed(FAST)
        taker = d.resume_until_settled(cli, run_id)
        assert taker.code == 0, taker.err
        with d.store(db_url) as s:
            rows = (s.get(run_id), s.events(run_id), s.journal_entries(run_id), s.published(run_id))
        ops = sim.counts()
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    woken = holder.wait()
    assert woken.code == d.EXIT_BUSY, woken.err
    (line,) = woken.err.strip().splitlines()
    assert f"lost the lease on run {run_id}: it was taken over" in line, line
    assert "stopped without writing" in line, line
    with d.store(db_url) as s:
        assert (
            s.get(run_id),
            s.events(run_id),
            s.journal_entries(run_id),
            s.published(run_id),
        ) == rows
    assert d.operations(sim.counts()) == d.operations(ops) == d.ONCE
    assert d.placement(sim) == before
