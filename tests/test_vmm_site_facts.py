"""VmmBackend against the documented behaviour of a real VMM (docs/windows-facts.md), each fact
played by the stand-in independently of the product's own tables. Each test failed on the code
before issue 11."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import errors
from tests.standin.fixtures import Rig, rig, standin_sim  # noqa: F401 - pytest fixtures
from tests.test_vmm_e2e import placement, run, vmm_cli, vmm_rig  # noqa: F401 - fixture
from workflows import plan as planning
from workflows.backends import base, vmm

CLUSTER = "cluster1"


def backend(rig: Rig, **options: object) -> vmm.VmmBackend:  # noqa: F811
    return vmm.VmmBackend(rig.settings("vmm01"), **options)  # type: ignore[arg-type]


def first(inv: base.Inventory, *, ha: bool, state: base.PowerState) -> base.Vm:
    return next(v for v in inv.vms if v.ha is ha and v.state is state)


def test_save_is_stop_scvirtualmachine_savestate(rig: Rig) -> None:  # noqa: F811
    """save_vm sends Stop-SCVirtualMachine -SaveState, never Save-SCVirtualMachine (library)
    nor the undocumented SaveState-SCVirtualMachine."""
    vm = first(rig.sim.inventory(CLUSTER), ha=True, state=base.PowerState.RUNNING)
    b = backend(rig)
    job = b.job(b.save_vm(vm.id))
    b.close()
    assert job.ok, job
    (stop,) = rig.commands("Stop-SCVirtualMachine")
    assert stop.params["SaveState"] is True
    assert not rig.commands("Save-SCVirtualMachine")
    assert not rig.commands("SaveState-SCVirtualMachine")
    assert rig.sim.inventory(CLUSTER).vm(vm.id).state is base.PowerState.SAVED  # type: ignore[union-attr]


@pytest.mark.parametrize("status", ["UpdateFailed", "MigrationFailed", "HostNotResponding"])
def test_non_power_status_is_not_safe_to_touch_and_preflight_names_it(
    rig: Rig,  # noqa: F811
    status: str,
) -> None:
    """Power comes from VirtualMachineState; a non-power Status marks the VM not safe to touch,
    and the plan refuses naming it."""
    inv = rig.sim.inventory(CLUSTER)
    vm = first(inv, ha=True, state=base.PowerState.RUNNING)
    off = first(inv, ha=True, state=base.PowerState.POWER_OFF)
    rig.world.vm_status[vm.id] = status
    rig.world.vm_status[off.id] = status
    b = backend(rig)
    seen = b.inventory(CLUSTER)
    b.close()
    assert seen.vm(off.id).state is base.PowerState.POWER_OFF  # type: ignore[union-attr]
    assert status in seen.vm(vm.id).problem  # type: ignore[union-attr]
    result = planning.make_plan(seen, vm.host, planning.Policies())
    assert any(vm.name in p and status in p for p in result.problems), result.problems


def test_memory_counts_the_larger_of_startup_and_assigned(rig: Rig) -> None:  # noqa: F811
    """`Memory` is the startup memory: a VM holding more is counted for what it holds, and for
    its Dynamic Memory maximum when `dynamic_memory: maximum` is configured."""
    vm = first(rig.sim.inventory(CLUSTER), ha=True, state=base.PowerState.RUNNING)
    rig.world.vm_memory[vm.id] = {"startup": 512, "assigned": 6144, "maximum": 16384}
    assigned, maximum = backend(rig), backend(rig, dynamic_memory="maximum")
    assert assigned.inventory(CLUSTER).vm(vm.id).memory_mb == 6144  # type: ignore[union-attr]
    assert maximum.inventory(CLUSTER).vm(vm.id).memory_mb == 16384  # type: ignore[union-attr]
    assigned.close()
    maximum.close()


def test_host_capacity_leaves_out_the_memory_reserve(rig: Rig) -> None:  # noqa: F811
    """MemoryReserveMB is never used by VMM placement: free memory leaves it out."""
    truth = rig.sim.inventory(CLUSTER)
    rig.world.memory_reserve_mb = 768
    b = backend(rig)
    seen = b.inventory(CLUSTER)
    b.close()
    for host in truth.hosts:
        assert seen.free_memory_mb(host.name) == truth.free_memory_mb(host.name) - 768


@pytest.mark.parametrize("name", ["cluster1", "CLUSTER1.corp.example"])
def test_clusters_are_found_by_short_name_or_fqdn(rig: Rig, name: str) -> None:  # noqa: F811
    """VMM names host clusters by FQDN; the short name and the FQDN both find it."""
    b = backend(rig)
    inv = b.inventory(name)
    b.close()
    assert inv.cluster == name and len(inv.hosts) == 3


def test_error_info_as_a_string_still_explains_a_failure(rig: Rig) -> None:  # noqa: F811
    """At default depth ErrorInfo is "VmmError (10000)": the problem text is fetched with
    -ExpandProperty ErrorInfo; a success ("Success (0)") adds nothing to the message."""
    rig.sim.inject({"type": "job_fails", "op": "enter_maintenance", "target": "hv01"})
    b = backend(rig)
    failed = b.job(b.enter_maintenance("hv01"))
    ok = b.job(b.enter_maintenance("hv02"))
    b.close()
    assert "simulated fault" in failed.message and "Retry" in failed.message
    assert ok.ok and "Success" not in ok.message
    expands = [c for c in rig.commands("Select-Object") if "ExpandProperty" in c.params]
    assert expands and all(c.params["ExpandProperty"] == "ErrorInfo" for c in expands)


@pytest.mark.parametrize("kind", ["move_vm", "save_vm"])
def test_reattach_finds_the_job_by_cmdlet_and_target_not_by_name(
    rig: Rig,  # noqa: F811
    kind: str,
) -> None:
    """find_job re-attaches to a hanging job through the VM's MostRecentTaskID / the job's
    CmdletName and ResultObjectID; the stand-in's job names are its own."""
    inv = rig.sim.inventory(CLUSTER)
    vm = first(inv, ha=True, state=base.PowerState.RUNNING)
    other = next(v for v in inv.vms if v.ha and v.id != vm.id)
    rig.sim.inject({"type": "job_hangs", "op": kind, "target": vm.id})
    b = backend(rig)
    target = "hv03" if vm.host != "hv03" else "hv02"
    job_id = b.move_vm(vm.id, target) if kind == "move_vm" else b.save_vm(vm.id)
    found = b.find_job(kind, vm.id)
    missing = b.find_job(kind, other.id)
    b.close()
    assert found == job_id
    assert missing is None


