"""`nodepatch cycle`: a whole cluster patched as one durable parent run, through the real CLI on
the simulator, on SQLite and PostgreSQL. Each test checks the cycle's answer against the
simulated cluster's state and operation counts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from tests import durability as d
from tests.clitools import Cli, Result
from workflows.backends.simulated import SimulatedCluster

H = 1024
# Four nodes; hv1 has a running non-HA VM and a stopped HA VM; nodes have room for one out.
FOUR = d.scenario(
    d.vm("a1", "hv1"),
    d.vm("n1", "hv1", ha=False),
    d.vm("s1", "hv1", state="PowerOff"),
    d.vm("b1", "hv2"),
    d.vm("b2", "hv2"),
    d.vm("c1", "hv3"),
    d.vm("d1", "hv4"),
    d.vm("d2", "hv4"),
    d.vm("d3", "hv4"),
    hosts=4,
    memory=16 * H,
)
CYCLE = "cycle: {poll_s: 0.01}\n"


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Cli:
    return d.make_cli(tmp_path, db_url, d.config(extra=CYCLE))


def cycle(cli: Cli, *args: str, env: dict[str, str] | None = None) -> Result:
    return cli("cycle", "start", "--cluster", "c1", "--non-ha", "save", *args, "--json", env=env)


def nodes(result: Result) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in result.json()["nodes"]}


def migrations(sim: SimulatedCluster) -> dict[str, int]:
    ops = d.operations(sim.counts())
    out: dict[str, int] = {}
    for key, count in ops.items():
        kind, _, target = key.partition(":")
        if kind in ("move_vm", "live_migrate") and target:
            out[target] = out.get(target, 0) + count
    return out


def test_a_whole_cycle_patches_every_node_and_puts_every_vm_back(cli: Cli) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR)
    before = d.placement(sim)
    result = cycle(cli, "--max-parallel", "auto", "--stopped-ha", "evacuate")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["state"] == "Done" and doc["error"] is None
    assert {n: v["status"] for n, v in nodes(result).items()} == dict.fromkeys(
        ("hv1", "hv2", "hv3", "hv4"), "done"
    )
    assert all(n["gate"]["ok"] for n in doc["nodes"])
    assert d.placement(sim) == before
    ops = d.operations(sim.counts())
    for host in ("hv1", "hv2", "hv3", "hv4"):
        assert ops[f"enter_maintenance:{host}"] == ops[f"exit_maintenance:{host}"] == 1
        assert ops[f"reboot_host:{host}"] == 1
    moved = migrations(sim)
    assert set(moved) == {"a1", "s1", "b1", "b2", "c1", "d1", "d2", "d3"}
    assert set(moved.values()) == {2}  # away and back, never through a node of the wave
    assert ops["save_vm:n1"] == ops["start_vm:n1"] == 1
    # the plan was published before the first node, and the waves had more than one node
    plan = doc["plan"]
    assert plan["order"][0] == "hv3"  # fewest VMs first
    assert any(len(w["nodes"]) > 1 for w in doc["waves"])
    assert cli("audit", "verify").code == 0
    history = cli("history", doc["run_id"])
    assert history.code == 0 and "Rolling" in history.out


def test_a_failed_node_is_retried_counted_compensated_and_the_cycle_goes_on(cli: Cli) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR)
    sim.inject({"type": "job_fails", "op": "reboot_host", "target": "hv3", "times": 2})
    before = d.placement(sim)
    result = cycle(cli, "--max-failed-nodes", "1", "--retries-per-node", "1")
    assert result.code == 1, result.err
    doc = result.json()
    assert doc["state"] == "Failed"
    by_node = nodes(result)
    assert by_node["hv3"]["status"] == "failed" and by_node["hv3"]["attempts"] == 2
    assert by_node["hv3"]["state"] == "Aborted"  # compensated: its run was aborted
    assert all(by_node[n]["status"] == "done" for n in ("hv1", "hv2", "hv4"))
    assert "hv3" in doc["error"]["reason"]
    assert d.placement(sim) == before  # hv3's VMs are home too
    assert not any(d.maintenance(sim).values())
    ops = d.operations(sim.counts())
    assert ops["reboot_host:hv3"] == 2  # the first try and one retry
    assert ops["enter_maintenance:hv3"] == ops["exit_maintenance:hv3"] == 1
    # resume retries the failed node and the cycle ends Done
    resumed = cli("resume", doc["run_id"], "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json()["state"] == "Done"
    assert nodes(resumed)["hv3"]["status"] == "done"
    assert d.placement(sim) == before


def test_more_failures_than_the_budget_halt_the_cycle_and_later_nodes_stay_untouched(
    cli: Cli,
) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR)
    sim.inject({"type": "job_fails", "op": "reboot_host", "target": "hv3", "times": 2})
    result = cycle(cli, "--retries-per-node", "1")  # --max-failed-nodes 0
    assert result.code == 1
    doc = result.json()
    assert doc["state"] == "Failed"
    reason = doc["error"]["reason"]
    assert "more than --max-failed-nodes 0" in reason and "not started: " in reason
    untouched = [n for n, v in nodes(result).items() if v["status"] == "pending"]
    assert sorted(untouched) == ["hv1", "hv2", "hv4"]
    ops = d.operations(sim.counts())
    for host in untouched:
        assert f"enter_maintenance:{host}" not in ops and f"reboot_host:{host}" not in ops


def test_a_wave_too_large_for_the_cluster_shrinks_and_says_why(cli: Cli) -> None:
    tight = d.scenario(
        *(d.vm(f"v{i}", f"hv{i % 3 + 1}", memory=6 * H) for i in range(6)), hosts=3, memory=32 * H
    )
    SimulatedCluster.create(cli.sim, tight)
    result = cli("cycle", "plan", "--cluster", "c1", "--max-parallel", "3", "--json")
    assert result.code == 0, result.err
    waves = result.json()["waves"]
    assert [len(w["nodes"]) for w in waves] == [1, 1, 1]
    assert "too little memory outside the wave" in waves[0]["reason"]


def test_interference_found_in_preflight_refuses_the_cycle_naming_it(cli: Cli) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR, speed=0.001)
    job = sim.move_vm("b1", "hv4")  # someone else's job, still running
    result = cli("cycle", "plan", "--cluster", "c1", "--non-ha", "save", "--json")
    assert result.code == 1
    problems = result.json()["problems"]
    assert any(job in p and "move_vm" in p for p in problems), problems
    started = cycle(cli)
    assert started.code == 1
    assert started.json()["state"] == "Refused"
    assert "enter_maintenance" not in str(d.operations(sim.counts()))


def test_a_closed_window_puts_the_cycle_to_sleep_until_the_next_one(cli: Cli) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR)
    opening = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).replace(microsecond=0)
    window = f"{opening.isoformat()}/8h"
    result = cycle(cli, "--window", window)
    assert result.code == 3, result.err
    doc = result.json()
    assert doc["state"] == "Rolling"
    assert dt.datetime.fromisoformat(doc["wake_at"]) == opening
    assert "no window is open" in doc["sleeping_because"]
    assert "enter_maintenance" not in str(d.operations(sim.counts()))
    early = cli("resume", doc["run_id"], "--json")
    assert early.code == 3  # not before its time


def test_the_estimate_comes_from_history_when_a_window_is_short(
    tmp_path: Path, db_url: str
) -> None:
    """A window with 20 minutes left: with no history, the default estimate (2 h) does not fit
    and the cycle sleeps; once a node has a Done run (seconds), its median fits and it goes."""
    cli = d.make_cli(
        tmp_path, db_url, d.config(extra="cycle: {poll_s: 0.01, default_node_minutes: 120}\n")
    )
    sim = SimulatedCluster.create(cli.sim, FOUR)
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=160)
    window = f"{start:%a %H:%M}/3h UTC"
    waiting = cycle(cli, "--nodes", "hv3", "--window", window)
    assert waiting.code == 3, waiting.err
    assert "needs about 2h" in waiting.json()["sleeping_because"]
    assert cli("cycle", "abort", waiting.json()["run_id"]).code == 0
    assert cli("start", "--cluster", "c1", "--node", "hv3").code == 0  # history: seconds
    went = cycle(cli, "--nodes", "hv3", "--window", window)
    assert went.code == 0, went.err
    assert d.operations(sim.counts())["reboot_host:hv3"] == 2


def test_abort_mid_node_compensates_that_node_and_leaves_the_others_untouched(
    tmp_path: Path, db_url: str
) -> None:
    cli = d.make_cli(tmp_path, db_url, d.config(extra=CYCLE + "patcher: {kind: external}\n"))
    sim = SimulatedCluster.create(cli.sim, FOUR)
    before = d.placement(sim)
    waiting = cycle(cli)
    assert waiting.code == 3, waiting.err
    first = next(n for n in waiting.json()["nodes"] if n["run_id"])
    assert first["waiting_for"] == "patched"
    assert f"nodepatch signal {first['run_id']} patched" in waiting.err
    assert f"nodepatch signal {first['run_id']} patched" in waiting.json()["sleeping_because"]
    status = cli("cycle", "status", waiting.json()["run_id"])
    assert status.code == 0 and "waiting for signal 'patched'" in status.out
    assert d.maintenance(sim)[first["node"]]
    aborted = cli("cycle", "abort", waiting.json()["run_id"], "--json")
    assert aborted.code == 0, aborted.err
    assert aborted.json()["state"] == "Aborted"
    assert nodes(aborted)[first["node"]]["state"] == "Aborted"
    assert d.placement(sim) == before
    assert not any(d.maintenance(sim).values())
    ops = d.operations(sim.counts())
    others = [h for h in ("hv1", "hv2", "hv3", "hv4") if h != first["node"]]
    assert all(f"enter_maintenance:{h}" not in ops for h in others)


def test_until_node_stops_after_that_node_and_continue_goes_on(cli: Cli) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR)
    stopped = cycle(cli, "--until-node", "hv2")
    assert stopped.code == 3, stopped.err
    doc = stopped.json()
    assert doc["waiting_for"] == "continue"
    assert nodes(stopped)["hv2"]["status"] == "done"
    assert nodes(stopped)["hv1"]["status"] == "pending"
    assert cli("signal", doc["run_id"], "continue").code == 0
    resumed = cli("resume", doc["run_id"], "--json")
    assert resumed.code == 0, resumed.err
    assert all(n["status"] == "done" for n in resumed.json()["nodes"])
    assert d.operations(sim.counts())["enter_maintenance:hv2"] == 1


def test_a_detached_cycle_is_driven_by_a_worker(cli: Cli) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR)
    before = d.placement(sim)
    started = cycle(cli, "--detach")
    assert started.code == 3
    run_id = started.json()["run_id"]
    worked = cli("worker", "--until-idle", "--concurrency", "2", "--poll", "0.05")
    assert worked.code == 0, worked.err
    status = cli("cycle", "status", run_id, "--json")
    assert status.json()["state"] == "Done"
    assert d.placement(sim) == before


@pytest.mark.parametrize(
    "point",
    [
        "before_submit:child:node:hv3:r1",
        "after_submit:child:node:hv3:r1",
        "after_fact:gate:hv3:*",
        "after_fact:wave:r1:1",
    ],
)
def test_a_crash_where_the_cycle_writes_resumes_to_the_same_end(cli: Cli, point: str) -> None:
    sim = SimulatedCluster.create(cli.sim, FOUR)
    before = d.placement(sim)
    crashed = cycle(cli, env={"NODEPATCH_CRASH_AT": point})
    assert crashed.code == 137, crashed.err
    with d.store(cli.db_url) as store:
        (run,) = store.runs(workflow="cluster_cycle")
    result = d.resume_until_settled(cli, run.id)
    assert result.code == 0, result.err
    assert d.placement(sim) == before
    ops = d.operations(sim.counts())
    for host in ("hv1", "hv2", "hv3", "hv4"):
        assert ops[f"enter_maintenance:{host}"] == 1
    with d.store(cli.db_url) as store:
        children = store.children(run.id)
    assert sorted(c.params["node"] for c in children) == ["hv1", "hv2", "hv3", "hv4"]


def test_the_soak_between_waves_is_a_durable_timer_that_survives_a_crash(cli: Cli) -> None:
    """After the first wave the cycle sleeps for the soak (exit 3, wake_at an hour ahead); a
    crash right after the timer was journaled resumes to the same wake-up time."""
    sim = SimulatedCluster.create(cli.sim, FOUR)
    crashed = cycle(cli, "--soak", "1h", env={"NODEPATCH_CRASH_AT": "after_timer:soak:r1:1"})
    assert crashed.code == 137, crashed.err
    with d.store(cli.db_url) as store:
        (run,) = store.runs(workflow="cluster_cycle")
        (timer,) = [e for e in store.journal_entries(run.id) if e.job == "timer:soak:r1:1"]
    until = dt.datetime.fromisoformat(timer.result["until"])
    resumed = d.resume_until_settled(cli, run.id)
    assert resumed.code == 3, resumed.err
    doc = resumed.json()
    assert dt.datetime.fromisoformat(doc["wake_at"]) == until
    assert "soaking 1h after wave 1" in doc["sleeping_because"]
    assert dt.timedelta(minutes=59) < until - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    done = [n for n in doc["nodes"] if n["status"] == "done"]
    assert len(done) == 1  # one wave of one node, then the soak
    assert sum(v for k, v in d.operations(sim.counts()).items() if k.startswith("enter_")) == 1
    early = cli("resume", run.id, "--now", "--json")
    assert early.code == 3 and len([n for n in early.json()["nodes"] if n["status"] == "done"]) == 2
    told = cli("resume", run.id)  # asleep again; driven from the command line: no worker's
    assert told.code == 3, told.err
    assert f"continue with `nodepatch resume {run.id}` after it" in told.err
    assert "a worker wakes it" not in told.err


def test_a_vm_deleted_by_someone_else_during_a_node_run_halts_the_cycle(cli: Cli) -> None:
    """While hv3 (first in order) is being patched, an administrator deletes its VM c1: the
    gate finds it gone, and the cycle halts naming the change; the nodes not started stay
    untouched."""
    sim = SimulatedCluster.create(cli.sim, FOUR)
    sim.inject({"type": "delete_vm", "vm": "c1", "on": "reboot_host"})
    result = cycle(cli, "--max-failed-nodes", "3")
    assert result.code == 1, result.err
    doc = result.json()
    reason = doc["error"]["reason"]
    assert "unexpected change to the cluster" in reason and "'vm-c1' (c1) was deleted" in reason
    by_node = nodes(result)
    assert by_node["hv3"]["status"] == "failed"
    assert not by_node["hv3"]["gate"]["ok"]
    assert sorted(n for n, v in by_node.items() if v["status"] == "pending") == [
        "hv1",
        "hv2",
        "hv4",
    ]
    ops = d.operations(sim.counts())
    assert all(f"enter_maintenance:{h}" not in ops for h in ("hv1", "hv2", "hv4"))
