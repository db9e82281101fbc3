"""`nodepatch worker` in real processes, on SQLite and PostgreSQL: racing workers, a worker
killed or stopped mid-step, a signal that makes a waiting run due, `start --detach`, and runs of
a workflow this build does not know."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import durability as d
from tests.clitools import Cli
from tests.conftest import postgres_database
from workflows.backends.simulated import SimulatedCluster

pytestmark = pytest.mark.slow
CRAWL, FAST = 0.001, 100_000.0
STEPS = [
    ("Preflight", "Draining"),
    ("Draining", "Patching"),
    ("Patching", "Enabling"),
    ("Enabling", "Rebalancing"),
    ("Rebalancing", "Done"),
]


def fleet(clusters: int) -> dict[str, Any]:
    """Clusters c1..cN of three hosts; two HA VMs on the first host of each."""
    return {
        "clusters": [
            {
                "name": f"c{i}",
                "hosts": [{"name": f"c{i}hv{j}", "memory_mb": 4 * d.H} for j in (1, 2, 3)],
            }
            for i in range(1, clusters + 1)
        ],
        "vms": [d.vm(f"c{i}v{k}", f"c{i}hv1") for i in range(1, clusters + 1) for k in (1, 2)],
    }


def once(cluster: int) -> dict[str, int]:
    host, vms = f"c{cluster}hv1", (f"c{cluster}v1", f"c{cluster}v2")
    ops = {f"{op}:{host}": 1 for op in ("enter_maintenance", "reboot_host", "exit_maintenance")}
    for vm in vms:
        ops |= {f"live_migrate:{vm}": 1, f"move_vm:{vm}": 1}
    return ops


def detach(cli: Cli, cluster: int) -> str:
    result = cli(
        "start", "--cluster", f"c{cluster}", "--node", f"c{cluster}hv1", "--detach", "--json"
    )
    assert result.code == 3, result.err
    return str(result.json()["run_id"])


def test_racing_workers_drive_each_run_once(tmp_path: Path, db_url: str) -> None:
    """Two workers on SQLite, four on PostgreSQL, two slots each, over six detached runs: every
    run ends Done through each transition once, every cluster operation happens once, and no
    run was taken over (each was driven by one slot at a time)."""
    workers = 4 if db_url.startswith("postgresql") else 2
    cli = d.make_cli(tmp_path, db_url, d.config(lease_ttl_s=10))
    sim = SimulatedCluster.create(cli.sim, fleet(6))
    before = d.placement(sim)
    runs = [detach(cli, i) for i in range(1, 7)]
    procs = [d.spawn(cli, "worker", "--until-idle", "--concurrency", "2") for _ in range(workers)]
    for p in procs:
        result = p.wait(timeout=180)
        assert result.code == 0, result.err
    ops = d.operations(sim.counts())
    expected: dict[str, int] = {}
    for i in range(1, 7):
        expected |= once(i)
    assert ops == expected
    assert d.placement(sim) == before
    with d.store(db_url) as s:
        for run_id in runs:
            events = s.events(run_id)
            assert d.transitions(events) == STEPS
            assert not [e for e in events if e.kind == "lease" and e.details.get("taken_over_from")]
            assert s.get(run_id).wake_at is None  # finished: no timer left (status: null)


def _journaled(db_url: str, run_id: str, job: str) -> bool:
    with d.store(db_url) as s:
        return any(
            e.step_key.endswith(f":{job}") and e.status == "submitted"
            for e in s.journal_entries(run_id)
        )


def test_a_killed_worker_is_taken_over_and_a_stopped_one_exits_cleanly(
    tmp_path: Path, db_url: str
) -> None:
    """SIGKILL mid-drain: once the lease expires another worker takes the run over and it ends
    as an uninterrupted run would. SIGTERM mid-drain: the worker exits 0 within its grace
    period, the run left resumable with an intact trail."""
    cli = d.make_cli(tmp_path, db_url, d.config())
    sim = SimulatedCluster.create(cli.sim, fleet(2))
    before = d.placement(sim)
    sim.set_speed(CRAWL)
    killed, stopped = detach(cli, 1), detach(cli, 2)
    worker = d.spawn(cli, "worker", "--concurrency", "2")
    d.wait_for(lambda: _journaled(cli.db_url, killed, "enter_maintenance"), timeout=60)
    d.wait_for(lambda: _journaled(cli.db_url, stopped, "enter_maintenance"), timeout=60)
    os.kill(worker.proc.pid, signal.SIGKILL)
    assert worker.wait().code == -signal.SIGKILL
    gentle = d.spawn(cli, "worker", "--concurrency", "2", "--grace", "20")
    d.wait_for(  # the new worker has taken the dead one's run over
        lambda: f":{gentle.proc.pid}#" in str(d.store_get(cli.db_url, stopped).lease_owner),
        timeout=30,
    )
    os.kill(gentle.proc.pid, signal.SIGTERM)
    result = gentle.wait(timeout=30)
    assert result.code == 0, result.err
    with d.store(cli.db_url) as s:
        assert s.get(stopped).state not in ("Done", "Failed")
        assert s.get(stopped).lease_owner is None  # given back at a durable point
    assert cli("audit", "verify").code == 0
    sim.set_speed(FAST)
    final = d.spawn(cli, "worker", "--until-idle", "--concurrency", "2").wait(timeout=120)
    assert final.code == 0, final.err
    with d.store(cli.db_url) as s:
        assert {s.get(r).state for r in (killed, stopped)} == {"Done"}
    assert d.operations(sim.counts()) == once(1) | once(2)
    assert d.placement(sim) == before


def test_a_signal_makes_a_waiting_run_due(tmp_path: Path, db_url: str) -> None:
    """With the external patcher the worker drains the node and leaves the run waiting for
    `patched` (nothing due, the worker exits); the signal makes it due and a worker finishes."""
    cli = d.make_cli(tmp_path, db_url, d.config(extra="patcher: {kind: external}\n"))
    SimulatedCluster.create(cli.sim, fleet(1))
    run_id = detach(cli, 1)
    assert d.spawn(cli, "worker", "--until-idle").wait().code == 0
    status = cli("status", run_id, "--json").json()
    assert (status["state"], status["waiting_for"]) == ("Patching", "patched")
    assert status["workflow"] == "node_patch" and status["parent_run_id"] is None
    assert cli("signal", run_id, "patched").code == 0
    assert d.spawn(cli, "worker", "--until-idle").wait().code == 0
    assert cli("status", run_id, "--json").json()["state"] == "Done"


def test_a_run_of_an_unknown_workflow_is_refused_and_left_alone(
    tmp_path: Path, db_url: str
) -> None:
    cli = d.make_cli(tmp_path, db_url, d.config())
    SimulatedCluster.create(cli.sim, fleet(1))
    with d.store(db_url) as s:
        run = s.create_run(
            workflow="cycle", workflow_version=9, subject="c1", state="Plan", params={}, actor="t"
        )
        before = (s.get(run.id), s.events(run.id))
    for args in (
        ("resume", run.id),
        ("status", run.id),
        ("history", run.id),
        ("signal", run.id, "abort"),
        ("abort", run.id),
        ("release", run.id, "--reason", "x"),
    ):
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        (line,) = result.err.strip().splitlines()
        assert "'cycle' version 9 is not known" in line, line
    with d.store(db_url) as s:
        assert (s.get(run.id), s.events(run.id)) == before


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_database()


@pytest.mark.postgres
def test_on_postgresql_a_signal_wakes_a_worker_at_once(tmp_path: Path, pg_url: str) -> None:
    """A worker that looks for due runs only every 60 s still acts on a signal within about a
    second: PostgreSQL's NOTIFY wakes it (SQLite workers poll, `--poll`)."""
    db_url = pg_url
    cli = d.make_cli(tmp_path, db_url, d.config(extra="patcher: {kind: external}\n"))
    SimulatedCluster.create(cli.sim, fleet(1))
    run_id = detach(cli, 1)
    worker = d.spawn(cli, "worker", "--poll", "60")
    try:
        d.wait_for(lambda: d.store_get(db_url, run_id).waiting_for == "patched", timeout=30)
        signalled = time.monotonic()
        assert cli("signal", run_id, "patched").code == 0
        d.wait_for(lambda: d.store_get(db_url, run_id).state == "Done", timeout=30)
        assert time.monotonic() - signalled < 10  # not the 60 s poll
    finally:
        os.kill(worker.proc.pid, signal.SIGTERM)
        assert worker.wait(timeout=30).code == 0


def test_a_waiting_step_gives_its_slot_back_and_is_resumed(tmp_path: Path, db_url: str) -> None:
    """With one slot and two slow runs, a step that waits on the cluster gives the slot back
    (a durable sleep of one poll interval) so the other run moves too; each re-entered step
    re-attaches to its journaled jobs: every operation happens once."""
    cli = d.make_cli(tmp_path, db_url, d.config(patch_seconds=30))
    sim = SimulatedCluster.create(cli.sim, fleet(2), speed=20.0)
    before = d.placement(sim)
    runs = [detach(cli, 1), detach(cli, 2)]
    result = d.spawn(
        cli,
        "worker",
        "--until-idle",
        "--concurrency",
        "1",
        "--yield-after",
        "0.3",
        "--poll",
        "0.05",
    ).wait(timeout=180)
    assert result.code == 0, result.err
    with d.store(db_url) as s:
        for run_id in runs:
            events = s.events(run_id)
            assert s.get(run_id).state == "Done"
            assert d.transitions(events) == STEPS
            assert any(e.kind == "sleeping" for e in events)  # it did give the slot back
    assert d.operations(sim.counts()) == once(1) | once(2)
    assert d.placement(sim) == before
