"""`nodepatch doctor --survey FILE` (issue 11): a read-only record of the site, compared with
what the backends expect, each mismatch named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.clitools import Cli
from tests.standin.fixtures import Rig
from tests.test_vmm_e2e import PASSWORD, vmm_backend, vmm_rig  # noqa: F401 - fixture
from workflows import survey
from workflows.backends import simulated


def survey_cli(tmp_path: Path, db_url: str, rig: Rig) -> Cli:
    nodes = ("hv01", "hv02", "hv03")
    config: dict[str, Any] = {
        "backend": vmm_backend(rig),
        "patcher": {
            "kind": "configmgr",
            "configmgr": {
                "connection": {
                    "ssl": False,
                    "auth": "basic",
                    "encryption": "never",
                    "server": "127.0.0.1",
                    "username": rig.standin.username,
                    "password_env": "NODEPATCH_VMM_PASSWORD",
                },
                "node_addresses": {n: f"127.0.0.1:{rig.port(n)}" for n in nodes},
            },
        },
    }
    cfg = tmp_path / "survey.yaml"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    return Cli(db_url, tmp_path / "unused-sim.json", cfg)


def run_survey(tmp_path: Path, db_url: str, rig: Rig) -> tuple[Any, dict[str, Any]]:
    cli = survey_cli(tmp_path, db_url, rig)
    out = tmp_path / "site.json"
    env = {"NODEPATCH_SIM": "", "NODEPATCH_VMM_PASSWORD": PASSWORD}
    result = cli("doctor", "--cluster", "cluster1", "--survey", str(out), "--json", env=env)
    return result, json.loads(out.read_text(encoding="utf-8"))


def test_the_survey_records_the_site_read_only(tmp_path: Path, db_url: str, vmm_rig: Rig) -> None:  # noqa: F811
    """Hosts (one in maintenance), VMs, running jobs with their names, the mechanism and the
    ConfigMgr classes are recorded; nothing was changed; no mismatch on a matching site."""
    sim = simulated.SimulatedCluster(vmm_rig.sim_path)
    sim.inject({"type": "job_hangs", "op": "enter_maintenance", "target": "hv03"})
    sim.enter_maintenance("hv02")
    sim.enter_maintenance("hv03")
    vmm_rig.world.jobs.clear()
    before = sim.counts()
    result, doc = run_survey(tmp_path, db_url, vmm_rig)
    assert result.code == 0, result.out
    assert doc["mechanism"] == "basic" and doc["mismatches"] == []
    hv02 = next(h for h in doc["hosts"] if h["ComputerName"] == "hv02")
    assert hv02["OverallState"] == "MaintenanceMode" and hv02["AvailableForPlacement"] is False
    assert {"Status", "VirtualMachineState", "MemoryAssignedMB"} <= set(doc["vms"][0])
    assert isinstance(doc["running_jobs"], list)
    assert doc["node"]["configmgr_classes"] == list(survey.CM_CLASSES)
    assert sim.counts() == before
    writes = {"Disable-SCVMHost", "Enable-SCVMHost", "Move-SCVirtualMachine", "Restart-Computer"}
    assert not [c for c in vmm_rig.calls if c.text in writes]


def test_the_survey_names_each_mismatch(tmp_path: Path, db_url: str, vmm_rig: Rig) -> None:  # noqa: F811
    """A VM status the backend does not know, a designated maintenance host and a node without
    the ConfigMgr client are each named, and doctor exits 1."""
    vm = simulated.SimulatedCluster(vmm_rig.sim_path).inventory("cluster1").vms[0]
    vmm_rig.world.vm_status[vm.id] = "UpdateFailed"
    vmm_rig.world.designated_maintenance_hosts = {"hv02"}
    vmm_rig.world.cm_client = False
    result, doc = run_survey(tmp_path, db_url, vmm_rig)
    assert result.code == 1
    text = "\n".join(doc["mismatches"])
    assert "'UpdateFailed'" in text
    assert "MaintenanceHost is true" in text
    assert "ConfigMgr client on hv01" in text
    details = [c["detail"] for c in result.json()["checks"]]
    assert all(m in details for m in doc["mismatches"])


def test_compare_names_missing_properties_and_ntlm() -> None:
    """A property the backend reads that the site does not have, and negotiate falling back to
    NTLM, are named."""
    doc = {
        "kind": "vmm",
        "auth": "negotiate",
        "mechanism": "ntlm",
        "hosts": [{"Name": "hv01", "OverallState": "OK", "AvailableForPlacement": True}],
        "vms": [],
        "running_jobs": [],
        "recent_jobs": [],
    }
    found = survey.compare(doc)
    assert any("NTLM" in f for f in found)
    assert any("VMM host has no property MemoryReserveMB" in f for f in found)
