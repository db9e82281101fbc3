"""Cluster faults on the simulated backend, through the real CLI, on SQLite and PostgreSQL.

Each test injects one fault into the simulated cluster and checks what nodepatch leaves behind:
the run's state and report, where every VM is and in which power state, and how many times the
cluster was asked to do each thing (the simulator's counts).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests import durability as d
from tests.clitools import Cli, Result
from workflows.backends.simulated import SimulatedCluster

# Two HA VMs on the node being patched, one elsewhere that must never move.
BASE = d.scenario(d.vm("h1", "hv1"), d.vm("h2", "hv1"), d.vm("o1", "hv3", memory=8192))


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Cli:
    return d.make_cli(tmp_path, db_url, d.config(patching_timeout_s=1.5))


def start(cli: Cli, *args: str, env: dict[str, str] | None = None) -> Result:
    return cli("start", "--cluster", "c1", "--node", "hv1", *args, "--json", env=env)


def report(result: Result) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in result.json()["published"]["rebalance"]}


def test_failed_drain_job_is_recovered_by_moving_the_vms_one_by_one(cli: Cli) -> None:
    """When the maintenance job fails, the node's running HA VMs are moved one by one and the
    drain is tried once more: the run ends Done and everything is back where it was."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    sim.inject({"type": "job_fails", "op": "enter_maintenance", "target": "hv1"})
    before = d.placement(sim)
    result = start(cli)
    assert result.code == 0, result.err
    assert d.placement(sim) == before
    ops = d.operations(sim.counts())
    assert ops["enter_maintenance:hv1"] == 2
    assert ops["move_vm:h1"] == ops["move_vm:h2"] == 2  # away one by one, and back
    assert "move_vm:o1" not in ops and "live_migrate:o1" not in ops
    assert not any(d.maintenance(sim).values())


def test_vm_that_cannot_migrate_fails_the_drain_naming_it_and_stays_running(cli: Cli) -> None:
    """One VM's live migration keeps failing: the other VM leaves the node, the run fails in
    Draining naming the VM, the node is not left in maintenance and no VM is saved or off.
    Once the cause is gone, `resume` completes the run."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    sim.inject({"type": "migration_fails", "vm": "h1", "times": 2})
    before = d.placement(sim)
    result = start(cli)
    assert result.code == 1
    doc = result.json()
    assert (doc["state"], doc["error"]["state"]) == ("Failed", "Draining")
    assert "(h1)" in doc["error"]["reason"]
    now = d.placement(sim)
    assert now["h1"] == ("hv1", "Running")
    assert now["h2"][0] != "hv1" and now["h2"][1] == "Running"
    assert not d.maintenance(sim)["hv1"]
    assert sim.faults() == []
    resumed = cli("resume", doc["run_id"], "--json")
    assert resumed.code == 0, resumed.err
    assert d.placement(sim) == before


def test_vm_that_cannot_move_back_is_reported_while_the_others_return(cli: Cli) -> None:
    """One VM's move back fails: the other VM is moved back, the run fails in Rebalancing with
    the VM's report entry saying why, and the VM keeps running where it was drained to. The
    next `resume` retries the step once: both VMs end home, reported moved back."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    before = d.placement(sim)
    stopped = start(cli, "--until", "Rebalancing")
    assert stopped.code == 3, stopped.err
    run_id = stopped.json()["run_id"]
    drained_to = d.placement(sim)["h1"]
    sim.inject({"type": "migration_fails", "vm": "h1", "times": 1})
    result = cli("resume", run_id, "--json")
    assert result.code == 1
    doc = result.json()
    assert (doc["state"], doc["error"]["state"]) == ("Failed", "Rebalancing")
    entries = report(result)
    assert entries["h1"]["outcome"].startswith("failed to move back")
    assert entries["h2"]["outcome"] == "moved back"
    assert d.placement(sim)["h1"] == drained_to
    assert d.placement(sim)["h2"] == before["h2"]
    again = cli("resume", run_id, "--json")
    assert again.code == 0, again.err
    assert d.placement(sim) == before
    assert d.operations(sim.counts())["move_vm:h2"] == 1
    final = report(again)
    assert final["h1"]["outcome"] == "moved back"
    assert final["h2"]["outcome"] == "moved back"  # by the first attempt: not "in place"


