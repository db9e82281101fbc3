"""The simulated cluster: VMM-like semantics, durable shared state, fault injection."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from engine import errors
from workflows.backends import base, simfaults
from workflows.backends.simulated import SimulatedCluster
from workflows.patchers.simulated import SimulatedPatcher

GIB = 1024
HA1, HA2, NONHA, OFF, SAVED = "id-ha1", "id-ha2", "id-nonha", "id-off", "id-saved"


class FakeClock:
    """Real seconds, advanced by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def vm(
    vm_id: str, host: str, *, ha: bool = True, state: str = "Running", gib: int = 4
) -> dict[str, Any]:
    return {
        "id": vm_id,
        "name": f"name-{vm_id}",
        "host": host,
        "ha": ha,
        "state": state,
        "memory_mb": gib * GIB,
    }


def scenario(
    vms: list[dict[str, Any]], *, memory: tuple[int, ...] = (32, 32, 32), **extra: Any
) -> dict[str, Any]:
    hosts = [{"name": f"hv0{i + 1}", "memory_mb": m * GIB} for i, m in enumerate(memory)]
    return {"clusters": [{"name": "c1", "hosts": hosts}], "vms": vms, **extra}


def drain_scenario() -> dict[str, Any]:
    """hv01 holds two running HA VMs, a running non-HA VM, a stopped and a saved HA VM."""
    return scenario(
        [
            vm(HA1, "hv01", gib=8),
            vm(HA2, "hv01", gib=4),
            vm(NONHA, "hv01", ha=False, gib=2),
            vm(OFF, "hv01", state="PowerOff"),
            vm(SAVED, "hv01", state="Saved"),
            vm("id-load2", "hv02", gib=10),
            vm("id-load3", "hv03", gib=4),
        ]
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cluster.json"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def run(cluster: SimulatedCluster, job_id: str) -> base.Job:
    """Poll once: at speed 0 the next call completes every submitted job."""
    return cluster.job(job_id)


def vm_of(cluster: SimulatedCluster, vm_id: str) -> base.Vm:
    found = cluster.inventory("c1").vm(vm_id)
    assert found is not None
    return found


def host_of(cluster: SimulatedCluster, name: str) -> base.Host:
    found = cluster.inventory("c1").host(name)
    assert found is not None
    return found


# -- creation, generation, snapshots ------------------------------------------------------------


def test_opening_a_missing_file_says_how_to_create_one(path: Path) -> None:
    """A SimulatedCluster on a path with no state file raises UsageError naming `sim init`."""
    with pytest.raises(errors.UsageError, match="sim init"):
        SimulatedCluster(path)


def test_snapshot_round_trips_weird_names_duplicates_and_generated_ids(path: Path) -> None:
    """IDs are generated when absent, names are kept byte for byte, and duplicate names coexist."""
    weird = 'it\'s "$(rm -rf /)" `x` $env:PATH\nline2 ünï 💥 \\ ;|&'
    raw = scenario(
        [
            {"name": weird, "host": "HV01", "ha": True, "state": "Running", "memory_mb": 1024},
            {"name": weird, "host": "hv02", "ha": False, "state": "Paused", "memory_mb": 2048},
        ]
    )
    cluster = SimulatedCluster.create(path, raw)
    snap = cluster.snapshot()
    ids = [v["id"] for v in snap["vms"]]
    assert len(set(ids)) == 2
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert [v["name"] for v in snap["vms"]] == [weird, weird]
    assert snap["vms"][0]["host"] == "hv01"
    copy = SimulatedCluster.create(path.with_name("copy.json"), snap)
    assert copy.snapshot() == snap
    assert json.loads(json.dumps(snap)) == snap


def test_snapshot_has_the_documented_shape(path: Path) -> None:
    """snapshot() is the `sim show --json` document: clusters with hosts, and VMs keyed by ID."""
    snap = SimulatedCluster.create(path, drain_scenario()).snapshot()
    assert set(snap) == {"clusters", "vms"}
    assert set(snap["clusters"][0]["hosts"][0]) == {"name", "memory_mb", "maintenance", "state"}
    assert set(snap["vms"][0]) == {"id", "name", "host", "ha", "state", "memory_mb"}


def test_generate_is_deterministic_by_seed(tmp_path: Path) -> None:
    """The same seed gives the same cluster, IDs included; another seed gives another one."""
    a = SimulatedCluster.generate(tmp_path / "a.json", seed=7).snapshot()
    b = SimulatedCluster.generate(tmp_path / "b.json", seed=7).snapshot()
    c = SimulatedCluster.generate(tmp_path / "c.json", seed=8).snapshot()
    assert a == b
    assert a != c


def test_generate_names_spreads_and_mixes_vms(path: Path) -> None:
    """Hosts are hv01.., VMs vm001..; every host gets a VM; non-HA and stopped counts are exact."""
    snap = SimulatedCluster.generate(
        path, hosts=4, vms=10, non_ha=2, stopped_ha=3, seed=3
    ).snapshot()
    assert [h["name"] for h in snap["clusters"][0]["hosts"]] == ["hv01", "hv02", "hv03", "hv04"]
    assert [v["name"] for v in snap["vms"]] == [f"vm{i:03d}" for i in range(1, 11)]
    assert {v["host"] for v in snap["vms"]} == {"hv01", "hv02", "hv03", "hv04"}
    assert sum(not v["ha"] and v["state"] == "Running" for v in snap["vms"]) == 2
    assert sum(v["ha"] and v["state"] == "PowerOff" for v in snap["vms"]) == 3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("host", ["hv01", "hv02", "hv03"])
def test_generated_cluster_can_lose_any_one_node(tmp_path: Path, seed: int, host: str) -> None:
    """Memory is sized so that draining any single host of a generated cluster succeeds."""
    cluster = SimulatedCluster.generate(tmp_path / "g.json", vms=15, seed=seed)
    job = run(cluster, cluster.enter_maintenance(host))
    assert job.ok, job.message
    assert not [v for v in cluster.inventory("cluster1").vms_on(host) if v.uses_memory]


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda s: s.update(extra=1), "'extra'"),
        (lambda s: s["vms"][1].update(host="nope"), "vms[1].host"),
        (lambda s: s["vms"][0].update(memory_mb="4"), "vms[0].memory_mb"),
        (lambda s: s["vms"][2].update(state="Frozen"), "vms[2].state"),
        (lambda s: s["vms"][1].update(id=HA1), "vms[1].id"),
        (lambda s: s["vms"][0].pop("name"), "vms[0]: missing key 'name'"),
        (lambda s: s["clusters"][0]["hosts"][1].update(memory_mb=0), "hosts[1].memory_mb"),
        (lambda s: s["clusters"][0]["hosts"][2].update(name="HV01"), "duplicate"),
        (lambda s: s.update(faults=[{"type": "meteor"}]), "faults[0].type"),
        (lambda s: s.update(faults=[{"type": "job_fails", "op": "x"}]), "faults[0].op"),
        (lambda s: s.update(faults=[{"type": "job_fails"}]), "missing key 'op'"),
        (lambda s: s.update(faults=[{"type": "transient", "oops": 1}]), "unknown key 'oops'"),
        (lambda s: s.update(faults=[{"type": "transient", "times": 0}]), "faults[0].times"),
    ],
)
def test_create_rejects_bad_scenarios_naming_the_key(path: Path, mutate: Any, where: str) -> None:
    """An invalid scenario raises UsageError whose message names the bad key or index."""
    raw = drain_scenario()
    mutate(raw)
    with pytest.raises(errors.UsageError, match=where.replace("[", r"\[").replace("]", r"\]")):
        SimulatedCluster.create(path, raw)


