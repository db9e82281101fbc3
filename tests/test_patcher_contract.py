"""One contract for the node patchers that install updates (windows-update, configmgr), over the
stand-in's node endpoints: install, report the KBs, leave a needed reboot to its own journaled
job, re-attach after a crash, report failures with their reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import errors
from tests.clitools import Cli
from tests.standin.fixtures import Rig, rig, standin_sim  # noqa: F401 - pytest fixtures
from tests.test_remote_patchers import HOST, make, run
from tests.test_vmm_e2e import PASSWORD, vmm_backend, vmm_rig  # noqa: F401 - fixture
from workflows.backends import base, simulated
from workflows.patchers import configmgr, remote

KINDS = {"windows-update": remote.WindowsUpdatePatcher, "configmgr": configmgr.ConfigMgrPatcher}


def expected_kbs(kind: str, rig: Rig) -> set[str]:  # noqa: F811
    if kind == "windows-update":
        return set(simulated.kbs_for(HOST).split(","))
    return {"KB" + u["article"] for u in rig.world.cm_deployed}


@pytest.mark.parametrize("kind", KINDS)
def test_installs_reports_the_kbs_and_leaves_the_reboot_pending(rig: Rig, kind: str) -> None:  # noqa: F811
    """The install ends Completed with its KBs and `reboot: pending`; reboot() then restarts
    the node once and waits for it."""
    patcher = make(rig, KINDS[kind])
    jobs = run(patcher, patcher.begin(HOST))
    assert jobs[0].status is base.JobStatus.RUNNING
    assert jobs[-1].status is base.JobStatus.COMPLETED, jobs[-1]
    assert set(jobs[-1].details["kbs"].split(",")) == expected_kbs(kind, rig)
    assert jobs[-1].details["reboot"] == remote.REBOOT_PENDING
    assert rig.commands("Restart-Computer") == []
    assert run(patcher, patcher.reboot(HOST))[-1].status is base.JobStatus.COMPLETED
    assert len(rig.commands("Restart-Computer")) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_process_reattaches_to_the_install(rig: Rig, kind: str) -> None:  # noqa: F811
    """After a crash the install in progress is found (find) and finished, never restarted."""
    first = make(rig, KINDS[kind])
    first.begin(HOST)
    fresh = make(rig, KINDS[kind])
    ref = fresh.find(HOST)
    assert ref is not None
    assert run(fresh, ref)[-1].details["reboot"] == remote.REBOOT_PENDING
    starts = rig.commands(remote.WU_START_SCRIPT) + rig.commands(configmgr.CM_START_SCRIPT)
    assert len(starts) == 1
    node = rig.world.node(HOST)  # after the reboot nothing is left to find
    node.reboot_pending, node.cm_updates = False, []
    node.wu_runs.clear()
    assert fresh.find(HOST) is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_install_names_what_failed(rig: Rig, kind: str) -> None:  # noqa: F811
    """A failed update fails the job, and the message says which and why."""
    if kind == "windows-update":
        rig.world.wu_result = {"Status": "Failed", "Message": "0x80240022 download failed"}
        reason = "0x80240022"
    else:
        rig.world.cm_deployed = [
            {"article": "5030219", "compliance": 0, "states": [2, 13], "error": 0x80240022}
        ]
        reason = "KB5030219 (error 0x80240022)"
    patcher = make(rig, KINDS[kind])
    job = run(patcher, patcher.begin(HOST))[-1]
    assert job.status is base.JobStatus.FAILED and reason in job.message


def test_configmgr_waiting_for_a_service_window_fails_at_once(rig: Rig) -> None:  # noqa: F811
    """WaitServiceWindow on a drained node would wait for ever: the job fails, naming it."""
    rig.world.cm_deployed = [{"article": "5030219", "compliance": 0, "states": [2, 14]}]
    patcher = make(rig, configmgr.ConfigMgrPatcher)
    job = run(patcher, patcher.begin(HOST))[-1]
    assert job.status is base.JobStatus.FAILED and "WaitServiceWindow" in job.message


def test_configmgr_without_a_client_is_a_clear_error(rig: Rig) -> None:  # noqa: F811
    """No ConfigMgr client on the node: begin raises BackendError naming the namespace."""
    rig.world.cm_client = False
    with pytest.raises(errors.BackendError, match="ClientSDK"):
        make(rig, configmgr.ConfigMgrPatcher).begin(HOST)


def test_a_full_run_patches_through_configmgr(tmp_path: Path, db_url: str, vmm_rig: Rig) -> None:  # noqa: F811
    """Through the CLI with `patcher.kind: configmgr`: Done, the KBs published, one restart."""
    nodes = ("hv01", "hv02", "hv03")
    config: dict[str, Any] = {
        "backend": vmm_backend(vmm_rig),
        "patcher": {
            "kind": "configmgr",
            "configmgr": {
                "connection": {
                    "ssl": False,
                    "auth": "basic",
                    "encryption": "never",
                    "server": "127.0.0.1",
                    "username": vmm_rig.standin.username,
                    "password_env": "NODEPATCH_VMM_PASSWORD",
                },
                "node_addresses": {n: f"127.0.0.1:{vmm_rig.port(n)}" for n in nodes},
                "reboot_timeout_s": 60,
                "probe_timeout_s": 2,
            },
        },
        "policies": {"non_ha": "save"},
        "engine": {"poll_interval_s": 0.01, "lease_ttl_s": 2},
    }
    cfg = tmp_path / "cm.yaml"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    cli = Cli(db_url, tmp_path / "unused-sim.json", cfg)
    env = {"NODEPATCH_SIM": "", "NODEPATCH_VMM_PASSWORD": PASSWORD}
    result = cli("start", "--cluster", "cluster1", "--node", "hv01", "--json", env=env)
    assert result.code in (0, 5), result.err
    patch = result.json()["published"]["patch"]
    assert patch["patcher"] == "configmgr" and patch["reboot"] == "true"
    assert set(patch["kbs"].split(",")) == expected_kbs("configmgr", vmm_rig)
    assert len([c for c in vmm_rig.commands("Restart-Computer") if c.computer == "hv01"]) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_to_reattach_to_before_the_install(rig: Rig, kind: str) -> None:  # noqa: F811
    """On a node where nothing was started, find() is None, so the install is submitted (an
    update still merely deployed is not an install in progress)."""
    assert make(rig, KINDS[kind]).find(HOST) is None
