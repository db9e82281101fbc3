"""The operator's first hour, runs side (issue 8): ways out of a stuck run, what is alive,
Ctrl-C, refusals that block nothing, outcomes that say what happened. All through the real CLI
in separate processes, on the real simulated cluster."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests import durability as d
from tests.clitools import Cli, Result
from workflows.backends.simulated import SimulatedCluster

CRAWL, FAST = 0.001, 100_000.0
BASE = d.scenario(d.vm("h1", "hv1"), d.vm("h2", "hv1"), d.vm("o1", "hv3", memory=8192))


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Cli:
    return d.make_cli(tmp_path, db_url, d.config(patching_timeout_s=1.5))


@pytest.fixture
def lite(tmp_path: Path) -> Cli:
    """SQLite only: for behaviour of the command line rather than of the database."""
    url = f"sqlite:///{tmp_path / 'np.db'}"
    cli = d.make_cli(tmp_path, url, d.config(patching_timeout_s=1.5))
    assert cli("db", "upgrade").code == 0
    return cli


def start(cli: Cli, *args: str, node: str = "hv1") -> Result:
    return cli("start", "--cluster", "c1", "--node", node, *args, "--json")


def events(cli: Cli, run_id: str) -> list[Any]:
    with d.store(cli.db_url) as s:
        return s.events(run_id)


# ---- ways out ---------------------------------------------------------------------------------


def test_a_node_that_never_returns_can_be_released_and_frees_its_cluster(cli: Cli) -> None:
    """`abort` is bounded and says what it waits for; `release` ends the run Abandoned with the
    reason and the actor in the trail, frees the cluster, touches nothing and lists what is
    left where."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    sim.inject({"type": "host_never_returns", "host": "hv1"})
    failed = start(cli)
    assert failed.code == 1
    run_id = failed.json()["run_id"]
    assert "timeout of 1.5 s" in failed.json()["error"]["reason"]
    aborted = cli("abort", run_id, "--wait", "1")
    assert aborted.code == 3, aborted.err
    assert "waiting for hv1 to respond" in aborted.err  # progress, though not a terminal
    assert f"nodepatch release {run_id} --reason" in aborted.err
    ops = d.operations(sim.counts())
    released = cli("release", run_id, "--reason", "hv1 hardware fault, ticket 4711", "--json")
    assert released.code == 0, released.err
    doc = released.json()
    assert doc["state"] == "Abandoned"
    left = doc["published"]["released"]
    assert left["node"] == "hv1" and left["maintenance"] is True
    assert {v["id"]: v["host"] for v in left["vms"]} == {
        vm_id: host for vm_id, (host, _) in d.placement(sim).items() if vm_id in ("h1", "h2")
    }
    assert d.operations(sim.counts()) == ops  # nothing touched
    with d.store(cli.db_url) as s:
        assert s.locks(run_id) == []
        last = s.events(run_id)[-1]
    assert (last.trigger, last.to_state) == ("release", "Abandoned")
    assert last.details["reason"] == "hv1 hardware fault, ticket 4711"
    assert last.actor == last.details["by"]
    assert "held by" not in " ".join(start(cli, node="hv2").json()["error"]["reason"].split(";"))
    assert cli("audit", "verify", run_id).code == 0


def test_status_says_whether_a_live_process_holds_the_run(lite: Cli) -> None:
    """`status` names the holder, the heartbeat's age and whether it is live; when no process
    holds the run, it says so and gives the resume command."""
    sim = SimulatedCluster.create(lite.sim, BASE)
    stopped = start(lite, "--until", "Draining")
    run_id = stopped.json()["run_id"]
    idle = lite("status", run_id)
    assert f"no live process holds it: continue with `nodepatch resume {run_id}`" in idle.out
    assert lite("status", run_id, "--json").json()["lease"]["live"] is False
    sim.set_speed(CRAWL)
    holder = d.spawn(lite, "resume", run_id)
    try:
        d.wait_for(lambda: lite("status", run_id, "--json").json()["lease"]["live"], timeout=30)
        lease = lite("status", run_id, "--json").json()["lease"]
        assert lease["holder"].endswith(f":{holder.proc.pid}")
        assert 0 <= lease["heartbeat_age_s"] < 10
        assert f":{holder.proc.pid} (heartbeat " in lite("status", run_id).out
    finally:
        holder.proc.kill()
        holder.wait()


def _interrupted(cli: Cli, sim: SimulatedCluster, signals: tuple[int, ...]) -> tuple[str, Result]:
    stopped = start(cli, "--until", "Draining")
    run_id = stopped.json()["run_id"]
    sim.set_speed(CRAWL)
    driver = d.spawn(cli, "resume", run_id)
    d.wait_for(lambda: _journaled(cli, run_id, "enter_maintenance"), timeout=60)
    for sig in signals:  # back to back: the second arrives before a durable point
        os.kill(driver.proc.pid, sig)
    return run_id, driver.wait(timeout=30)


