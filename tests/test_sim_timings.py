"""The simulator's per-host patch and reboot times, its overcommit counter and its clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_first_hour_input import assert_refused, nodepatch
from tests.test_simulated import FakeClock
from workflows.backends import base, simfaults
from workflows.backends.simulated import SimulatedCluster
from workflows.patchers.simulated import SimulatedPatcher

GIB = 1024


def scenario(hosts: list[dict[str, Any]], vms: list[dict[str, Any]]) -> dict[str, Any]:
    return {"clusters": [{"name": "c1", "hosts": hosts}], "vms": vms}


def host(name: str, gib: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "memory_mb": gib * GIB, **extra}


def vm(vm_id: str, on: str, gib: int, state: str = "Running") -> dict[str, Any]:
    return {"id": vm_id, "name": vm_id, "host": on, "memory_mb": gib * GIB, "state": state}


def status(sim: SimulatedCluster, job_id: str) -> base.JobStatus:
    return sim.job(job_id).status


# -- per-host timings ---------------------------------------------------------------------------


def test_generated_hosts_get_their_own_times_from_the_ranges_by_seed() -> None:
    """Each host's patch and reboot time lies in its range, differs between hosts, is the same
    for the same seed, and the VMs are those made without timings."""
    made = simfaults.generate(
        hosts=8,
        vms=20,
        non_ha=0,
        stopped_ha=0,
        seed=3,
        cluster="c1",
        patch_seconds=(1200, 2400),
        reboot_seconds=(300, 600),
    )
    hosts = made["clusters"][0]["hosts"]
    assert all(1200 <= h["patch_seconds"] <= 2400 for h in hosts)
    assert all(300 <= h["reboot_seconds"] <= 600 for h in hosts)
    assert len({h["patch_seconds"] for h in hosts}) > 4
    again = simfaults.generate(
        hosts=8,
        vms=20,
        non_ha=0,
        stopped_ha=0,
        seed=3,
        cluster="c1",
        patch_seconds=(1200, 2400),
        reboot_seconds=(300, 600),
    )
    assert again == made
    plain = simfaults.generate(hosts=8, vms=20, non_ha=0, stopped_ha=0, seed=3, cluster="c1")
    assert plain["vms"] == made["vms"]
    assert all("patch_seconds" not in h for h in plain["clusters"][0]["hosts"])


def test_a_host_patches_and_reboots_for_its_own_times(tmp_path: Path) -> None:
    """reboot_host without patch_seconds takes the host's own patch time, then its own reboot
    time; a host without its own takes 60 s and 120 s; an explicit patch_seconds wins."""
    clock = FakeClock()
    hosts = [host("a", 64, patch_seconds=100, reboot_seconds=50), host("b", 64), host("c", 64)]
    sim = SimulatedCluster.create(tmp_path / "c.db", scenario(hosts, []), speed=1.0, clock=clock)
    for name in ("a", "b", "c"):
        sim.enter_maintenance(name)
    clock.tick(5)
    own = SimulatedPatcher(sim).begin("a")
    default = SimulatedPatcher(sim).begin("b")
    explicit = sim.reboot_host("c", patch_seconds=40)
    clock.tick(149)
    assert status(sim, own) is base.JobStatus.RUNNING  # 100 + 50 s
    assert status(sim, explicit) is base.JobStatus.RUNNING  # 40 + 120 s
    assert status(sim, default) is base.JobStatus.RUNNING  # 60 + 120 s
    clock.tick(2)
    assert status(sim, own) is base.JobStatus.COMPLETED
    assert status(sim, explicit) is base.JobStatus.RUNNING
    clock.tick(10)
    assert status(sim, explicit) is base.JobStatus.COMPLETED
    assert status(sim, default) is base.JobStatus.RUNNING
    clock.tick(20)
    assert status(sim, default) is base.JobStatus.COMPLETED


def test_init_options_and_show_round_trip_the_timings(tmp_path: Path) -> None:
    """`sim init --patch-seconds/--reboot-seconds` gives every host its times; `sim show
    --json` shows them (and the clock), and its document makes the same hosts again."""
    made = nodepatch(
        tmp_path,
        *("sim", "init", "--file", "c.db", "--hosts", "4", "--seed", "7"),
        *("--patch-seconds", "1200-2400", "--reboot-seconds", "300"),
    )
    assert made.code == 0, made.err
    shown = nodepatch(tmp_path, "sim", "show", "--file", "c.db", "--json").json()
    hosts = shown["clusters"][0]["hosts"]
    assert all(1200 <= h["patch_seconds"] <= 2400 and h["reboot_seconds"] == 300 for h in hosts)
    assert set(shown["clock"]) == {"sim_time", "real_time", "speed"}
    (tmp_path / "s.json").write_text(json.dumps(shown), encoding="utf-8")
    again = nodepatch(tmp_path, "sim", "init", "--file", "d.db", "--from", "s.json")
    assert again.code == 0, again.err
    copy = nodepatch(tmp_path, "sim", "show", "--file", "d.db", "--json").json()
    assert copy["clusters"] == shown["clusters"]


@pytest.mark.parametrize(
    ("value", "needle"),
    [("20-x", "expected seconds as LOW-HIGH or N"), ("40-20", "0 <= low <= high")],
)
def test_a_bad_range_is_refused_naming_the_option(tmp_path: Path, value: str, needle: str) -> None:
    result = nodepatch(tmp_path, "sim", "init", "--file", "c.db", "--patch-seconds", value)
    assert_refused(result, "--patch-seconds", needle)
    assert not (tmp_path / "c.db").exists()


# -- overcommit ---------------------------------------------------------------------------------


def test_moves_that_arrive_short_of_memory_are_counted_not_refused(tmp_path: Path) -> None:
    """Two moves to one host, each fitting when asked for: both arrive (the simulator does not
    refuse), and the second arrival, which leaves the host holding more running-VM memory than
    it has, is counted as one overcommit."""
    clock = FakeClock()
    hosts = [host("a", 8), host("b", 64)]
    vms = [vm("v1", "b", 5), vm("v2", "b", 5)]
    sim = SimulatedCluster.create(tmp_path / "c.db", scenario(hosts, vms), speed=1.0, clock=clock)
    first, second = sim.move_vm("v1", "a"), sim.move_vm("v2", "a")
    clock.tick(100)
    assert status(sim, first).value == status(sim, second).value == "Completed"
    assert {v.id: v.host for v in sim.inventory("c1").vms} == {"v1": "a", "v2": "a"}
    assert sim.operations("c1")["overcommit"] == 1
    assert sim.counts()["overcommit:a"] == 1


def test_starts_that_leave_a_host_short_are_counted(tmp_path: Path) -> None:
    """Two VMs started on a host with room for one: both run, one overcommit."""
    clock = FakeClock()
    hosts = [host("a", 8)]
    vms = [vm("s1", "a", 6, "PowerOff"), vm("s2", "a", 6, "PowerOff")]
    sim = SimulatedCluster.create(tmp_path / "c.db", scenario(hosts, vms), speed=1.0, clock=clock)
    jobs = [sim.start_vm("s1"), sim.start_vm("s2")]
    clock.tick(60)
    assert all(status(sim, j) is base.JobStatus.COMPLETED for j in jobs)
    assert sim.operations("c1")["overcommit"] == 1


def test_a_drain_and_moves_with_room_count_no_overcommit(tmp_path: Path) -> None:
    """Migrations, moves and starts that fit count nothing: `overcommit` is not even listed."""
    hosts = [host("a", 16), host("b", 16)]
    vms = [vm("v1", "a", 4), vm("v2", "a", 4), vm("s", "b", 2, "PowerOff")]
    sim = SimulatedCluster.create(tmp_path / "c.db", scenario(hosts, vms))
    for job in (sim.enter_maintenance("a"), sim.start_vm("s")):
        assert sim.job(job).ok
    assert sim.job(sim.exit_maintenance("a")).ok
    assert sim.job(sim.move_vm("v1", "a")).ok
    operations = sim.operations("c1")
    assert operations["live_migrate"] == 2
    assert "overcommit" not in operations


def test_the_clock_runs_at_the_speed(tmp_path: Path) -> None:
    """clock(): simulated seconds advance `speed` times as fast as real ones."""
    clock = FakeClock()
    sim = SimulatedCluster.create(
        tmp_path / "c.db", scenario([host("a", 8)], []), speed=50.0, clock=clock
    )
    before = sim.clock()
    clock.tick(2)
    after = sim.clock()
    assert after["sim_time"] - before["sim_time"] == pytest.approx(100.0)
    assert after["real_time"] == clock.now
    assert after["speed"] == 50.0