def test_host_that_never_returns_fails_on_timeout_in_maintenance_with_vms_safe(cli: Cli) -> None:
    """The node never answers after its reboot: the run fails on the Patching timeout, the node
    stays in maintenance, its VMs run elsewhere, and nothing tried to take it out."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    sim.inject({"type": "host_never_returns", "host": "hv1"})
    result = start(cli)
    assert result.code == 1
    doc = result.json()
    assert (doc["state"], doc["error"]["state"]) == ("Failed", "Patching")
    assert d.maintenance(sim)["hv1"]
    now = d.placement(sim)
    for vm_id in ("h1", "h2"):
        assert now[vm_id][0] != "hv1" and now[vm_id][1] == "Running"
    ops = d.operations(sim.counts())
    assert ops["reboot_host:hv1"] == 1
    assert "exit_maintenance:hv1" not in ops


def test_vm_deleted_during_patching_is_reported_and_the_rest_return(cli: Cli) -> None:
    """A VM deleted while the node is patched is reported `deleted during the run`; the run
    ends Done and the other VM is back on the node, running."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    sim.inject({"type": "delete_vm", "vm": "h1", "on": "reboot_host"})
    result = start(cli)
    assert result.code == 5, result.err  # Done, with a VM not put back
    assert report(result)["h1"]["outcome"] == "deleted during the run"
    now = d.placement(sim)
    assert "h1" not in now
    assert now["h2"] == ("hv1", "Running")
    assert "move_vm:h1" not in d.operations(sim.counts())


def test_vm_moved_by_someone_else_is_skipped_and_left_where_they_put_it(cli: Cli) -> None:
    """A VM someone else moves during patching is not moved back: it is reported skipped with
    the host it was moved to, and stays there running."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    stopped = start(cli, "--until", "Patching")
    assert stopped.code == 3, stopped.err
    drained_to = d.placement(sim)["h1"][0]
    elsewhere = "hv3" if drained_to == "hv2" else "hv2"
    sim.inject({"type": "move_vm", "vm": "h1", "to": elsewhere, "on": "reboot_host"})
    result = cli("resume", stopped.json()["run_id"], "--json")
    assert result.code == 5, result.err  # Done, with a VM not put back
    assert report(result)["h1"]["outcome"] == (
        f"skipped: moved by someone else to {elsewhere} (the run left it on {drained_to})"
    )
    assert d.placement(sim)["h1"] == (elsewhere, "Running")
    assert d.placement(sim)["h2"] == ("hv1", "Running")
    assert "move_vm:h1" not in d.operations(sim.counts())


def test_vm_that_no_longer_fits_on_the_node_is_skipped_for_memory(
    tmp_path: Path, db_url: str
) -> None:
    """When someone fills the node while it is patched, a VM that no longer fits is not moved
    back: it is reported skipped for memory and keeps running elsewhere; the one that fits
    returns."""
    cli = d.make_cli(tmp_path, db_url)
    sim = SimulatedCluster.create(
        cli.sim,
        d.scenario(
            d.vm("big", "hv1", memory=8192),
            d.vm("small", "hv1", memory=2048),
            d.vm("filler", "hv3", memory=12288),
            memory=2 * d.H,
        ),
    )
    sim.inject({"type": "move_vm", "vm": "filler", "to": "hv1", "on": "exit_maintenance"})
    result = start(cli)
    assert result.code == 5, result.err  # Done, with a VM not put back
    entries = report(result)
    assert entries["big"]["outcome"].startswith("skipped: not enough memory on hv1")
    assert entries["small"]["outcome"] == "moved back"
    now = d.placement(sim)
    assert now["big"][0] != "hv1" and now["big"][1] == "Running"
    assert now["small"] == ("hv1", "Running")
    assert "move_vm:big" not in d.operations(sim.counts())


def test_transient_connection_errors_are_retried_and_change_nothing(
    tmp_path: Path, db_url: str
) -> None:
    """Connection errors on reads, polls and a request are retried: the run ends Done with
    every operation done exactly once, as without the errors."""
    cli = d.make_cli(tmp_path, db_url, d.config(attempts=8))
    sim = SimulatedCluster.create(cli.sim, BASE)
    before = d.placement(sim)
    stopped = start(cli, "--until", "Draining")
    assert stopped.code == 3, stopped.err
    for fault in (
        {"type": "transient", "op": "any", "times": 2},
        {"type": "transient", "op": "job", "times": 1},
        {"type": "transient", "op": "move_vm", "times": 1},
        {"type": "transient", "op": "exit_maintenance", "times": 1},
    ):
        sim.inject(fault)
    result = cli("resume", stopped.json()["run_id"], "--json")
    assert result.code == 0, result.err
    assert sim.faults() == []
    assert d.placement(sim) == before
    assert d.operations(sim.counts()) == d.ONCE


def test_authentication_failure_is_reported_once_without_retries(cli: Cli) -> None:
    """Refused credentials fail the run at the first call, once: one call reaches the cluster,
    the reason is stored and printed once, and nothing changed on the cluster."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    stopped = start(cli, "--until", "Draining")
    assert stopped.code == 3, stopped.err
    before_ops = d.operations(sim.counts())
    budget = 1000
    sim.inject({"type": "auth_fails", "times": budget})
    result = cli("resume", stopped.json()["run_id"])
    assert result.code == 1
    (left,) = sim.faults()
    assert budget - left["times"] == 1  # exactly one call met the refusal
    output = result.out + result.err
    assert output.count("access denied") == 1, output
    with d.store(cli.db_url) as s:
        run = s.get(stopped.json()["run_id"])
        fails = [e for e in s.events(run.id) if e.trigger == "fail"]
    assert run.state == "Failed" and "access denied" in run.error["reason"]
    assert len(fails) == 1
    assert d.operations(sim.counts()) == before_ops


