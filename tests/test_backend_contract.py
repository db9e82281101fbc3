"""One contract for every ClusterBackend: the simulator in-process, VMM and Failover Clustering
over the WSMan stand-in (real pypsrp, real HTTP on 127.0.0.1). All three see the same world."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from engine import errors
from tests.standin.fixtures import Rig, addresses, rig, standin_sim  # noqa: F401 - pytest fixtures
from workflows.backends import base, failover, simulated, vmm

CLUSTER = "cluster1"


@pytest.fixture(params=["simulated", "vmm", "failover"])
def backend(request: pytest.FixtureRequest, rig: Rig) -> Iterator[Any]:  # noqa: F811
    """The backend under test, looking at `rig.sim`'s world."""
    if request.param == "simulated":
        made: Any = simulated.SimulatedCluster(rig.sim_path)
    elif request.param == "vmm":
        made = vmm.VmmBackend(rig.settings("vmm01"))
    else:
        made = failover.FailoverBackend(rig.settings("hv01"), node_addresses=addresses(rig))
    yield made
    made.close()


def wait(backend: Any, job_id: str, polls: int = 50) -> base.Job:
    job: base.Job = backend.job(job_id)
    for _ in range(polls):
        if job.done:
            return job
        job = backend.job(job_id)
    return job


def truth(rig: Rig) -> base.Inventory:  # noqa: F811
    return simulated.SimulatedCluster(rig.sim_path).inventory(CLUSTER)


def running_ha(inv: base.Inventory) -> base.Vm:
    return next(v for v in inv.vms if v.ha and v.state is base.PowerState.RUNNING)


def test_inventory_matches_the_simulated_world(backend: Any, rig: Rig) -> None:  # noqa: F811
    """inventory() reports the same hosts and VMs (IDs, hosts, HA, state, memory) as the sim."""
    inv = backend.inventory(CLUSTER)
    expected = truth(rig)
    assert inv.cluster == CLUSTER
    hosts = [dataclasses.replace(h, address="") for h in inv.hosts]  # FQDNs: only real backends
    assert sorted(hosts, key=lambda h: h.name) == sorted(expected.hosts, key=lambda h: h.name)
    assert sorted(inv.vms, key=lambda v: v.id) == sorted(expected.vms, key=lambda v: v.id)


def test_unknown_cluster_is_a_backend_error(backend: Any) -> None:
    """Asking for a cluster that does not exist raises BackendError."""
    with pytest.raises(errors.BackendError):
        backend.inventory("no-such-cluster")


def test_drain_moves_ha_vms_and_saves_non_ha(backend: Any, rig: Rig) -> None:  # noqa: F811
    """After enter_maintenance, the host is in maintenance and runs no VM at all."""
    before = backend.inventory(CLUSTER)
    job = wait(backend, backend.enter_maintenance("hv01"))
    assert job.ok, job
    after = backend.inventory(CLUSTER)
    assert after.host("hv01").maintenance  # type: ignore[union-attr]
    assert not [v for v in after.vms_on("hv01") if v.uses_memory]
    for vm in before.vms_on("hv01"):
        now = after.vm(vm.id)
        assert now is not None
        if vm.ha and vm.state is base.PowerState.RUNNING:
            assert now.host != "hv01" and now.state is base.PowerState.RUNNING
        elif not vm.ha and vm.state is base.PowerState.RUNNING:
            assert now.host == "hv01" and now.state is base.PowerState.SAVED


def test_exit_maintenance_moves_nothing_back(backend: Any) -> None:
    """exit_maintenance clears maintenance and leaves every VM where it is."""
    wait(backend, backend.enter_maintenance("hv02"))
    drained = backend.inventory(CLUSTER)
    job = wait(backend, backend.exit_maintenance("hv02"))
    assert job.ok, job
    after = backend.inventory(CLUSTER)
    assert not after.host("hv02").maintenance  # type: ignore[union-attr]
    assert {v.id: v.host for v in after.vms} == {v.id: v.host for v in drained.vms}


