"""Acceptance: the CLI contract in separate processes, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.clitools import Cli, make_cli
from workflows.backends.base import PowerState
from workflows.backends.simulated import SimulatedCluster

H = 8192


def scenario(*vms: dict[str, Any], hosts: int = 3, memory: int = 4 * H) -> dict[str, Any]:
    return {
        "clusters": [
            {
                "name": "c1",
                "hosts": [{"name": f"hv{i + 1}", "memory_mb": memory} for i in range(hosts)],
            }
        ],
        "vms": list(vms),
    }


def vm(
    vm_id: str,
    host: str,
    *,
    ha: bool = True,
    state: str = "Running",
    name: str | None = None,
    memory: int = 2048,
) -> dict[str, Any]:
    return {
        "id": vm_id,
        "name": name or vm_id,
        "host": host,
        "ha": ha,
        "state": state,
        "memory_mb": memory,
    }


MIXED = scenario(
    vm("a1", "hv1"),
    vm("a2", "hv1"),
    vm("a3", "hv1", state="PowerOff"),
    vm("b1", "hv2"),
    vm("b2", "hv3"),
    vm("b3", "hv2", ha=False),
)


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Cli:
    return make_cli(tmp_path, db_url)


def placement(sim: SimulatedCluster) -> dict[str, tuple[str, str]]:
    return {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]}


def test_two_processes_split_at_patching_and_put_everything_back(cli: Cli) -> None:
    """start --until Patching exits 3; a new process resumes to Done; every VM of the node is
    back in its original power state, and no VM that was elsewhere ever moved."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    before = placement(sim)
    first = cli("start", "--cluster", "c1", "--node", "hv1", "--until", "Patching", "--json")
    assert first.code == 3, first.err
    doc = first.json()
    assert doc["state"] == "Patching"
    assert {v["id"] for v in doc["published"]["snapshot"]["vms"]} == {"a1", "a2", "a3"}
    mid = placement(sim)
    assert all(mid[i][0] != "hv1" for i in ("a1", "a2"))
    second = cli("resume", doc["run_id"], "--json")
    assert second.code == 0, second.err
    assert second.json()["state"] == "Done"
    assert placement(sim) == before
    counts = sim.counts()
    assert counts["enter_maintenance"] == 1
    assert counts["exit_maintenance"] == 1
    for moved in ("a1", "a2"):
        assert counts[f"live_migrate:{moved}"] == 1
        assert counts[f"move_vm:{moved}"] == 1
    for other in ("b1", "b2", "b3"):
        assert counts.get(f"move_vm:{other}", 0) == 0
        assert counts.get(f"live_migrate:{other}", 0) == 0


def test_running_non_ha_vm_blocks_by_default_and_nothing_moves(cli: Cli) -> None:
    """Default policy: preflight fails (exit 1) naming every running non-HA VM; no side effect."""
    sim = SimulatedCluster.create(
        cli.sim,
        scenario(
            vm("n1", "hv1", ha=False, name="sql 'legacy'"),
            vm("n2", "hv1", ha=False),
            vm("h1", "hv1"),
        ),
    )
    before = placement(sim)
    result = cli("start", "--cluster", "c1", "--node", "hv1", "--json")
    assert result.code == 1
    reason = result.json()["error"]["reason"]
    assert "sql 'legacy'" in reason and "(n1)" in reason and "(n2)" in reason
    assert placement(sim) == before
    ops = {
        k
        for k in sim.counts()
        if k.split(":")[0] in {"enter_maintenance", "move_vm", "save_vm", "shutdown_vm", "start_vm"}
    }
    assert ops == set()


def test_save_policy_accepts_saved_state_and_resumes_after(cli: Cli) -> None:
    """non_ha=save: the VM is Saved during the patch and Running on its node at the end."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    result = cli(
        "start",
        "--cluster",
        "c1",
        "--node",
        "hv2",
        "--non-ha",
        "save",
        "--until",
        "Patching",
        "--json",
    )
    assert result.code == 3, result.err
    assert placement(sim)["b3"] == ("hv2", "Saved")
    assert cli("resume", result.json()["run_id"]).code == 0
    assert placement(sim)["b3"] == ("hv2", "Running")


def test_migrate_policy_never_saves_the_vm(cli: Cli) -> None:
    """non_ha=migrate: the VM runs elsewhere during the patch, comes back, is never Saved."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    result = cli(
        "start",
        "--cluster",
        "c1",
        "--node",
        "hv2",
        "--non-ha",
        "migrate",
        "--until",
        "Patching",
        "--json",
    )
    assert result.code == 3, result.err
    host, state = placement(sim)["b3"]
    assert host != "hv2" and state == "Running"
    assert cli("resume", result.json()["run_id"]).code == 0
    assert placement(sim)["b3"] == ("hv2", "Running")
    counts = sim.counts()
    assert counts.get("save_vm:b3", 0) == 0
    assert counts["move_vm:b3"] == 2