def _journaled(cli: Cli, run_id: str, job: str) -> bool:
    with d.store(cli.db_url) as s:
        return any(
            e.step_key.endswith(f":{job}") and e.status == "submitted"
            for e in s.journal_entries(run_id)
        )


@pytest.mark.parametrize(
    ("signals", "said"),
    [
        ((signal.SIGINT,), "stopped as asked"),
        ((signal.SIGTERM,), "stopped as asked"),
        # Two SIGINTs sent back to back are merged into one by the kernel; a SIGTERM is not.
        ((signal.SIGINT, signal.SIGTERM), "stopped at once"),
    ],
    ids=["ctrl-c", "sigterm", "ctrl-c-then-sigterm"],
)
def test_ctrl_c_stops_at_a_durable_point_and_the_run_resumes(
    lite: Cli, signals: tuple[int, ...], said: str
) -> None:
    """Ctrl-C or SIGTERM: exit 3 with the resume command, the run left resumable (no live
    holder); a second Ctrl-C stops at once, still resumable. Resumed, it ends Done with every
    cluster operation done once."""
    sim = SimulatedCluster.create(lite.sim, BASE)
    before = d.placement(sim)
    run_id, result = _interrupted(lite, sim, signals)
    assert result.code == 3, result.err
    assert said in result.err
    assert f"nodepatch resume {run_id}" in result.err
    assert "Traceback" not in result.err
    status = lite("status", run_id, "--json").json()
    assert status["state"] == "Draining" and status["lease"]["live"] is False
    sim.set_speed(FAST)
    done = lite("resume", run_id)
    assert done.code == 0, done.err
    assert d.operations(sim.counts()) == d.ONCE
    assert d.placement(sim) == before


def test_a_refusal_ends_the_run_and_blocks_nothing(cli: Cli) -> None:
    """A non-HA VM under `block`: the run ends Refused (exit 1), says how to proceed, touches
    nothing; the node can be started again at once with a policy."""
    sim = SimulatedCluster.create(
        cli.sim, d.scenario(d.vm("h1", "hv1"), d.vm("n1", "hv1", ha=False))
    )
    refused = start(cli)
    assert refused.code == 1
    doc = refused.json()
    assert doc["state"] == "Refused"
    assert "--non-ha save|shutdown|migrate" in doc["error"]["reason"]
    assert d.operations(sim.counts()) == {}
    with d.store(cli.db_url) as s:
        assert s.locks(doc["run_id"]) == []
    again = start(cli, "--non-ha", "migrate")
    assert again.code == 0, again.err
    assert cli("resume", doc["run_id"]).code == 1  # a refused run stays refused


def test_a_cluster_held_by_another_run_refuses_without_blocking(cli: Cli) -> None:
    """The second node of a held cluster is refused, naming the holder and how to proceed; once
    the first run is done, the second node starts without any clean-up."""
    SimulatedCluster.create(cli.sim, BASE)
    first = start(cli, "--until", "Patching").json()["run_id"]
    second = start(cli, node="hv2")
    assert second.code == 1
    assert second.json()["state"] == "Refused"
    assert f"held by nodepatch run {first}" in second.json()["error"]["reason"]
    assert cli("resume", first).code == 0
    assert start(cli, node="hv2").code == 0


def test_until_a_state_already_behind_the_run_is_refused(lite: Cli) -> None:
    """`resume --until Draining` of a run in Rebalancing: exit 2 naming its state; nothing
    happens (it used to run to Done, reboot included)."""
    sim = SimulatedCluster.create(lite.sim, BASE)
    run_id = start(lite, "--until", "Rebalancing").json()["run_id"]
    ops = d.operations(sim.counts())
    result = lite("resume", run_id, "--until", "Draining")
    assert result.code == 2
    assert "is at Rebalancing: --until Draining is not ahead of it" in result.err
    assert d.operations(sim.counts()) == ops
    assert lite("status", run_id, "--json").json()["state"] == "Rebalancing"


def test_a_second_start_of_a_live_run_is_busy_naming_the_holder(lite: Cli) -> None:
    sim = SimulatedCluster.create(lite.sim, BASE)
    run_id = start(lite, "--until", "Draining").json()["run_id"]
    sim.set_speed(CRAWL)
    holder = d.spawn(lite, "resume", run_id)
    try:
        d.wait_for(lambda: lite("status", run_id, "--json").json()["lease"]["live"], timeout=30)
        second = start(lite)
        assert second.code == 4, second.err
        assert run_id in second.err and f":{holder.proc.pid}" in second.err
    finally:
        holder.proc.kill()
        holder.wait()