def test_unknown_cluster_vm_host_and_job_are_backend_errors(path: Path) -> None:
    """Unknown names and IDs are refused with BackendError, and the refusal is counted."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    with pytest.raises(errors.BackendError, match="unknown cluster"):
        cluster.inventory("c9")
    with pytest.raises(errors.BackendError, match="unknown VM"):
        cluster.start_vm("nope")
    with pytest.raises(errors.BackendError, match="unknown host"):
        cluster.enter_maintenance("hv09")
    with pytest.raises(errors.BackendError, match="unknown job"):
        cluster.job("nope")
    counts = cluster.counts()
    assert "start_vm" not in counts
    assert counts["rejected:start_vm"] == counts["rejected:inventory"] == 1


# -- maintenance --------------------------------------------------------------------------------


def test_drain_migrates_ha_saves_non_ha_and_leaves_stopped(path: Path) -> None:
    """Running HA VMs leave, the running non-HA VM is saved in place, stopped/saved VMs stay."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    job = run(cluster, cluster.enter_maintenance("HV01"))
    assert job.status is base.JobStatus.SUCCEED_WITH_INFO
    assert "name-id-nonha" in job.message
    assert job.details["saved_vms"] == NONHA
    inv = cluster.inventory("c1")
    assert {v.id for v in inv.vms_on("hv01")} == {NONHA, OFF, SAVED}
    assert inv.vm(NONHA) == base.Vm(
        NONHA, "name-id-nonha", "hv01", False, base.PowerState.SAVED, 2 * GIB
    )
    assert inv.vm(OFF).state is base.PowerState.POWER_OFF  # type: ignore[union-attr]
    host = host_of(cluster, "hv01")
    assert host.maintenance
    assert not host.available_for_placement


