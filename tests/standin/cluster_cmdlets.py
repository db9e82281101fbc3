"""FailoverClusters and Hyper-V cmdlets answered from the SimulatedCluster.

`Suspend-ClusterNode -Drain` returns at once (the drain runs as a simulator job, visible as the
node's `DrainStatus`); `Resume-ClusterNode`, `Move-ClusterVirtualMachineRole`, `Start-VM`,
`Resume-VM`, `Save-VM` and `Stop-VM` block until the simulator's job ends, as the real cmdlets
do. Documented behaviour the stand-in plays (windows-review.md):
- the second hop: from a session on one node, `Get-VM`/`Get-VMHost -ComputerName <another
  node>`, a Hyper-V cmdlet on a VM of another node and `Move-ClusterVirtualMachineRole` for a VM
  another node owns are refused (access denied) unless `World.delegation` is on;
- `Start-VM` refuses a Paused VM (that is `Resume-VM`'s job);
- `Get-Cluster` gives the cluster's short `Name` and its `Domain`; node names are short.
"""

from __future__ import annotations

from typing import Any

from tests.standin import dispatch
from tests.standin.world import (
    DOMAIN,
    ClusterNodeState,
    NodeDrainStatus,
    VMState,
    World,
    guid,
    memory_bytes,
)
from workflows.backends import base, failover

NODE_TYPE = "Microsoft.FailoverClusters.PowerShell.ClusterNode"
VM_TYPE = "Microsoft.HyperV.PowerShell.VirtualMachine"
HYPERV_STATES = {"Running": VMState.Running, "PowerOff": VMState.Off, "Saved": VMState.Saved}


