"""`start` and `resume` without --detach, in real processes on SQLite and PostgreSQL: a step that
waits on the cluster (a node rebooting) gives its lease back every `engine.yield_after_s`, sleeps
outside the lease and is driven again, quietly; a worker that claims the run meanwhile drives it
on and the command leaves it alone (exit 3, naming the worker); Ctrl-C between two checks stops
at once."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from engine.model import Run, utcnow
from tests import durability as d
from tests.clitools import Cli
from workflows.backends.simulated import SimulatedCluster

pytestmark = pytest.mark.slow
SPEED = 60.0  # the 120 s simulated reboot takes 2 s
ONCE = {
    "enter_maintenance:hv1": 1,
    "live_migrate:h1": 1,
    "live_migrate:h2": 1,
    "reboot_host:hv1": 1,
    "exit_maintenance:hv1": 1,
    "move_vm:h1": 1,
    "move_vm:h2": 1,
}


def _config(log: Path, *, poll_s: float = 0.1, yield_s: float = 0.3) -> str:
    return (
        f"engine: {{poll_interval_s: {poll_s}, lease_ttl_s: 5, yield_after_s: {yield_s}}}\n"
        "patcher: {kind: simulated, simulated: {patch_seconds: 0}}\n"
        f"log: {{file: {log}}}\n"
    )


def _cluster(cli: Cli) -> SimulatedCluster:
    """hv1 with two HA VMs; its reboot takes 120 simulated seconds."""
    scenario = d.scenario(d.vm("h1", "hv1"), d.vm("h2", "hv1"))
    scenario["clusters"][0]["hosts"][0]["reboot_seconds"] = 120
    return SimulatedCluster.create(cli.sim, scenario, speed=SPEED)


def _run_id(db_url: str) -> str:
    found: list[Run] = []

    def started() -> bool:
        with d.store(db_url) as s:
            found[:] = s.runs()
        return bool(found)

    d.wait_for(started, timeout=60)
    return found[0].id


def _between_checks(run: Run, now: dt.datetime) -> bool:
    """The run is in a step, nobody holds its lease, and it sleeps until its next check."""
    return (
        run.finished_at is None
        and run.lease_owner is None
        and run.wake_at is not None
        and run.wake_at > now
    )


def _freeze_between_checks(db_url: str, run_id: str, proc: d.Spawned) -> Run:
    """Stop (SIGSTOP) the driving command while it sleeps between two checks, holding no
    lease; returns the run as it left it. The caller resumes the process (SIGCONT)."""
    margin = dt.timedelta(seconds=0.02)
    with d.store(db_url) as s:
        for _ in range(200):
            d.wait_for(lambda: _between_checks(s.get(run_id), utcnow()), timeout=30, interval=0.002)
            os.kill(proc.proc.pid, signal.SIGSTOP)
            run = s.get(run_id)
            if _between_checks(run, utcnow() + margin):  # it cannot have woken up yet
                return run
            os.kill(proc.proc.pid, signal.SIGCONT)
    raise AssertionError("never caught the command between two checks")


def _claims(events: list[Any]) -> list[str]:
    return [e.actor for e in events if e.kind == "lease"]


def test_a_reboot_is_waited_for_outside_the_lease_and_quietly(tmp_path: Path, db_url: str) -> None:
    """`start` on a node whose reboot outlasts yield_after_s: the run ends Done (exit 0), every
    cluster operation once; while the node rebooted the run row showed no lease at least once
    (the command slept outside it), and neither the terminal output nor the log has the
    internal hand-backs as "sleeping until" lines."""
    log = tmp_path / "nodepatch.log"
    cli = d.make_cli(tmp_path, db_url, _config(log))
    sim = _cluster(cli)
    before = d.placement(sim)
    proc = d.spawn(cli, "start", "--cluster", "c1", "--node", "hv1")
    run_id = _run_id(db_url)
    free_while_patching = 0
    with d.store(db_url) as s:
        while proc.proc.poll() is None:
            run = s.get(run_id)
            if run.state == "Patching" and _between_checks(run, utcnow()):
                free_while_patching += 1
            time.sleep(0.005)
        events = s.events(run_id)
        final = s.get(run_id)
    result = proc.wait()
    assert result.code == d.EXIT_DONE, result.err
    assert final.state == "Done"
    assert free_while_patching > 0
    claims = _claims(events)
    assert len(claims) > 1 and len(set(claims)) == 1  # the command alone, claiming again
    assert any(e.kind == "sleeping" for e in events)
    assert d.operations(sim.counts()) == ONCE
    assert d.placement(sim) == before
    assert "sleeping until" not in result.out + result.err
    assert "sleeps until" not in result.out + result.err
    assert "sleeping until" not in log.read_text(encoding="utf-8")


def test_until_holds_across_the_hand_backs(tmp_path: Path, db_url: str) -> None:
    """`start --until Rebalancing` whose Patching step gives its lease back several times still
    stops on entering Rebalancing (exit 3), before moving any VM back."""
    cli = d.make_cli(tmp_path, db_url, _config(tmp_path / "nodepatch.log"))
    sim = _cluster(cli)
    result = cli("start", "--cluster", "c1", "--node", "hv1", "--until", "Rebalancing", "--json")
    assert result.code == d.EXIT_STOPPED, result.err
    assert result.json()["state"] == "Rebalancing" and result.json()["stopped"] == "until"
    with d.store(db_url) as s:
        assert len(_claims(s.events(result.json()["run_id"]))) > 1  # it did hand back
    assert "move_vm:h1" not in d.operations(sim.counts())


def test_a_worker_that_claims_the_run_meanwhile_drives_it_on(tmp_path: Path, db_url: str) -> None:
    """While `start` sleeps between two checks, the run is handed to the workers (`resume
    --detach`) and a worker claims it: the command exits 3 naming the worker instead of fighting
    it for the run, the worker drives it to Done, and every cluster operation happens once. (The
    command is frozen with SIGSTOP between two checks so that the worker's claim certainly falls
    into that gap.)"""
    cli = d.make_cli(tmp_path, db_url, _config(tmp_path / "nodepatch.log"))
    sim = _cluster(cli)
    before = d.placement(sim)
    proc = d.spawn(cli, "start", "--cluster", "c1", "--node", "hv1", "--json")
    run_id = _run_id(db_url)
    left = _freeze_between_checks(db_url, run_id, proc)
    try:
        assert cli("resume", run_id, "--detach").code == d.EXIT_STOPPED
        worker = d.spawn(cli, "worker", "--until-idle", "--poll", "0.05")
        d.wait_for(lambda: d.store_get(db_url, run_id).lease_token > left.lease_token, timeout=30)
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
    result = proc.wait()
    assert worker.wait().code == d.EXIT_DONE
    with d.store(db_url) as s:
        run, claims = s.get(run_id), _claims(s.events(run_id))
    assert result.code == d.EXIT_STOPPED, result.err
    assert result.json()["stopped"] == "handed_over"
    holder = result.json()["by"]
    assert holder in claims and holder.startswith(f"{claims[0].rsplit(':', 1)[0]}:")
    assert holder.rsplit("#", 1)[0].endswith(f":{worker.proc.pid}")  # a slot of the worker
    assert f"run {run_id} is now driven by {holder}; follow it with" in result.err
    assert run.state == "Done"
    assert d.operations(sim.counts()) == ONCE
    assert d.placement(sim) == before


def test_a_run_a_worker_ended_meanwhile_is_reported_as_ended(tmp_path: Path, db_url: str) -> None:
    """As above, but the worker drives the run to Done before the command wakes: the command
    says who ended it and reports the end as its own (exit 0, the run's JSON, reason final),
    not that the worker drives it now."""
    cli = d.make_cli(tmp_path, db_url, _config(tmp_path / "nodepatch.log"))
    sim = _cluster(cli)
    proc = d.spawn(cli, "start", "--cluster", "c1", "--node", "hv1", "--json")
    run_id = _run_id(db_url)
    _freeze_between_checks(db_url, run_id, proc)
    try:
        assert cli("resume", run_id, "--detach").code == d.EXIT_STOPPED
        worker = d.spawn(cli, "worker", "--until-idle", "--poll", "0.05")
        assert worker.wait().code == d.EXIT_DONE
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
    result = proc.wait()
    with d.store(db_url) as s:
        run, claims = s.get(run_id), _claims(s.events(run_id))
    assert run.state == "Done"
    assert result.code == d.EXIT_DONE, result.err
    assert result.json()["state"] == "Done"
    assert result.json()["stopped"] == "final"
    assert f"run {run_id} was driven to its end (Done) by {claims[-1]} meanwhile" in result.err
    assert "now driven by" not in result.err
    assert d.operations(sim.counts()) == ONCE


def test_ctrl_c_between_two_checks_stops_at_once(tmp_path: Path, db_url: str) -> None:
    """SIGINT while the command sleeps between two checks (here 3 s apart) stops it within a
    second, exit 3 with the `resume` command; the run is resumable and ends Done with every
    cluster operation once."""
    log = tmp_path / "nodepatch.log"
    cli = d.make_cli(tmp_path, db_url, _config(log, poll_s=3.0, yield_s=0.001))
    sim = _cluster(cli)
    before = d.placement(sim)
    proc = d.spawn(cli, "start", "--cluster", "c1", "--node", "hv1")
    run_id = _run_id(db_url)
    left = _freeze_between_checks(db_url, run_id, proc)
    assert left.wake_at is not None
    os.kill(proc.proc.pid, signal.SIGINT)  # handled as soon as the process goes on
    sent, asleep_for = time.monotonic(), (left.wake_at - utcnow()).total_seconds()
    os.kill(proc.proc.pid, signal.SIGCONT)
    result = proc.wait(timeout=30)
    assert asleep_for > 1.5 and time.monotonic() - sent < 1.5  # before its next check
    assert result.code == d.EXIT_STOPPED, result.err
    assert f"stopped as asked; run {run_id}" in result.err
    assert d.store_get(db_url, run_id).lease_owner is None
    (tmp_path / "config.yaml").write_text(_config(log), encoding="utf-8")
    assert d.resume_until_settled(cli, run_id, first_wait_s=0).code == d.EXIT_DONE
    assert d.store_get(db_url, run_id).state == "Done"
    assert d.operations(sim.counts()) == ONCE
    assert d.placement(sim) == before


def test_a_cycle_driven_here_waits_for_its_node_s_reboot_outside_the_lease(
    tmp_path: Path, db_url: str
) -> None:
    """`cycle start` drives its node runs in this process: a node run whose reboot outlasts
    yield_after_s gives its lease back too (it is claimed again, with "sleeping" events), and
    the cycle still ends Done with every cluster operation once."""
    cli = d.make_cli(
        tmp_path, db_url, _config(tmp_path / "nodepatch.log") + "cycle: {poll_s: 0.05}\n"
    )
    scenario = d.scenario(d.vm("h1", "hv1"), d.vm("h2", "hv1"))
    hosts = [h["name"] for h in scenario["clusters"][0]["hosts"]]
    for host in scenario["clusters"][0]["hosts"]:
        host["reboot_seconds"] = 120
    sim = SimulatedCluster.create(cli.sim, scenario, speed=SPEED)
    before = d.placement(sim)
    result = cli("cycle", "start", "--cluster", "c1", "--max-parallel", "1", "--json")
    assert result.code == d.EXIT_DONE, result.err
    with d.store(db_url) as s:
        nodes = s.children(result.json()["run_id"])
        assert [n.state for n in nodes] == ["Done"] * len(hosts)
        for node in nodes:
            events = s.events(node.id)
            assert len(_claims(events)) > 1 and any(e.kind == "sleeping" for e in events)
    ops = d.operations(sim.counts())
    assert {k: v for k, v in ops.items() if k.startswith(("reboot_host", "enter_m", "exit_m"))} == {
        f"{kind}:{host}": 1
        for kind in ("enter_maintenance", "reboot_host", "exit_maintenance")
        for host in hosts
    }
    assert d.placement(sim) == before
    assert "sleeping until" not in result.out + result.err