def test_drain_picks_the_host_with_most_free_memory_at_each_step(path: Path) -> None:
    """Each drained VM goes to the host with the most free memory at the moment it moves."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    run(cluster, cluster.enter_maintenance("hv01"))
    assert vm_of(cluster, HA1).host == "hv03"  # free: hv02 22, hv03 28
    assert vm_of(cluster, HA2).host == "hv02"  # free: hv02 22, hv03 20
    counts = cluster.counts()
    assert counts["live_migrate"] == 2
    assert counts[f"live_migrate:{HA1}"] == counts[f"live_migrate:{HA2}"] == 1
    assert "move_vm" not in counts


def test_drain_with_only_ha_vms_completes(path: Path) -> None:
    """A drain that saves nothing ends Completed, not SucceedWithInfo."""
    cluster = SimulatedCluster.create(path, scenario([vm(HA1, "hv01")]))
    assert run(cluster, cluster.enter_maintenance("hv01")).status is base.JobStatus.COMPLETED


def test_drain_fails_naming_the_vm_that_fits_nowhere(path: Path) -> None:
    """A VM that fits on no other host stays; the job fails naming it; no maintenance mode."""
    raw = scenario(
        [vm(HA2, "hv01", gib=4), vm(HA1, "hv01", gib=20), vm("big", "hv02", gib=14)],
        memory=(32, 16, 16),
    )
    cluster = SimulatedCluster.create(path, raw)
    job = run(cluster, cluster.enter_maintenance("hv01"))
    assert job.status is base.JobStatus.FAILED
    assert HA1 in job.message
    assert vm_of(cluster, HA1).host == "hv01"
    assert vm_of(cluster, HA2).host == "hv03"
    assert not host_of(cluster, "hv01").maintenance


def test_drain_progress_is_visible_as_simulated_time_passes(path: Path, clock: FakeClock) -> None:
    """With speed > 0 the drain moves VMs one by one, and its message names the current move."""
    cluster = SimulatedCluster.create(path, drain_scenario(), speed=1.0, clock=clock)
    job_id = cluster.enter_maintenance("hv01")
    clock.tick(1)  # first migration (8 GiB: 18 s) has begun
    job = cluster.job(job_id)
    assert job.status is base.JobStatus.RUNNING
    assert job.message == "migrating name-id-ha1 to hv03"
    assert vm_of(cluster, HA1).host == "hv01"
    clock.tick(18)  # first done, second (4 GiB: 10 s) running
    job = cluster.job(job_id)
    assert 0 < job.progress < 100
    assert job.message == "migrating name-id-ha2 to hv02"
    assert vm_of(cluster, HA1).host == "hv03"
    assert not host_of(cluster, "hv01").maintenance
    clock.tick(100)
    assert cluster.job(job_id).ok
    assert host_of(cluster, "hv01").maintenance


def test_speed_scales_simulated_time(path: Path, clock: FakeClock) -> None:
    """At speed 10, one real second is ten simulated seconds; set_speed(0) finishes jobs."""
    cluster = SimulatedCluster.create(path, drain_scenario(), speed=10.0, clock=clock)
    job_id = cluster.move_vm(HA2, "hv02")  # 4 GiB live: 10 s simulated
    clock.tick(0.5)
    assert not cluster.job(job_id).done
    clock.tick(0.6)
    assert cluster.job(job_id).ok
    slow = cluster.move_vm(HA1, "hv03")
    cluster.set_speed(0)
    assert cluster.job(slow).ok


def test_exit_maintenance_clears_the_flag_and_moves_nothing_back(path: Path) -> None:
    """Leaving maintenance makes the host placeable again; migrated VMs stay where they went."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    run(cluster, cluster.enter_maintenance("hv01"))
    assert run(cluster, cluster.exit_maintenance("hv01")).status is base.JobStatus.COMPLETED
    host = host_of(cluster, "hv01")
    assert not host.maintenance
    assert host.available_for_placement
    assert vm_of(cluster, HA1).host == "hv03"


