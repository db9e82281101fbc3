"""FailoverBackend against the documented behaviour of a real failover cluster
(docs/windows-facts.md), played by the stand-in: the second hop refused, nodes that reboot or
are down, Paused VMs, Stop-VM's grace period, Move-ClusterVirtualMachineRole only on the node.
Each test failed on the code before issue 11."""

from __future__ import annotations

import pytest

from engine import errors
from tests.standin.fixtures import Rig, addresses, rig, standin_sim  # noqa: F401 - fixtures
from workflows.backends import base, failover

CLUSTER = "cluster1"


def backend(rig: Rig, **options: object) -> failover.FailoverBackend:  # noqa: F811
    return failover.FailoverBackend(
        rig.settings("hv01"),
        node_addresses=addresses(rig),
        **options,  # type: ignore[arg-type]
    )


def test_inventory_reads_each_node_in_its_own_session(rig: Rig) -> None:  # noqa: F811
    """No Get-VM / Get-VMHost -ComputerName from one node to the others (the second hop is
    refused without delegation): each node is read in its own session."""
    b = backend(rig)
    inv = b.inventory(CLUSTER)
    b.close()
    assert {v.id for v in inv.vms} == {v.id for v in rig.sim.inventory(CLUSTER).vms}
    reads = rig.commands("Get-VM") + rig.commands("Get-VMHost")
    assert all("ComputerName" not in c.params for c in reads)
    assert {c.computer for c in rig.commands("Get-VM")} == {"hv01", "hv02", "hv03"}


def test_an_unreachable_node_is_reported_down_and_the_rest_still_comes(rig: Rig) -> None:  # noqa: F811
    """A node whose session cannot be opened is that node down; the others are read."""
    rig.standin.set_down("hv03", True)
    b = backend(rig)
    inv = b.inventory(CLUSTER)
    b.close()
    assert inv.host("hv03").state is base.HostState.DOWN  # type: ignore[union-attr]
    assert inv.host("hv02").state is base.HostState.UP  # type: ignore[union-attr]
    assert inv.vms_on("hv02") and not inv.vms_on("hv03")


def test_the_cluster_session_leaves_the_node_in_maintenance(rig: Rig) -> None:  # noqa: F811
    """Configured on hv01, draining hv01 runs the cluster cmdlets on another node; while hv01
    reboots the backend keeps answering from the others."""
    b = backend(rig)
    job_id = b.enter_maintenance("hv01")
    assert b.job(job_id).ok
    rig.standin.set_down("hv01", True)
    inv = b.inventory(CLUSTER)
    rig.standin.set_down("hv01", False)
    b.close()
    (suspend,) = rig.commands("Suspend-ClusterNode")
    assert suspend.computer != "hv01"
    assert inv.host("hv01").state is base.HostState.DOWN  # type: ignore[union-attr]


def test_a_backend_started_while_its_server_reboots_uses_another_node(rig: Rig) -> None:  # noqa: F811
    """The configured node down from the start: the configured node_addresses are tried."""
    rig.standin.set_down("hv01", True)
    b = backend(rig)
    inv = b.inventory(CLUSTER)
    b.close()
    assert inv.host("hv02").state is base.HostState.UP  # type: ignore[union-attr]


def test_a_paused_vm_is_resumed_not_started(rig: Rig) -> None:  # noqa: F811
    """start_vm on a Paused VM sends Resume-VM (Start-VM refuses a paused VM)."""
    vm = next(v for v in rig.sim.inventory(CLUSTER).vms if v.state is base.PowerState.RUNNING)
    rig.sim.admin_set_state(vm.id, base.PowerState.PAUSED)
    b = backend(rig)
    job = b.job(b.start_vm(vm.id))
    b.close()
    assert job.ok, job
    assert rig.commands("Resume-VM") and not rig.commands("Start-VM")
    assert rig.sim.inventory(CLUSTER).vm(vm.id).state is base.PowerState.RUNNING  # type: ignore[union-attr]


def test_guest_shutdown_is_bounded_by_an_explicit_timeout(rig: Rig) -> None:  # noqa: F811
    """Stop-VM -Force waits for the guest: the wait is bounded by shutdown_timeout_s."""
    vm = next(v for v in rig.sim.inventory(CLUSTER).vms if v.state is base.PowerState.RUNNING)
    rig.sim.inject({"type": "job_hangs", "op": "shutdown_vm", "target": vm.id})
    b = backend(rig, shutdown_timeout_s=1.0)
    with pytest.raises(errors.BackendError, match="did not finish within 1 s"):
        b.shutdown_vm(vm.id)
    b.close()
    (script,) = rig.commands(failover.STOP_VM_SCRIPT)
    assert script.params["TimeoutSeconds"] == 1 and script.computer == vm.host


def test_move_runs_in_the_session_of_the_node_owning_the_vm(rig: Rig) -> None:  # noqa: F811
    """Move-ClusterVirtualMachineRole "cannot be run remotely without CredSSP": it runs in the
    session of the VM's own node."""
    vm = next(
        v
        for v in rig.sim.inventory(CLUSTER).vms
        if v.ha and v.state is base.PowerState.RUNNING and v.host != "hv01"
    )
    target = "hv01"
    b = backend(rig)
    assert b.job(b.move_vm(vm.id, target)).ok
    b.close()
    (move,) = rig.commands("Move-ClusterVirtualMachineRole")
    assert move.computer == vm.host


def test_nodes_are_addressed_by_fqdn_unless_configured(rig: Rig) -> None:  # noqa: F811
    """A node's address is its FQDN (<node>.<cluster Domain>) unless node_addresses names it."""
    b = backend(rig)
    inv = b.inventory(CLUSTER)
    b.close()
    assert inv.host("hv01").address == addresses(rig)["hv01"]  # type: ignore[union-attr]
    bare = failover.FailoverBackend(rig.settings("hv01"))
    bare._cluster_name()  # learns the Domain
    assert bare.address("hv02") == "hv02.corp.example"
    bare.close()
