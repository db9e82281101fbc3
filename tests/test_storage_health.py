"""Storage Spaces Direct (issue 11): every backend reports repair jobs and unhealthy virtual
disks through `storage_health`, and a node patch's Enabling waits until none is left."""

from __future__ import annotations

from pathlib import Path

from tests.clitools import make_cli
from tests.standin.fixtures import Rig, addresses, rig, standin_sim  # noqa: F401 - fixtures
from workflows.backends import failover, simulated, vmm


def test_failover_reports_repair_jobs_until_they_end(rig: Rig) -> None:  # noqa: F811
    """With S2D enabled, a running repair job and its virtual disk are reported, then healthy;
    without S2D there is nothing to wait for."""
    b = failover.FailoverBackend(rig.settings("hv01"), node_addresses=addresses(rig))
    assert not b.storage_health("cluster1").s2d
    rig.world.s2d, rig.world.storage_repair_polls = True, 1
    during, after = b.storage_health("cluster1"), b.storage_health("cluster1")
    b.close()
    assert during.s2d and not during.healthy
    assert during.repair_jobs == ("Repair",) and during.unhealthy_disks == ("CSV1",)
    assert after.s2d and after.healthy
    assert rig.commands(failover.STORAGE_SCRIPT)


def test_vmm_says_it_does_not_check_storage(rig: Rig) -> None:  # noqa: F811
    """The VMM backend cannot read the nodes' storage jobs: not checked, and it says so."""
    b = vmm.VmmBackend(rig.settings("vmm01"))
    health = b.storage_health("cluster1")
    b.close()
    assert not health.checked and health.healthy and "survey" in health.summary()


def test_the_simulator_reports_storage_repair_faults(tmp_path: Path) -> None:
    """A storage_repair fault is seen by as many reads as its `times`."""
    sim = simulated.SimulatedCluster.generate(tmp_path / "sim.json", hosts=2, vms=2)
    sim.inject({"type": "storage_repair", "disk": "CSV2", "times": 2})
    reads = [sim.storage_health("cluster1") for _ in range(3)]
    assert [r.healthy for r in reads] == [False, False, True]
    assert reads[0].unhealthy_disks == ("CSV2",)


def test_enabling_waits_for_storage_to_heal(tmp_path: Path, db_url: str) -> None:
    """A node patch does not leave Enabling while a repair job runs: every storage_repair read
    is consumed before the run ends Done."""
    cli = make_cli(tmp_path, db_url)
    sim = simulated.SimulatedCluster.generate(cli.sim, hosts=3, vms=6, non_ha=0)
    sim.inject({"type": "storage_repair", "times": 3})
    result = cli("start", "--cluster", "cluster1", "--node", "hv01", "--json")
    assert result.code == 0, result.err
    assert not [f for f in sim.faults() if f["type"] == "storage_repair"]
    assert result.json()["state"] == "Done"