def test_evacuate_moves_stopped_ha_vms_and_brings_them_back(cli: Cli) -> None:
    """stopped_ha=evacuate: the powered-off HA VM leaves the node and returns, still off."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    result = cli(
        "start",
        "--cluster",
        "c1",
        "--node",
        "hv1",
        "--stopped-ha",
        "evacuate",
        "--until",
        "Patching",
        "--json",
    )
    assert placement(sim)["a3"][0] != "hv1"
    assert cli("resume", result.json()["run_id"]).code == 0
    assert placement(sim)["a3"] == ("hv1", "PowerOff")


def test_history_gives_every_transition_with_time_and_actor(cli: Cli) -> None:
    """history --json lists each transition with time and actor; the snapshot is published."""
    SimulatedCluster.create(cli.sim, MIXED)
    run_id = cli("start", "--cluster", "c1", "--node", "hv1", "--json").json()["run_id"]
    doc = cli("history", run_id, "--json").json()
    moves = [(e["from"], e["to"]) for e in doc["events"] if e["kind"] == "transition"]
    assert moves == [
        ("Preflight", "Draining"),
        ("Draining", "Patching"),
        ("Patching", "Enabling"),
        ("Enabling", "Rebalancing"),
        ("Rebalancing", "Done"),
    ]
    for event in doc["events"]:
        assert event["time"] and "@" in event["actor"] and ":" in event["actor"]
    assert {v["id"] for v in doc["published"]["snapshot"]["vms"]} == {"a1", "a2", "a3"}


def test_external_patcher_waits_for_the_patched_signal(tmp_path: Path, db_url: str) -> None:
    """patcher external: the run stops waiting (exit 3) until `signal RUN patched`."""
    cli = make_cli(
        tmp_path, db_url, "patcher: {kind: external}\nengine: {poll_interval_s: 0.005}\n"
    )
    SimulatedCluster.create(cli.sim, MIXED)
    started = cli("start", "--cluster", "c1", "--node", "hv1", "--json")
    assert started.code == 3
    doc = started.json()
    assert (doc["state"], doc["waiting_for"]) == ("Patching", "patched")
    assert cli("resume", doc["run_id"]).code == 3
    assert cli("signal", doc["run_id"], "patchd").code == 2
    assert cli("signal", doc["run_id"], "patched").code == 0
    assert cli("resume", doc["run_id"]).code == 0


def test_abort_compensates_a_drained_node(cli: Cli) -> None:
    """abort during Patching: node out of maintenance, VMs back, power restored; Aborted."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    before = placement(sim)
    run_id = cli(
        "start", "--cluster", "c1", "--node", "hv1", "--until", "Patching", "--json"
    ).json()["run_id"]
    result = cli("abort", run_id, "--json")
    assert result.code == 0, result.err
    assert result.json()["state"] == "Aborted"
    assert placement(sim) == before
    assert not any(h["maintenance"] for h in sim.snapshot()["clusters"][0]["hosts"])
    assert sim.counts().get("reboot_host", 0) == 0


def test_second_node_of_a_held_cluster_is_refused(cli: Cli) -> None:
    """While one run holds the cluster, a run on another node fails naming it, touching nothing."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    first = cli("start", "--cluster", "c1", "--node", "hv1", "--until", "Patching", "--json")
    counts = sim.counts()
    second = cli("start", "--cluster", "c1", "--node", "hv3", "--json")
    assert second.code == 1
    assert first.json()["run_id"] in second.json()["error"]["reason"]
    after = sim.counts()
    assert {
        k: v for k, v in after.items() if not k.startswith(("inventory", "find_job", "job"))
    } == {k: v for k, v in counts.items() if not k.startswith(("inventory", "find_job", "job"))}


def test_vm_moved_or_deleted_meanwhile_is_skipped_and_reported(cli: Cli) -> None:
    """A VM someone moved, or deleted, during patching is skipped with a reason; others return."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    sim.inject({"type": "move_vm", "vm": "a1", "to": "hv2", "on": "reboot_host"})
    sim.inject({"type": "delete_vm", "vm": "a2", "on": "reboot_host"})
    sim.admin_set_state("a3", PowerState.POWER_OFF)
    result = cli("start", "--cluster", "c1", "--node", "hv1", "--json")
    assert result.code == 5, result.err  # Done, with VMs not put back
    report = {r["id"]: r["outcome"] for r in result.json()["published"]["rebalance"]}
    assert "'a2' (a2): deleted during the run" in result.json()["warnings"]
    if placement(sim)["a1"][0] == "hv2":
        assert report["a1"].startswith("skipped: moved by someone else")
    assert report["a2"] == "deleted during the run"
    assert "a2" not in placement(sim)


def test_host_that_never_returns_fails_the_run_in_maintenance(cli: Cli) -> None:
    """The node does not come back: Failed on the Patching timeout, node left in maintenance,
    its VMs running elsewhere."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    sim.inject({"type": "host_never_returns", "host": "hv1"})
    result = cli("start", "--cluster", "c1", "--node", "hv1", "--json")
    assert result.code == 1
    doc = result.json()
    assert doc["state"] == "Failed" and doc["error"]["state"] == "Patching"
    hosts = {h["name"]: h for h in sim.snapshot()["clusters"][0]["hosts"]}
    assert hosts["hv1"]["maintenance"]
    assert all(
        placement(sim)[i][0] != "hv1" and placement(sim)[i][1] == "Running" for i in ("a1", "a2")
    )


def test_bad_inputs_exit_2_with_one_line_and_create_no_run(cli: Cli) -> None:
    """Unknown cluster, node or run, an invalid state: exit 2, one line, nothing recorded."""
    SimulatedCluster.create(cli.sim, MIXED)
    for args in (
        ("start", "--cluster", "nope", "--node", "hv1"),
        ("start", "--cluster", "c1", "--node", "hv9"),
        ("start", "--cluster", "c1", "--node", "hv1", "--until", "Sleeping"),
        ("status", "no-such-run"),
        ("resume", "no-such-run"),
    ):
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert "Traceback" not in result.err
    assert cli("runs", "--json").json() == []
