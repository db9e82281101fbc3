"""The windows-update patcher's reboot (issue 11): durable in the journal, never in process
memory; pending reboots read from Microsoft.Update.SystemInfo too; a task that ended without a
result fails at once with its LastTaskResult."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.clitools import Cli
from tests.standin.fixtures import Rig, rig, standin_sim  # noqa: F401 - pytest fixtures
from tests.test_remote_patchers import HOST, make, run
from tests.test_vmm_e2e import PASSWORD, vmm_backend, vmm_rig  # noqa: F401 - fixture
from workflows.backends import base
from workflows.patchers import remote


def test_a_dropped_probe_during_the_install_is_not_a_restart(rig: Rig) -> None:  # noqa: F811
    """A status poll that loses its connection while the node installs reports Running; the
    install then ends with a reboot pending, and nothing was restarted on the way."""
    rig.world.wu_polls, rig.world.wu_drop_polls = 3, 1
    patcher = make(rig, remote.WindowsUpdatePatcher)
    jobs = run(patcher, patcher.begin(HOST))
    assert any("not answering" in j.message for j in jobs)
    assert jobs[-1].status is base.JobStatus.COMPLETED, jobs[-1]
    assert jobs[-1].details["reboot"] == remote.REBOOT_PENDING
    assert rig.commands("Restart-Computer") == []


def test_a_crash_after_the_result_was_written_finds_the_pending_reboot(rig: Rig) -> None:  # noqa: F811
    """Result written, reboot pending (SystemInfo.RebootRequired): a new process re-attaches
    (find) instead of searching again and reporting "no reboot needed"."""
    first = make(rig, remote.WindowsUpdatePatcher)
    run(first, first.begin(HOST))
    fresh = make(rig, remote.WindowsUpdatePatcher)
    ref = fresh.find(HOST)
    assert ref is not None
    job = run(fresh, ref)[-1]
    assert job.details["reboot"] == remote.REBOOT_PENDING
    assert len(rig.commands(remote.WU_START_SCRIPT)) == 1


def test_a_reboot_pending_before_the_install_is_honoured(rig: Rig) -> None:  # noqa: F811
    """Nothing installed needs a reboot, but SystemInfo says one is pending: reboot pending."""
    rig.world.wu_result = {"Status": "Succeeded", "Installed": [], "RebootRequired": False}
    rig.world.node(HOST).reboot_pending = True
    patcher = make(rig, remote.WindowsUpdatePatcher)
    job = run(patcher, patcher.begin(HOST))[-1]
    assert job.details["reboot"] == remote.REBOOT_PENDING


def test_a_task_that_ended_without_a_result_fails_at_once(rig: Rig) -> None:  # noqa: F811
    """Ready, no result file: the job fails on that poll, quoting LastTaskResult."""
    rig.world.wu_task_exit = 0x80070005
    patcher = make(rig, remote.WindowsUpdatePatcher)
    jobs = run(patcher, patcher.begin(HOST))
    assert jobs[-1].status is base.JobStatus.FAILED
    assert "LastTaskResult 0x80070005" in jobs[-1].message
    assert len(jobs) <= rig.world.wu_polls + 1


def test_the_result_file_is_written_atomically() -> None:
    """The task writes a partial file and renames it over the result."""
    script = remote.WU_TASK_SCRIPT
    assert "Set-Content -Path $partial" in script
    assert "Move-Item -Path $partial -Destination $resultPath -Force" in script
    assert "Set-Content -Path $resultPath" not in script


def test_a_full_run_restarts_once_despite_a_dropped_probe(
    tmp_path: Path,
    db_url: str,
    vmm_rig: Rig,  # noqa: F811
) -> None:
    """Through the CLI: a dropped status poll during the install, then the reboot as its own
    journaled job: Done, Restart-Computer sent exactly once, the run says it rebooted."""
    vmm_rig.world.wu_polls, vmm_rig.world.wu_drop_polls = 3, 1
    nodes = ("hv01", "hv02", "hv03")
    config: dict[str, Any] = {
        "backend": vmm_backend(vmm_rig),
        "patcher": {
            "kind": "windows-update",
            "windows-update": {
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
        "retries": {"attempts": 5, "backoff_s": 0.05, "backoff_max_s": 0.2},
    }
    cfg = tmp_path / "wu.yaml"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    cli = Cli(db_url, tmp_path / "unused-sim.json", cfg)
    env = {"NODEPATCH_SIM": "", "NODEPATCH_VMM_PASSWORD": PASSWORD}
    result = cli("start", "--cluster", "cluster1", "--node", "hv01", "--json", env=env)
    assert result.code in (0, 5), result.err
    out = result.json()
    assert out["published"]["patch"]["reboot"] == "true"
    assert len([c for c in vmm_rig.commands("Restart-Computer") if c.computer == "hv01"]) == 1