# ---- outcomes that say what happened ------------------------------------------------------------


def test_done_with_vms_not_put_back_exits_5_with_warnings(cli: Cli) -> None:
    """A VM deleted during the run: Done, but exit 5, a `warnings` list in --json and a summary
    line for people."""
    sim = SimulatedCluster.create(cli.sim, BASE)
    sim.inject({"type": "delete_vm", "vm": "h1", "on": "reboot_host"})
    result = start(cli)
    assert result.code == 5, result.err
    doc = result.json()
    assert doc["state"] == "Done"
    assert doc["warnings"] == ["'vm-h1' (h1): deleted during the run"]
    text = cli("status", doc["run_id"])
    assert "not put back: 'vm-h1' (h1): deleted during the run" in text.out


def test_after_a_failed_drain_the_table_shows_where_each_vm_is_and_says_it_once(
    lite: Cli,
) -> None:
    sim = SimulatedCluster.create(
        lite.sim, d.scenario(d.vm("h1", "hv1"), d.vm("h2", "hv1"), d.vm("h3", "hv1"))
    )
    sim.inject({"type": "migration_fails", "vm": "h1", "times": 20})
    failed = lite("start", "--cluster", "c1", "--node", "hv1")
    assert failed.code == 1
    rows = {line.split()[1]: line for line in failed.out.splitlines() if " live-migrate " in line}
    now = d.placement(sim)
    assert rows["h1"].rstrip().endswith("on the node, Running")
    for vm_id in ("h2", "h3"):
        assert f" {now[vm_id][0]} " in rows[vm_id] and rows[vm_id].rstrip().endswith(
            "moved, Running"
        )
    (error,) = [line for line in failed.out.splitlines() if line.startswith("error: ")]
    assert error.count("live migration of VM vm-h1 (h1) failed") == 1, error


def test_the_vms_the_run_moves_itself_go_to_their_planned_targets(lite: Cli) -> None:
    """The plan puts the big HA VM on hv2 and the non-HA VM on hv3; `migrate` uses the plan's
    target while it still fits (it used to pick afresh, so plan and run disagreed)."""
    sim = SimulatedCluster.create(
        lite.sim,
        d.scenario(d.vm("big", "hv1", memory=8192), d.vm("n1", "hv1", ha=False, memory=2048)),
    )
    plan = {
        v["id"]: v["target"]
        for v in lite(
            "plan", "--cluster", "c1", "--node", "hv1", "--non-ha", "migrate", "--json"
        ).json()["vms"]
    }
    shown = lite("plan", "--cluster", "c1", "--node", "hv1", "--non-ha", "migrate")
    assert f"~{plan['big']}" in shown.out  # the cluster's own choice, shown as an estimate
    run_id = start(lite, "--non-ha", "migrate", "--until", "Patching").json()["run_id"]
    assert d.placement(sim)["n1"][0] == plan["n1"]
    assert lite("resume", run_id).code == 0


def test_status_and_history_show_time_per_state_updates_and_journal_times(lite: Cli) -> None:
    SimulatedCluster.create(lite.sim, BASE)
    run_id = start(lite).json()["run_id"]
    status = lite("status", run_id).out
    assert "STATE" in status and "ENTERED (UTC)" in status
    for state in ("Preflight", "Draining", "Patching", "Enabling", "Rebalancing"):
        assert any(line.startswith(state) for line in status.splitlines()), state
    assert "patched with simulated: updates KB" in status
    assert "STARTED" in status and "Draining@" in status
    history = lite("history", run_id).out
    assert "ENTERED (UTC)" in history and "patched with simulated: updates KB" in history
    stays = lite("status", run_id, "--json").json()["durations"]
    assert [s["state"] for s in stays] == [
        "Preflight",
        "Draining",
        "Patching",
        "Enabling",
        "Rebalancing",
    ]


# ---- smaller things ------------------------------------------------------------------------------


def test_a_signal_sent_twice_is_recorded_once(lite: Cli) -> None:
    SimulatedCluster.create(lite.sim, BASE)
    run_id = start(lite, "--until", "Draining").json()["run_id"]
    assert lite("signal", run_id, "patched").code == 0
    again = lite("signal", run_id, "patched")
    assert again.code == 0 and "already pending" in again.out
    assert lite("signal", run_id, "abort").code == 0
    aborted = lite("abort", run_id)
    assert aborted.code == 0, aborted.err
    kinds = [e.details.get("signal") for e in events(lite, run_id) if e.kind == "signal"]
    assert kinds == ["patched", "abort"]