# ---- abort after a failed drain: the run's own moves are its own -------------------------------

THREE = d.scenario(d.vm("h1", "hv1"), d.vm("h2", "hv1"), d.vm("h3", "hv1"))


def _all_home_and_nobody_blamed(cli: Cli, sim: SimulatedCluster, run_id: str, before: Any) -> None:
    aborted = cli("abort", run_id, "--json")
    assert aborted.code == 0, aborted.err
    doc = aborted.json()
    assert doc["state"] == "Aborted"
    assert d.placement(sim) == before
    assert not any(d.maintenance(sim).values())
    entries = report(aborted)
    assert all("someone else" not in e["outcome"] for e in entries.values()), entries
    assert entries["h1"]["outcome"] == "in place"
    assert entries["h2"]["outcome"] == entries["h3"]["outcome"] == "moved back"
    assert not any(op.startswith("admin_") for op in d.operations(sim.counts()))


def test_abort_after_a_failed_drain_brings_back_the_vms_the_run_moved(cli: Cli) -> None:
    """The drain moves h2 and h3, then fails on h1. `abort` puts h2 and h3 back on the node and
    blames nobody: the moves were the run's own (issue 7)."""
    sim = SimulatedCluster.create(cli.sim, THREE)
    sim.inject({"type": "migration_fails", "vm": "h1", "times": 20})
    before = d.placement(sim)
    failed = start(cli)
    assert failed.code == 1
    doc = failed.json()
    assert (doc["state"], doc["error"]["state"]) == ("Failed", "Draining")
    moved = {v for v, (host, _) in d.placement(sim).items() if host != "hv1"}
    assert moved == {"h2", "h3"}
    assert set(doc["published"]["drained"]) == {"h1", "h2", "h3"}
    sim.clear_faults()
    _all_home_and_nobody_blamed(cli, sim, doc["run_id"], before)


def test_abort_after_a_crash_mid_drain_brings_back_the_vms_the_run_moved(cli: Cli) -> None:
    """The process dies in the middle of the one-by-one moves that follow a failed drain job,
    before anything about the drain was published: `abort` still knows, from the journal, which
    moves were the run's own."""
    sim = SimulatedCluster.create(cli.sim, THREE)
    sim.inject({"type": "migration_fails", "vm": "h1", "times": 20})
    before = d.placement(sim)
    crashed = start(cli, env={"NODEPATCH_CRASH_AT": "before_submit:move_vm:h1"})
    assert crashed.code == d.CRASH_EXIT, crashed.err
    run = d.only_run(cli.db_url)
    with d.store(cli.db_url) as s:
        assert "drained" not in s.published(run.id)
    sim.clear_faults()
    time.sleep(d.LEASE_TTL_S)  # the dead holder's lease runs out
    _all_home_and_nobody_blamed(cli, sim, run.id, before)


def test_a_vm_the_run_saved_is_started_even_where_someone_else_moved_it(cli: Cli) -> None:
    """Under `save`, the non-HA VM is saved before the drain; someone moves it to hv2 while the
    node patches. It is not moved back, but it is started where it is: the run never leaves a
    VM it saved cut off (found by the property test)."""
    sim = SimulatedCluster.create(
        cli.sim, d.scenario(d.vm("h1", "hv1"), d.vm("n1", "hv1", ha=False))
    )
    sim.inject({"type": "move_vm", "vm": "n1", "to": "hv2", "on": "reboot_host"})
    result = start(cli, "--non-ha", "save")
    assert result.code == 5, result.err
    assert d.placement(sim)["n1"] == ("hv2", "Running")
    assert report(result)["n1"]["outcome"] == (
        "skipped: moved by someone else to hv2 (the run left it on hv1), started"
    )
