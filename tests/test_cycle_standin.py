"""A whole cluster patched as one cycle through the VMM and the failover backends, over real
PSRP/WSMan on 127.0.0.1 (the stand-in), by the real CLI; and the interference each backend
finds in preflight (a VMM job running on the cluster, a Cluster-Aware Updating run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.clitools import Cli, Result
from tests.standin.fixtures import Rig
from tests.test_vmm_e2e import PASSWORD, placement, vmm_cli, vmm_rig  # noqa: F401 - fixture
from workflows.backends import vmm

ENV = {"NODEPATCH_SIM": "", "NODEPATCH_VMM_PASSWORD": PASSWORD}
NODES = ("hv01", "hv02", "hv03")


def run(cli: Cli, *args: str) -> Result:
    return cli(*args, env=ENV, timeout=600)


def with_cycle(cli: Cli) -> Cli:
    config = json.loads(cli.config.read_text(encoding="utf-8"))
    config["cycle"] = {"poll_s": 0.05}
    cli.config.write_text(json.dumps(config), encoding="utf-8")
    return cli


def failover_cli(tmp_path: Path, db_url: str, rig: Rig) -> Cli:
    """The VMM rig's configuration with the failover backend: a session on a node."""
    cli = with_cycle(vmm_cli(tmp_path, db_url, rig))
    config: dict[str, Any] = json.loads(cli.config.read_text(encoding="utf-8"))
    conn = dict(config["backend"]["vmm"])
    conn["port"] = rig.port("hv01")
    conn["node_addresses"] = {n: f"127.0.0.1:{rig.port(n)}" for n in NODES}
    config["backend"] = {"kind": "failover", "failover": conn}
    cli.config.write_text(json.dumps(config), encoding="utf-8")
    return cli


def test_a_cycle_over_vmm_patches_every_node_and_puts_every_vm_back(
    tmp_path: Path,
    db_url: str,
    vmm_rig: Rig,  # noqa: F811
) -> None:
    cli = with_cycle(vmm_cli(tmp_path, db_url, vmm_rig))
    before = placement(vmm_rig.sim)
    result = run(cli, "cycle", "start", "--cluster", "cluster1", "--non-ha", "save", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["state"] == "Done"
    assert sorted(n["node"] for n in doc["nodes"] if n["status"] == "done") == list(NODES)
    assert placement(vmm_rig.sim) == before
    assert len(vmm_rig.commands("Disable-SCVMHost")) == 3
    assert len(vmm_rig.commands("Enable-SCVMHost")) == 3


def test_a_vmm_job_running_on_the_cluster_refuses_the_cycle_naming_it(
    tmp_path: Path,
    db_url: str,
    vmm_rig: Rig,  # noqa: F811
) -> None:
    cli = with_cycle(vmm_cli(tmp_path, db_url, vmm_rig))
    vmm_rig.sim.set_speed(0.001)  # someone else's migration, still running
    other = vmm.VmmBackend(vmm_rig.settings())
    found = other.inventory("cluster1")
    vm = next(v for v in found.vms if v.ha and v.state == "Running")
    target = next(h.name for h in found.hosts if h.name != vm.host)
    job = other.move_vm(vm.id, target)
    other.close()
    plan = run(cli, "cycle", "plan", "--cluster", "cluster1", "--non-ha", "save", "--json")
    assert plan.code == 1, plan.err
    assert any(f"VMM job {job}" in p for p in plan.json()["problems"]), plan.json()["problems"]
    assert vmm_rig.commands("Disable-SCVMHost") == []


def test_a_cycle_over_failover_clustering_patches_every_node(
    tmp_path: Path,
    db_url: str,
    vmm_rig: Rig,  # noqa: F811
) -> None:
    cli = failover_cli(tmp_path, db_url, vmm_rig)
    before = placement(vmm_rig.sim)
    result = run(cli, "cycle", "start", "--cluster", "cluster1", "--non-ha", "save", "--json")
    assert result.code == 0, result.err
    assert result.json()["state"] == "Done"
    assert placement(vmm_rig.sim) == before
    suspended = sorted(c.params["Name"] for c in vmm_rig.commands("Suspend-ClusterNode"))
    assert suspended == list(NODES)
    assert len(vmm_rig.commands("Get-CauRun")) == 1  # asked once, in preflight


def test_a_cau_run_in_progress_refuses_the_cycle_naming_it(
    tmp_path: Path,
    db_url: str,
    vmm_rig: Rig,  # noqa: F811
) -> None:
    cli = failover_cli(tmp_path, db_url, vmm_rig)
    vmm_rig.world.cau_run = {"RunId": "8d3c7f9e", "CurrentOrchestrator": "mgmt01"}
    result = run(cli, "cycle", "start", "--cluster", "cluster1", "--non-ha", "save", "--json")
    assert result.code == 1, result.err
    doc = result.json()
    assert doc["state"] == "Refused"
    assert "Cluster-Aware Updating" in doc["error"]["reason"]
    assert "8d3c7f9e" in doc["error"]["reason"]
    assert vmm_rig.commands("Suspend-ClusterNode") == []