def test_move_vm_puts_the_vm_on_the_target(backend: Any) -> None:
    """move_vm moves a running HA VM to the named host and it keeps running."""
    vm = running_ha(backend.inventory(CLUSTER))
    target = "hv03" if vm.host != "hv03" else "hv02"
    job = wait(backend, backend.move_vm(vm.id, target))
    assert job.ok, job
    moved = backend.inventory(CLUSTER).vm(vm.id)
    assert moved is not None and moved.host == target and moved.state is base.PowerState.RUNNING


@pytest.mark.parametrize(
    ("op", "state"),
    [
        ("save_vm", base.PowerState.SAVED),
        ("shutdown_vm", base.PowerState.POWER_OFF),
    ],
)
def test_power_operations_change_the_state(backend: Any, op: str, state: base.PowerState) -> None:
    """save_vm / shutdown_vm change the VM's state, and start_vm brings it back to Running."""
    vm = running_ha(backend.inventory(CLUSTER))
    assert wait(backend, getattr(backend, op)(vm.id)).ok
    assert backend.inventory(CLUSTER).vm(vm.id).state is state  # type: ignore[union-attr]
    assert wait(backend, backend.start_vm(vm.id)).ok
    assert backend.inventory(CLUSTER).vm(vm.id).state is base.PowerState.RUNNING  # type: ignore[union-attr]


def test_a_hanging_job_stays_running_and_can_be_found(backend: Any, rig: Rig) -> None:  # noqa: F811
    """A job that never ends reports Running below 100 % and find_job re-attaches to it."""
    rig.sim.inject({"type": "job_hangs", "op": "enter_maintenance", "target": "hv01"})
    job_id = backend.enter_maintenance("hv01")
    job = wait(backend, job_id, polls=3)
    assert job.status is base.JobStatus.RUNNING and job.progress < 100
    assert backend.find_job("enter_maintenance", "hv01") == job_id
    assert backend.find_job("enter_maintenance", "hv02") is None


def test_a_failing_job_reports_failed(backend: Any, rig: Rig) -> None:  # noqa: F811
    """A job the cluster fails ends done, not ok."""
    rig.sim.inject({"type": "job_fails", "op": "enter_maintenance", "target": "hv01"})
    job = wait(backend, backend.enter_maintenance("hv01"))
    assert job.done and not job.ok


def test_unknown_vm_is_a_backend_error(backend: Any) -> None:
    """Operations on a VM ID nobody knows raise BackendError."""
    with pytest.raises(errors.BackendError):
        backend.start_vm(str(uuid.uuid4()))


def test_unknown_job_is_a_backend_error(backend: Any) -> None:
    """job() on an unknown ID raises BackendError."""
    with pytest.raises(errors.BackendError):
        backend.job(str(uuid.uuid4()))


def test_connection_trouble_is_transient_and_recovers(backend: Any, rig: Rig) -> None:  # noqa: F811
    """A dropped connection is TransientBackendError, and the next call works again (the
    failover backend first tries the other nodes of the cluster: all three drop)."""
    times = 3 if isinstance(backend, failover.FailoverBackend) else 1
    rig.sim.inject({"type": "transient", "op": "enter_maintenance", "times": times})
    with pytest.raises(errors.TransientBackendError):
        backend.enter_maintenance("hv01")
    assert wait(backend, backend.enter_maintenance("hv01")).ok


def test_refused_credentials_are_authentication_failed(backend: Any, rig: Rig) -> None:  # noqa: F811
    """Refused credentials raise AuthenticationFailed, a permanent BackendError."""
    rig.sim.inject({"type": "auth_fails"})
    with pytest.raises(errors.AuthenticationFailed):
        backend.enter_maintenance("hv01")
    assert not isinstance(errors.AuthenticationFailed("x"), errors.TransientError)