def test_idempotent_requests_complete_immediately(path: Path, clock: FakeClock) -> None:
    """A VM or host already in the requested state gives a job that is already Completed."""
    cluster = SimulatedCluster.create(path, drain_scenario(), speed=1.0, clock=clock)
    for job_id in (
        cluster.exit_maintenance("hv01"),
        cluster.move_vm(HA1, "hv01"),
        cluster.start_vm(HA1),
        cluster.save_vm(SAVED),
        cluster.shutdown_vm(OFF),
    ):
        assert cluster.job(job_id).status is base.JobStatus.COMPLETED


def test_second_identical_request_is_refused_while_the_first_runs(
    path: Path, clock: FakeClock
) -> None:
    """One unfinished job per (kind, target): a repeat names the running job; find_job finds it."""
    cluster = SimulatedCluster.create(path, drain_scenario(), speed=1.0, clock=clock)
    job_id = cluster.enter_maintenance("hv01")
    with pytest.raises(errors.BackendError, match=f"already has a running job {job_id}"):
        cluster.enter_maintenance("HV01")
    assert cluster.find_job("enter_maintenance", "Hv01") == job_id
    assert cluster.find_job("exit_maintenance", "hv01") is None
    counts = cluster.counts()
    assert counts["enter_maintenance:hv01"] == 1
    assert counts["rejected:enter_maintenance"] == 1


# -- VM operations ------------------------------------------------------------------------------


def test_power_operations_change_state(path: Path) -> None:
    """start resumes saved VMs and boots stopped ones; save and shutdown do what they say."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    for op, vm_id, state in [
        (cluster.start_vm, SAVED, base.PowerState.RUNNING),
        (cluster.start_vm, OFF, base.PowerState.RUNNING),
        (cluster.save_vm, HA1, base.PowerState.SAVED),
        (cluster.shutdown_vm, HA2, base.PowerState.POWER_OFF),
    ]:
        assert run(cluster, op(vm_id)).ok
        assert vm_of(cluster, vm_id).state is state


def test_move_refused_without_enough_free_memory(path: Path) -> None:
    """A running VM cannot move to a host whose free memory is smaller than the VM's."""
    raw = scenario([vm(HA1, "hv01", gib=20), vm("big", "hv02", gib=20)])
    cluster = SimulatedCluster.create(path, raw)
    with pytest.raises(errors.BackendError, match="needs 20480 MB"):
        cluster.move_vm(HA1, "hv02")
    cluster.admin_set_state(HA1, base.PowerState.POWER_OFF)
    assert run(cluster, cluster.move_vm(HA1, "hv02")).ok  # stopped VMs hold no memory


def test_start_refused_when_memory_is_short(path: Path) -> None:
    """Starting a VM needs its memory free on its host."""
    raw = scenario([vm(OFF, "hv01", state="PowerOff", gib=20), vm("big", "hv01", gib=20)])
    cluster = SimulatedCluster.create(path, raw)
    with pytest.raises(errors.BackendError, match="MB free"):
        cluster.start_vm(OFF)


