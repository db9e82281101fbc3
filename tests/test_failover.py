"""FailoverBackend over the stand-in: the cluster cmdlets it sends and its synthetic jobs."""

from __future__ import annotations

import uuid

import pytest

from engine import errors
from tests.standin.fixtures import Rig, addresses, rig, standin_sim  # noqa: F401 - pytest fixtures
from workflows.backends import base, failover


def backend_for(rig: Rig) -> failover.FailoverBackend:  # noqa: F811
    return failover.FailoverBackend(rig.settings("hv01"), node_addresses=addresses(rig))


def test_drain_saves_non_ha_vms_then_suspends_with_drain(rig: Rig) -> None:  # noqa: F811
    """enter_maintenance saves running non-HA VMs, then Suspend-ClusterNode -Drain (no force)."""
    inv = rig.sim.inventory("cluster1")
    host = next(v.host for v in inv.vms if not v.ha and v.state is base.PowerState.RUNNING)
    backend = backend_for(rig)
    job_id = backend.enter_maintenance(host)
    job = backend.job(job_id)
    backend.close()
    assert job_id == f"fc:enter_maintenance:{host}" and job.ok
    assert rig.commands("Save-VM")
    (suspend,) = rig.commands("Suspend-ClusterNode")
    assert suspend.params == {"Name": host, "Drain": True}


def test_resume_never_fails_back(rig: Rig) -> None:  # noqa: F811
    """exit_maintenance resumes the node with -Failback NoFailback."""
    backend = backend_for(rig)
    backend.job(backend.enter_maintenance("hv02"))
    assert backend.job(backend.exit_maintenance("hv02")).ok
    backend.close()
    (resume,) = rig.commands("Resume-ClusterNode")
    assert resume.params == {"Name": "hv02", "Failback": "NoFailback"}


def test_move_is_a_live_cluster_role_move_by_vm_id(rig: Rig) -> None:  # noqa: F811
    """move_vm sends Move-ClusterVirtualMachineRole -VMId <guid> -Node -MigrationType Live."""
    vm = next(v for v in rig.sim.inventory("cluster1").vms if v.ha and v.state == "Running")
    target = "hv03" if vm.host != "hv03" else "hv02"
    backend = backend_for(rig)
    job_id = backend.move_vm(vm.id, target)
    assert backend.job(job_id).ok
    backend.close()
    (move,) = rig.commands("Move-ClusterVirtualMachineRole")
    assert move.params == {"VMId": uuid.UUID(vm.id), "Node": target, "MigrationType": "Live"}


def test_non_ha_vms_cannot_be_moved(rig: Rig) -> None:  # noqa: F811
    """Moving a non-clustered VM is refused with a clear BackendError, and nothing is sent."""
    vm = next(v for v in rig.sim.inventory("cluster1").vms if not v.ha)
    backend = backend_for(rig)
    with pytest.raises(errors.BackendError, match="not clustered"):
        backend.move_vm(vm.id, "hv02")
    backend.close()
    assert rig.commands("Move-ClusterVirtualMachineRole") == []


def test_a_failed_drain_is_a_failed_job(rig: Rig) -> None:  # noqa: F811
    """DrainStatus Failed makes the drain job Failed."""
    rig.sim.inject({"type": "job_fails", "op": "enter_maintenance", "target": "hv01"})
    backend = backend_for(rig)
    job = backend.job(backend.enter_maintenance("hv01"))
    backend.close()
    assert job.status is base.JobStatus.FAILED and "failed" in job.message


@pytest.mark.parametrize("job_id", ["drain:hv01", "fc:teleport:x", "fc"])
def test_malformed_job_ids_are_backend_errors(rig: Rig, job_id: str) -> None:  # noqa: F811
    """job() refuses IDs it did not make."""
    backend = backend_for(rig)
    with pytest.raises(errors.BackendError):
        backend.job(job_id)
    backend.close()