class ClusterCmdlets:
    def __init__(self, world: World) -> None:
        self.w = world

    def scripts(self) -> dict[str, dispatch.Handler]:
        return {
            failover.STOP_VM_SCRIPT: self.stop_script,
            failover.STORAGE_SCRIPT: self.storage_script,
        }

    def storage_script(self, inv: dispatch.Invocation) -> list[Any]:
        """failover.STORAGE_SCRIPT from World.s2d / storage_repair_polls / unhealthy_disks."""
        jobs: list[str] = []
        if self.w.storage_repair_polls > 0:
            self.w.storage_repair_polls -= 1
            jobs = ["Repair"]
        disks = list(self.w.unhealthy_disks) if jobs else []
        return [{"Enabled": self.w.s2d, "RunningJobs": jobs, "UnhealthyDisks": disks}]

    def handlers(self) -> dict[str, dispatch.Handler]:
        return {
            "Get-Cluster": self.get_cluster,
            "Get-CauRun": self.get_cau_run,
            "Get-ClusterNode": self.get_node,
            "Suspend-ClusterNode": self.suspend,
            "Resume-ClusterNode": self.resume,
            "Get-VMHost": self.get_vmhost,
            "Get-VM": self.get_vm,
            "Start-VM": self.power("start_vm"),
            "Resume-VM": self.power("resume"),
            "Save-VM": self.power("save_vm"),
            "Stop-VM": self.power("shutdown_vm"),
            "Move-ClusterVirtualMachineRole": self.move,
        }

    def _cluster_of(self, computer: str) -> str:
        found = self.w.find_host(computer)
        return found[0] if found else self.w.snapshot()["clusters"][0]["name"]

    def get_cluster(self, inv: dispatch.Invocation) -> list[Any]:
        name = self._cluster_of(inv.ctx.computer)
        cluster_type = "Microsoft.FailoverClusters.PowerShell.Cluster"
        return [{"__type__": cluster_type, "Name": name, "Domain": DOMAIN}]

    def get_cau_run(self, inv: dispatch.Invocation) -> list[Any]:
        """`RunNotInProgress` when no Updating Run is in progress, else the run's status."""
        del inv
        if self.w.cau_run is None:
            return ["RunNotInProgress"]
        return [{"__type__": "Microsoft.ClusterAwareUpdating.CauRun", **self.w.cau_run}]

    def _second_hop(self, inv: dispatch.Invocation, computer: str) -> bool:
        """True (and an access-denied error written) when computer is not this session's."""
        if self.w.delegation or computer.split(".", 1)[0].lower() == _here(inv):
            return False
        inv.error(
            "You do not have the required permission to complete this task. Contact the "
            f"administrator of the authorization policy for the computer '{computer}'.",
            "PermissionDenied",
            computer,
        )
        return True

    def node_obj(self, h: dict[str, Any]) -> dict[str, Any]:
        drain_job = self.w.drains.get(h["name"].lower())
        drain = NodeDrainStatus.Completed if h["maintenance"] else NodeDrainStatus.NotInitiated
        if drain_job is not None:
            job = self.w.call(lambda: self.w.sim.job(drain_job), "Get-ClusterNode")
            drain = NodeDrainStatus.InProgress
            if job.done:
                drain = NodeDrainStatus.Completed if job.ok else NodeDrainStatus.Failed
        state = ClusterNodeState.Up
        if h["state"] != "Up":
            state = ClusterNodeState.Down
        elif h["maintenance"] or drain_job is not None:
            state = ClusterNodeState.Paused
        return {
            "__type__": NODE_TYPE,
            "Name": h["name"],
            "State": state,
            "DrainStatus": drain,
            "Id": h["name"],
        }

    def get_node(self, inv: dispatch.Invocation) -> list[Any]:
        cluster = self._cluster_of(inv.ctx.computer)
        name = inv.get("Name")
        hosts = [h for c, h in self.w.hosts() if c == cluster]
        if name is not None:
            hosts = [h for h in hosts if h["name"].lower() == str(name).lower()]
            if not hosts:
                inv.error(f"The node '{name}' does not exist", "ObjectNotFound", str(name))
        return [self.node_obj(h) for h in hosts]

    def suspend(self, inv: dispatch.Invocation) -> list[Any]:
        if not inv.has("Drain"):
            raise dispatch.Terminating("stand-in supports only Suspend-ClusterNode -Drain")
        name = str(inv.get("Name"))
        job_id = self.w.call(lambda: self.w.sim.enter_maintenance(name), inv.name)
        self.w.drains[name.lower()] = job_id
        return []

    def resume(self, inv: dispatch.Invocation) -> list[Any]:
        name = str(inv.get("Name"))
        job_id = self.w.call(lambda: self.w.sim.exit_maintenance(name), inv.name)
        self.w.drains.pop(name.lower(), None)
        self.w.wait(job_id, inv.name)
        return []

    def get_vmhost(self, inv: dispatch.Invocation) -> list[Any]:
        names = {n for n in _names(inv.get("ComputerName") or inv.ctx.computer)}
        names = {n for n in names if not self._second_hop(inv, n)}
        return [
            {
                "__type__": "Microsoft.HyperV.PowerShell.VMHost",
                "ComputerName": h["name"],
                "MemoryCapacity": memory_bytes(h["memory_mb"]),
            }
            for _, h in self.w.hosts()
            if h["name"].lower() in names
        ]

    def get_vm(self, inv: dispatch.Invocation) -> list[Any]:
        names = _names(inv.get("ComputerName") or inv.ctx.computer)
        names = {n for n in names if not self._second_hop(inv, n)}
        vms = [v for v in self.w.snapshot()["vms"] if v["host"].lower() in names]
        if inv.has("Id"):
            vms = [v for v in vms if v["id"] == str(inv.get("Id"))]
            if not vms:
                inv.error(
                    f"Hyper-V was unable to find a virtual machine with id '{inv.get('Id')}'.",
                    "InvalidArgument",
                    str(inv.get("Id")),
                )
        return [_vm_obj(v) for v in vms]

    def power(self, kind: str) -> dispatch.Handler:
        def handler(inv: dispatch.Invocation) -> list[Any]:
            for vm in [o for o in inv.input if isinstance(o, dict)]:
                if self._second_hop(inv, str(vm["ComputerName"])):
                    continue
                self._power_one(inv, kind, vm, 30.0)
            return []

        return handler

    def _power_one(
        self, inv: dispatch.Invocation, kind: str, vm: dict[str, Any], timeout: float
    ) -> None:
        vm_id = str(vm["VMId"])
        paused = vm["State"] is VMState.Paused
        if kind == "start_vm" and paused:
            raise dispatch.Terminating(
                f"'{vm['Name']}' failed to start: the virtual machine is paused (use Resume-VM)",
                "InvalidOperation",
                command=inv.name,
            )
        if kind == "resume" and not paused:
            raise dispatch.Terminating(f"'{vm['Name']}' is not paused", "InvalidOperation")
        op = getattr(self.w.sim, "start_vm" if kind == "resume" else kind)
        job_id = self.w.call(lambda i=vm_id, op=op: op(i), inv.name)
        self.w.wait(job_id, inv.name, timeout=timeout)

    def stop_script(self, inv: dispatch.Invocation) -> list[Any]:
        """failover.STOP_VM_SCRIPT: Stop-VM -Force -AsJob, Wait-Job -Timeout."""
        vm_id, timeout = str(inv.get("VMId")), float(inv.get("TimeoutSeconds"))
        found = [v for v in self.w.snapshot()["vms"] if v["id"] == vm_id]
        if not found or found[0]["host"].lower() != _here(inv):
            raise dispatch.Terminating(f"no VM {vm_id} on this node", "ObjectNotFound")
        vm = _vm_obj(found[0])
        try:
            self._power_one(inv, "shutdown_vm", vm, timeout)
        except dispatch.Terminating as exc:
            if exc.category != "OperationTimeout":
                raise
            raise dispatch.Terminating(
                f"the guest shutdown of {vm['Name']} did not finish within {timeout:.0f} s",
                "OperationTimeout",
            ) from None
        return []

    def move(self, inv: dispatch.Invocation) -> list[Any]:
        vm_id, node = str(inv.get("VMId")), str(inv.get("Node"))
        vm = self.w.find_vm(vm_id)
        if vm is None or not vm["ha"]:
            raise dispatch.Terminating(f"no clustered role for VM {vm_id}", "ObjectNotFound")
        if not self.w.delegation and vm["host"].lower() != _here(inv):
            raise dispatch.Terminating(
                "Move-ClusterVirtualMachineRole cannot be run remotely without CredSSP: "
                "access is denied",
                "PermissionDenied",
                command=inv.name,
            )
        job_id = self.w.call(lambda: self.w.sim.move_vm(vm_id, node), inv.name)
        self.w.wait(job_id, inv.name)
        return []


def _here(inv: dispatch.Invocation) -> str:
    return inv.ctx.computer.split(".", 1)[0].lower()


def _names(value: Any) -> set[str]:
    items = value if isinstance(value, list) else [value]
    return {str(i).split(".", 1)[0].lower() for i in items}


def _vm_obj(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "__type__": VM_TYPE,
        "VMId": guid(v["id"]),
        "Id": guid(v["id"]),
        "Name": v["name"],
        "ComputerName": v["host"],
        "State": HYPERV_STATES.get(
            v["state"], VMState.Paused if v["state"] == base.PowerState.PAUSED else VMState.Other
        ),
        "IsClustered": v["ha"],
        "MemoryStartup": memory_bytes(v["memory_mb"]),
    }