def test_maintenance_hosts_refuse_placement(path: Path) -> None:
    """No move to, and no start on, a host in maintenance mode; moving away from one is fine."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    run(cluster, cluster.enter_maintenance("hv01"))
    with pytest.raises(errors.BackendError, match="maintenance"):
        cluster.move_vm(HA1, "hv01")
    with pytest.raises(errors.BackendError, match="maintenance"):
        cluster.start_vm(OFF)
    assert run(cluster, cluster.move_vm(OFF, "hv02")).ok


def test_non_ha_vm_can_move(path: Path) -> None:
    """Moving a running non-HA VM is allowed (shared-nothing live migration)."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    assert run(cluster, cluster.move_vm(NONHA, "hv02")).ok
    assert vm_of(cluster, NONHA).host == "hv02"
    assert cluster.counts()[f"move_vm:{NONHA}"] == 1


# -- reboot and patcher -------------------------------------------------------------------------


def test_reboot_requires_maintenance(path: Path) -> None:
    """Rebooting a host that is not in maintenance mode is refused."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    with pytest.raises(errors.BackendError, match="maintenance"):
        cluster.reboot_host("hv01")


def test_reboot_patches_then_host_stops_responding_then_returns(
    path: Path, clock: FakeClock
) -> None:
    """The reboot job patches (host Up), reboots (Rebooting, VM ops refused), then is Up again."""
    cluster = SimulatedCluster.create(path, drain_scenario(), speed=1.0, clock=clock)
    cluster.set_speed(0)
    run(cluster, cluster.enter_maintenance("hv01"))
    cluster.set_speed(1)
    job_id = cluster.reboot_host("hv01", patch_seconds=30)
    clock.tick(10)
    assert "installing" in cluster.job(job_id).message
    assert host_of(cluster, "hv01").state is base.HostState.UP
    clock.tick(30)
    assert host_of(cluster, "hv01").state is base.HostState.REBOOTING
    with pytest.raises(errors.BackendError, match="not responding"):
        cluster.start_vm(OFF)
    clock.tick(120)
    job = cluster.job(job_id)
    assert job.status is base.JobStatus.COMPLETED
    assert job.details["reboot"] == "true"
    assert host_of(cluster, "hv01").state is base.HostState.UP
    assert host_of(cluster, "hv01").maintenance


def test_host_never_returns_keeps_the_reboot_job_running(path: Path) -> None:
    """With host_never_returns the host stays Rebooting and the job runs on at 90%."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    run(cluster, cluster.enter_maintenance("hv01"))
    cluster.inject({"type": "host_never_returns", "host": "HV01"})
    job_id = cluster.reboot_host("hv01")
    for _ in range(3):
        job = cluster.job(job_id)
    assert job.status is base.JobStatus.RUNNING
    assert job.progress == 90
    assert host_of(cluster, "hv01").state is base.HostState.REBOOTING
    assert cluster.find_job("reboot_host", "hv01") == job_id


def test_simulated_patcher_reports_kbs_and_reattaches(path: Path, clock: FakeClock) -> None:
    """The patcher's work is the reboot job: find() re-attaches to it while it runs and after
    it finished in the same maintenance window; poll() reports its KBs."""
    cluster = SimulatedCluster.create(path, drain_scenario(), speed=1.0, clock=clock)
    cluster.set_speed(0)
    run(cluster, cluster.enter_maintenance("hv01"))
    cluster.set_speed(1)
    patcher = SimulatedPatcher(cluster, patch_seconds=5)
    assert patcher.name == "simulated"
    ref = patcher.begin("hv01")
    assert patcher.find("hv01") == ref
    clock.tick(200)
    job = patcher.poll(ref)
    assert job.ok
    assert job.details["kbs"] == SimulatedPatcher(cluster).poll(ref).details["kbs"]
    assert job.details["kbs"].startswith("KB")
    assert patcher.find("hv01") == ref  # done in this maintenance window: never twice
    cluster.set_speed(0)
    run(cluster, cluster.exit_maintenance("hv01"))
    assert patcher.find("hv01") is None


# -- faults -------------------------------------------------------------------------------------


