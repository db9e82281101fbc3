"""Node patchers (windows-update, script, reboot) against the stand-in's node endpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import errors
from tests.standin.fixtures import Rig, rig, standin_sim  # noqa: F401 - pytest fixtures
from workflows.backends import base, simulated
from workflows.patchers import remote

HOST = "hv01"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def drained(rig: Rig) -> simulated.SimulatedCluster:  # noqa: F811
    sim = simulated.SimulatedCluster(rig.sim_path)
    job_id = sim.enter_maintenance(HOST)
    assert sim.job(job_id).ok
    return sim


def make(rig: Rig, kind: type[Any], clock: Clock | None = None, **extra: Any) -> Any:  # noqa: F811
    settings = remote.RemotePatchSettings(
        connection=rig.settings(HOST),
        node_addresses={HOST: f"127.0.0.1:{rig.port(HOST)}"},
        reboot_timeout_s=600.0,
        probe_timeout_s=2.0,
        **extra,
    )
    return kind(settings, drained(rig), "cluster1", clock=clock or Clock())


def run(patcher: Any, ref: str, polls: int = 20) -> list[base.Job]:
    jobs = [patcher.poll(ref)]
    while not jobs[-1].done and len(jobs) < polls:
        jobs.append(patcher.poll(ref))
    return jobs


def test_reboot_waits_for_the_node_to_come_back(rig: Rig) -> None:  # noqa: F811
    """reboot: restart, report Running while the node drops connections, done once it is back."""
    patcher = make(rig, remote.RebootPatcher)
    ref = patcher.begin(HOST)
    jobs = run(patcher, ref)
    assert jobs[0].status is base.JobStatus.RUNNING and "not answering" in jobs[0].message
    assert jobs[-1].status is base.JobStatus.COMPLETED, jobs[-1]
    assert [c.params for c in rig.commands("Restart-Computer")] == [{"Force": True}]
    assert json.loads(ref)["boot_before"] != rig.world.node(HOST).boot_time.isoformat()


def test_windows_update_installs_via_task_then_reboots(rig: Rig) -> None:  # noqa: F811
    """windows-update starts the SYSTEM task, reports the KBs, reboots because it was required."""
    patcher = make(rig, remote.WindowsUpdatePatcher)
    ref = patcher.begin(HOST)
    jobs = run(patcher, ref)
    (start,) = rig.commands(remote.WU_START_SCRIPT)
    assert start.params["TaskScript"] == remote.WU_TASK_SCRIPT
    assert any("installing updates" in j.message for j in jobs)
    assert jobs[-1].status is base.JobStatus.COMPLETED, jobs[-1]
    assert jobs[-1].details["kbs"] == simulated.kbs_for(HOST)
    assert jobs[-1].details["reboot"] == remote.REBOOT_PENDING
    assert rig.commands("Restart-Computer") == []  # the reboot is node_patch's own job
    rebooted = run(patcher, patcher.reboot(HOST))
    assert rebooted[-1].status is base.JobStatus.COMPLETED, rebooted[-1]
    assert len(rig.commands("Restart-Computer")) == 1


def test_windows_update_without_reboot_does_not_restart(rig: Rig) -> None:  # noqa: F811
    """When no reboot is required the job completes without Restart-Computer."""
    rig.world.wu_result = {"Status": "Succeeded", "Installed": ["KB1"], "RebootRequired": False}
    patcher = make(rig, remote.WindowsUpdatePatcher)
    jobs = run(patcher, patcher.begin(HOST))
    assert jobs[-1].status is base.JobStatus.COMPLETED
    assert jobs[-1].details == {"kbs": "KB1", "reboot": "false"}
    assert rig.commands("Restart-Computer") == []


def test_windows_update_failure_fails_the_job_with_the_reason(rig: Rig) -> None:  # noqa: F811
    """A failed install ends the job Failed, quoting the task's message."""
    rig.world.wu_result = {"Status": "Failed", "Message": "0x80240022 download failed"}
    patcher = make(rig, remote.WindowsUpdatePatcher)
    jobs = run(patcher, patcher.begin(HOST))
    assert jobs[-1].status is base.JobStatus.FAILED
    assert "0x80240022 download failed" in jobs[-1].message


def test_host_that_never_comes_back_fails_with_a_clear_reason(rig: Rig) -> None:  # noqa: F811
    """If the node is not back within reboot_timeout_s, the job ends Failed and says so."""
    rig.sim.inject({"type": "host_never_returns", "host": HOST})
    clock = Clock()
    patcher = make(rig, remote.RebootPatcher, clock)
    ref = patcher.begin(HOST)
    assert patcher.poll(ref).status is base.JobStatus.RUNNING
    clock.now += 601
    job = patcher.poll(ref)
    assert job.status is base.JobStatus.FAILED
    assert f"{HOST} did not come back within 600 s" in job.message


def test_the_reference_is_enough_to_resume_after_a_crash(rig: Rig) -> None:  # noqa: F811
    """A new patcher instance (after a crash) finishes the work from the journaled ref alone."""
    ref = make(rig, remote.WindowsUpdatePatcher).begin(HOST)
    fresh = make(rig, remote.WindowsUpdatePatcher)
    assert fresh.find(HOST) is not None
    assert run(fresh, ref)[-1].status is base.JobStatus.COMPLETED
    assert rig.commands("Restart-Computer") == []


def test_script_patcher_runs_the_operators_file_with_parameters(rig: Rig, tmp_path: Path) -> None:  # noqa: F811
    """script sends the operator's file as-is, config values as parameters, and reboots on ask."""
    body = "param($Channel)\n[pscustomobject]@{ RebootRequired = $true }\n"
    path = tmp_path / "patch.ps1"
    path.write_text(body, encoding="utf-8")
    rig.standin.dispatcher.script(body, lambda inv: [{"RebootRequired": True}])
    patcher = make(
        rig,
        remote.ScriptPatcher,
        script_path=str(path),
        script_parameters={"Channel": "it's $(weird)"},
    )
    jobs = run(patcher, patcher.begin(HOST))
    (call,) = rig.commands(body)
    assert call.params == {"Channel": "it's $(weird)"}
    assert jobs[-1].status is base.JobStatus.COMPLETED and jobs[-1].details["reboot"] == "true"


def test_patch_settings_from_mapping_validates_keys() -> None:
    """The patcher config block names the bad key; the connection block is ConnectionSettings."""
    env = {"PW": "x"}
    good = {"connection": {"username": "u", "password_env": "PW"}, "reboot_timeout_s": 60}
    assert remote.settings_from_mapping(good, "patcher", env).reboot_timeout_s == 60.0
    with pytest.raises(errors.ConfigError, match=r"patcher\.reboot: must be one of"):
        remote.settings_from_mapping({**good, "reboot": "sometimes"}, "patcher", env)
    with pytest.raises(errors.ConfigError, match=r"patcher\.colour: unknown key"):
        remote.settings_from_mapping({**good, "colour": 1}, "patcher", env)
    bad_conn = {"connection": {"username": "u", "password": "p"}}
    with pytest.raises(errors.ConfigError, match=r"patcher\.connection\.password: .*password_env"):
        remote.settings_from_mapping(bad_conn, "patcher", env)
