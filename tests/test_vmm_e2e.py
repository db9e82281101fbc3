"""A whole node patch through the VMM backend over real PSRP/WSMan on 127.0.0.1 (the stand-in),
driven by the real CLI in separate processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine import db
from tests.clitools import Cli
from tests.standin import build
from tests.standin.fixtures import Rig
from workflows.backends.simulated import SimulatedCluster

PASSWORD = "Tr1cky-'$`;\"-passw0rd"


@pytest.fixture
def vmm_rig(tmp_path: Path) -> Iterator[Rig]:
    sim = SimulatedCluster.generate(tmp_path / "sim.json", hosts=3, vms=9, seed=3)
    standin, world = build(sim, password=PASSWORD)
    try:
        rig = Rig(sim, sim.path, standin, world)
        rig.port("vmm01")
        for node in ("hv01", "hv02", "hv03"):
            rig.port(node)
        yield rig
    finally:
        standin.stop()


def vmm_backend(rig: Rig) -> dict[str, Any]:
    """The `backend` configuration for the stand-in's VMM server (test-only plain HTTP)."""
    return {
        "kind": "vmm",
        "vmm": {
            "server": "127.0.0.1",
            "port": rig.port("vmm01"),
            "ssl": False,
            "auth": "basic",
            "encryption": "never",
            "username": rig.standin.username,
            "password_env": "NODEPATCH_VMM_PASSWORD",
        },
    }


def vmm_cli(tmp_path: Path, db_url: str, rig: Rig) -> Cli:
    config = {
        "backend": vmm_backend(rig),
        "patcher": {
            "kind": "reboot",
            "reboot": {
                "connection": {
                    "ssl": False,
                    "auth": "basic",
                    "encryption": "never",
                    "server": "127.0.0.1",
                    "username": rig.standin.username,
                    "password_env": "NODEPATCH_VMM_PASSWORD",
                },
                "node_addresses": {n: f"127.0.0.1:{rig.port(n)}" for n in ("hv01", "hv02", "hv03")},
                "reboot_timeout_s": 60,
                "probe_timeout_s": 2,
            },
        },
        "engine": {"poll_interval_s": 0.01, "lease_ttl_s": 2},
        "retries": {"attempts": 5, "backoff_s": 0.05, "backoff_max_s": 0.2},
        "log": {"file": str(tmp_path / "nodepatch.log")},
    }
    cfg = tmp_path / "vmm.yaml"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    return Cli(db_url, tmp_path / "unused-sim.json", cfg)


def run(cli: Cli, *args: str, crash_at: str | None = None) -> object:
    env = {"NODEPATCH_SIM": "", "NODEPATCH_VMM_PASSWORD": PASSWORD}
    if crash_at:
        env["NODEPATCH_CRASH_AT"] = crash_at
    return cli(*args, env=env)


def placement(sim: SimulatedCluster) -> dict[str, tuple[str, str]]:
    return {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]}


def test_full_cycle_with_a_crash_in_draining_reattaches_to_the_vmm_job(
    tmp_path: Path, db_url: str, vmm_rig: Rig
) -> None:
    """Killed right after journaling the Disable-SCVMHost job, a new process re-attaches to
    that job (Get-SCJob on the same ID), never disables the host twice, and finishes Done with
    every VM back in place."""
    cli = vmm_cli(tmp_path, db_url, vmm_rig)
    before = placement(vmm_rig.sim)
    vmm_rig.sim.set_speed(20)  # the drain is still running when the process dies
    crashed = run(
        cli,
        "start",
        "--cluster",
        "cluster1",
        "--node",
        "hv01",
        "--json",
        crash_at="after_journal:enter_maintenance",
    )
    assert crashed.code == 137, crashed.err
    disables = vmm_rig.commands("Disable-SCVMHost")
    assert len(disables) == 1
    runs = run(cli, "runs", "--json").json()
    run_id = runs[0]["run_id"]
    status = run(cli, "status", run_id, "--json").json()
    journaled = [e for e in status["journal"] if e["key"].endswith(":enter_maintenance")]
    assert journaled[0]["status"] == "submitted"
    job_id = journaled[0]["external_ref"]
    vmm_rig.sim.set_speed(0)
    result = run(cli, "resume", run_id, "--json")
    for _ in range(20):  # the dead process's lease expires after lease_ttl_s
        if result.code != 4:
            break
        result = run(cli, "resume", run_id, "--json")
    assert result.code == 0, result.err
    assert len(vmm_rig.commands("Disable-SCVMHost")) == 1
    polled = {str(c.params.get("ID")) for c in vmm_rig.commands("Get-SCJob")}
    assert job_id in polled
    assert placement(vmm_rig.sim) == before
    assert vmm_rig.sim.counts()["enter_maintenance"] == 1


def test_the_password_is_in_neither_the_database_nor_the_log(
    tmp_path: Path, db_url: str, vmm_rig: Rig
) -> None:
    """After a full run over VMM, no table row and no log line holds the password, even with
    debug logging in JSON (every line an object naming its run, workflow, state and action)."""
    cli = vmm_cli(tmp_path, db_url, vmm_rig)
    result = run(
        cli,
        "--debug",
        "--log-format",
        "json",
        "start",
        "--cluster",
        "cluster1",
        "--node",
        "hv02",
        "--json",
    )
    assert result.code == 0, result.err
    assert PASSWORD not in result.out and PASSWORD not in result.err
    engine = db.connect(db_url)
    with engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):  # noqa: S608
                assert PASSWORD not in repr(tuple(row)), table
    engine.dispose()
    log = (tmp_path / "nodepatch.log").read_text(encoding="utf-8")
    assert "Draining -> Patching" in log
    assert PASSWORD not in log
    lines = [json.loads(line) for line in log.splitlines()]
    assert all({"run_id", "workflow", "state", "action"} <= line.keys() for line in lines)
    run_id = json.loads(result.out)["run_id"]
    assert any(
        (line["run_id"], line["workflow"], line["state"]) == (run_id, "node_patch", "Draining")
        for line in lines
    )


def test_doctor_reports_success_and_plain_causes(tmp_path: Path, db_url: str, vmm_rig: Rig) -> None:
    """doctor passes against the stand-in; a wrong password and a closed port are explained."""
    cli = vmm_cli(tmp_path, db_url, vmm_rig)
    good = run(cli, "doctor", "--cluster", "cluster1", "--json")
    assert good.code == 0, good.out
    assert all(c["ok"] for c in good.json()["checks"])
    wrong = cli("doctor", env={"NODEPATCH_SIM": "", "NODEPATCH_VMM_PASSWORD": "nope"})
    assert wrong.code == 1
    assert "username or password" in wrong.out
    text = cli.config.read_text(encoding="utf-8")
    cli.config.write_text(text.replace(str(vmm_rig.port("vmm01")), "1"), encoding="utf-8")
    closed = run(cli, "doctor")
    assert closed.code == 1
    assert "connection refused" in closed.out