def test_job_fails_fault_fails_the_next_matching_job_without_effect(path: Path) -> None:
    """job_fails makes one matching job fail; nothing changes; the next one succeeds."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    cluster.inject({"type": "job_fails", "op": "move_vm", "target": HA1})
    assert run(cluster, cluster.move_vm(HA2, "hv02")).ok  # other target: not affected
    job = run(cluster, cluster.move_vm(HA1, "hv02"))
    assert job.status is base.JobStatus.FAILED
    assert "simulated" in job.message
    assert vm_of(cluster, HA1).host == "hv01"
    assert run(cluster, cluster.move_vm(HA1, "hv02")).ok


def test_job_hangs_fault_keeps_the_job_running(path: Path) -> None:
    """job_hangs leaves the job Running with its progress stuck, however often it is polled."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    cluster.inject({"type": "job_hangs", "op": "start_vm"})
    job_id = cluster.start_vm(OFF)
    first = cluster.job(job_id)
    assert cluster.job(job_id) == first
    assert first.status is base.JobStatus.RUNNING
    assert vm_of(cluster, OFF).state is base.PowerState.POWER_OFF


def test_migration_fails_fault_fails_the_drain_and_keeps_others_moved(path: Path) -> None:
    """A failed live migration fails the drain; moved VMs stay moved; no maintenance mode."""
    cluster = SimulatedCluster.create(
        path, {**drain_scenario(), "faults": [{"type": "migration_fails", "vm": HA2}]}
    )
    job = run(cluster, cluster.enter_maintenance("hv01"))
    assert job.status is base.JobStatus.FAILED
    assert HA2 in job.message
    assert vm_of(cluster, HA1).host == "hv03"
    assert vm_of(cluster, HA2).host == "hv01"
    assert not host_of(cluster, "hv01").maintenance
    assert cluster.counts().get(f"live_migrate:{HA2}") is None


def test_migration_fails_fault_fails_a_move(path: Path) -> None:
    """migration_fails also applies to move_vm, once."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    cluster.inject({"type": "migration_fails", "vm": HA1})
    assert run(cluster, cluster.move_vm(HA1, "hv02")).status is base.JobStatus.FAILED
    assert run(cluster, cluster.move_vm(HA1, "hv02")).ok


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ({"type": "delete_vm", "vm": OFF}, lambda inv: inv.vm(OFF) is None),
        ({"type": "move_vm", "vm": OFF, "to": "hv02"}, lambda inv: inv.vm(OFF).host == "hv02"),
        ({"type": "set_state", "vm": OFF, "state": "Running"}, lambda inv: inv.vm(OFF).uses_memory),
    ],
)
def test_side_effect_faults_fire_when_their_op_is_accepted(
    path: Path, fault: dict[str, Any], check: Any
) -> None:
    """delete_vm, move_vm and set_state act as "someone else" once an `on` request is accepted."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    cluster.inject({**fault, "on": "save_vm"})
    run(cluster, cluster.start_vm(SAVED))
    assert cluster.inventory("c1").vm(OFF) is not None
    cluster.save_vm(HA2)
    assert check(cluster.inventory("c1"))
    assert cluster.faults() == []


def test_transient_fault_raises_then_clears(path: Path) -> None:
    """transient raises TransientBackendError for the next N calls of its op, and does nothing."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    cluster.inject({"type": "transient", "op": "start_vm", "times": 2})
    for _ in range(2):
        with pytest.raises(errors.TransientBackendError, match="connection refused"):
            cluster.start_vm(OFF)
    cluster.inventory("c1")
    assert run(cluster, cluster.start_vm(OFF)).ok
    assert cluster.counts()["start_vm"] == 1


def test_transient_any_hits_every_backend_call(path: Path) -> None:
    """op "any" applies to whatever backend call comes next."""
    cluster = SimulatedCluster.create(path, {**drain_scenario(), "faults": [{"type": "transient"}]})
    with pytest.raises(errors.TransientBackendError):
        cluster.inventory("c1")
    assert cluster.inventory("c1").cluster == "c1"


def test_auth_fails_until_removed(path: Path) -> None:
    """auth_fails raises AuthenticationFailed on every backend call until cleared."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    cluster.inject({"type": "auth_fails"})
    for _ in range(3):
        with pytest.raises(errors.AuthenticationFailed):
            cluster.inventory("c1")
    cluster.clear_faults("auth_fails")
    assert cluster.inventory("c1").vm(HA1) is not None