def test_hosts_in_maintenance_reattach_by_host_id(rig: Rig) -> None:  # noqa: F811
    """A hanging Disable-SCVMHost is found through its CmdletName and the host's ID."""
    rig.sim.inject({"type": "job_hangs", "op": "enter_maintenance", "target": "hv02"})
    b = backend(rig)
    job_id = b.enter_maintenance("hv02")
    assert b.find_job("enter_maintenance", "hv02") == job_id
    assert b.find_job("exit_maintenance", "hv02") is None
    b.close()


def test_non_ha_move_passes_the_target_hosts_default_path(rig: Rig) -> None:  # noqa: F811
    """A VM on local storage needs -Path: the target host's first VMPaths, or the configured
    vm_path."""
    vm = first(rig.sim.inventory(CLUSTER), ha=False, state=base.PowerState.RUNNING)
    target = "hv03" if vm.host != "hv03" else "hv02"
    rig.world.vm_paths[target] = ["D:\\VMs"]
    b = backend(rig)
    assert b.job(b.move_vm(vm.id, target)).ok
    configured = backend(rig, vm_path="E:\\Hyper-V")
    assert configured.job(configured.move_vm(vm.id, vm.host)).ok
    b.close()
    configured.close()
    paths = [c.params.get("Path") for c in rig.commands(vmm.MOVE_VM_SCRIPT)]
    assert paths == ["D:\\VMs", "E:\\Hyper-V"]


def test_non_ha_move_without_a_known_path_is_refused_up_front(rig: Rig) -> None:  # noqa: F811
    """No VMPaths and no vm_path: the plan refuses naming the VM, and move_vm refuses too."""
    rig.world.default_vm_paths = []
    vm = first(rig.sim.inventory(CLUSTER), ha=False, state=base.PowerState.RUNNING)
    b = backend(rig)
    inv = b.inventory(CLUSTER)
    policies = planning.Policies(planning.NonHaPolicy.MIGRATE)
    result = planning.make_plan(inv, vm.host, policies)
    with pytest.raises(errors.BackendError, match=vm.name):
        b.move_vm(vm.id, "hv03" if vm.host != "hv03" else "hv02")
    b.close()
    assert any(vm.name in p and "path" in p for p in result.problems), result.problems
    assert not rig.commands(vmm.MOVE_VM_SCRIPT)


def test_designated_maintenance_host_is_not_in_maintenance(rig: Rig) -> None:  # noqa: F811
    """MaintenanceHost (obsolete) marks a designated maintenance host, not maintenance mode."""
    rig.world.designated_maintenance_hosts = {"hv02"}
    b = backend(rig)
    host = b.inventory(CLUSTER).host("hv02")
    b.close()
    assert host is not None and not host.maintenance and host.available_for_placement


def test_an_ha_vm_vmm_saved_instead_of_migrating_fails_the_drain(
    tmp_path: Path,
    db_url: str,
    vmm_rig: Rig,  # noqa: F811
) -> None:
    """VMM saved an HA VM it was to live-migrate and still finished the drain: the run fails
    in Draining naming that VM, instead of reporting it later as changed by someone else."""
    inv = vmm_rig.sim.inventory(CLUSTER)
    vm = next(v for v in inv.vms_on("hv01") if v.ha and v.state is base.PowerState.RUNNING)
    vmm_rig.world.save_instead_of_migrate = {vm.id}
    cli = vmm_cli(tmp_path, db_url, vmm_rig)
    result = run(cli, "start", "--cluster", CLUSTER, "--node", "hv01", "--json")
    assert result.code == 1, result.err  # type: ignore[attr-defined]
    out = result.json()  # type: ignore[attr-defined]
    assert out["state"] == "Failed"
    assert vm.name in str(out["error"]) and "live-migrate" in str(out["error"])
    assert placement(vmm_rig.sim)[vm.id] == ("hv01", "Saved")