def test_inject_validates_faults(path: Path) -> None:
    """inject() refuses an unknown fault type or key with UsageError."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    with pytest.raises(errors.UsageError, match="type"):
        cluster.inject({"type": "gremlins"})
    with pytest.raises(errors.UsageError, match="'host'"):
        cluster.inject({"type": "migration_fails", "vm": HA1, "host": "hv01"})


# -- admin and counts ---------------------------------------------------------------------------


def test_admin_operations_are_instant_and_counted_apart(path: Path) -> None:
    """admin_move/admin_delete/admin_set_state act at once and never count as requests."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    cluster.admin_move(HA1, "HV02")
    cluster.admin_delete(HA2)
    cluster.admin_set_state(OFF, base.PowerState.PAUSED)
    inv = cluster.inventory("c1")
    assert inv.vm(HA1).host == "hv02"  # type: ignore[union-attr]
    assert inv.vm(HA2) is None
    assert inv.vm(OFF).state is base.PowerState.PAUSED  # type: ignore[union-attr]
    counts = cluster.counts()
    assert counts[f"admin_move:{HA1}"] == counts[f"admin_delete:{HA2}"] == 1
    assert "move_vm" not in counts
    assert counts["inventory"] == 1


def test_state_is_shared_between_instances(path: Path) -> None:
    """A second SimulatedCluster on the same file sees the first one's jobs and counts."""
    first = SimulatedCluster.create(path, drain_scenario())
    job_id = first.move_vm(HA1, "hv02")
    second = SimulatedCluster(path)
    assert second.job(job_id).ok
    assert vm_of(first, HA1).host == "hv02"
    assert first.counts() == second.counts()


WORKER = textwrap.dedent(
    """
    import sys
    from workflows.backends import base
    from workflows.backends.simulated import SimulatedCluster

    cluster = SimulatedCluster(sys.argv[1])
    states = [base.PowerState.RUNNING, base.PowerState.PAUSED]
    for i in range(50):
        cluster.admin_set_state(sys.argv[2], states[i % 2])
        cluster.inventory("c1")
    """
)


@pytest.mark.slow
def test_two_processes_hammering_one_file_lose_no_update(path: Path) -> None:
    """Two processes doing 2x50 writes and reads on one file: every count survives, none lost."""
    SimulatedCluster.create(path, drain_scenario())
    root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(path), vm_id], cwd=root)
        for vm_id in (HA1, HA2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    counts = SimulatedCluster(path).counts()
    assert counts["admin_set_state"] == 100
    assert counts["inventory"] == 100
    assert counts[f"admin_set_state:{HA1}"] == counts[f"admin_set_state:{HA2}"] == 50
    assert not list(path.parent.glob("*.tmp"))


def test_a_corrupt_state_file_is_a_backend_error(path: Path) -> None:
    """A state file that is not JSON raises BackendError naming the file, not a decode error."""
    cluster = SimulatedCluster.create(path, drain_scenario())
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(errors.BackendError, match="corrupt"):
        cluster.inventory("c1")


def test_fault_kinds_are_one_model_each_and_agree_with_the_op_lists() -> None:
    """The fault models (a union told apart by `type`) name the same ops the simulator fires
    on, and normalise a fault: `times` filled in, a transient's `op` defaults to any."""
    from typing import get_args

    from workflows.backends import faultkinds

    job_ops = set(get_args(faultkinds.JobOp))
    assert job_ops == simfaults.JOB_OPS
    call_ops = {op for arg in get_args(faultkinds.CallOp) for op in get_args(arg)}
    assert call_ops == simfaults.CALL_OPS | {"any"}
    assert simfaults.validate_fault({"type": "transient"}) == {
        "type": "transient",
        "op": "any",
        "times": 1,
    }
    assert simfaults.validate_fault({"type": "auth_fails"})["times"] is None
    with pytest.raises(errors.UsageError, match=r"fault\.times: expected a positive integer"):
        simfaults.validate_fault({"type": "auth_fails", "times": True})
