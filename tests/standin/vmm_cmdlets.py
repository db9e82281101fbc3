"""VMM cmdlets (module virtualmachinemanager) answered from the SimulatedCluster.

Semantics follow windows-side.md §4.1 and windows-review.md, independently of the product's own
tables: `-VMHost`/`-VM` take objects (here: from the pipeline), `Disable-SCVMHost
-MoveWithinCluster` drains (a VM in `World.save_instead_of_migrate` is saved by VMM instead of
live-migrated), `-RunAsynchronously -JobVariable v` stores the Task in the runspace's variables.
A Task has the stand-in's own job names (`TASK_NAMES`, deliberately not the product's), the
`CmdletName` that started it and the `ResultObjectID` it acts on; a VM's `MostRecentTaskID` is
its newest Task. `ErrorInfo` is an object whose ToString is "Success (0)": at default
serialization depth (`Select-Object ErrorInfo`) only that string arrives; `Select-Object
-ExpandProperty ErrorInfo` sends the object. VM `Status` may be a non-power value
(`World.vm_status`), power is `VirtualMachineState`; `Memory` is the startup memory,
`MemoryAssignedMB` what a running VM holds (`World.vm_memory`). Host clusters are named by FQDN
and `-Name` matches exactly. `Stop-SCVirtualMachine -SaveState` saves; `Save-SCVirtualMachine`
would store the VM in the library and fails loudly; `SaveState-SCVirtualMachine` does not exist.
Lookups of unknown objects return nothing, as VMM's Get-* cmdlets do.
"""

from __future__ import annotations

from typing import Any

from tests.standin import dispatch
from tests.standin.world import (
    CommunicationState,
    HostOverallState,
    VirtualMachineState,
    VMComputerSystemState,
    World,
    fqdn,
    guid,
    memory_bytes,
    stable_guid,
)
from workflows.backends import base, vmm

# The stand-in's own job names, unrelated to anything in workflows/ (re-attach must not use them).
TASK_NAMES = {
    "enter_maintenance": "Put virtual machine host in maintenance mode",
    "exit_maintenance": "Remove virtual machine host from maintenance mode",
    "move_vm": "Migrate VM",
    "start_vm": "Power on VM",
    "save_vm": "Save state of VM",
    "shutdown_vm": "Shut down VM",
}
ERROR_INFO_TYPE = "Microsoft.VirtualManager.Utils.ErrorInfo"

VM_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.VM"
HOST_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.Host"
CLUSTER_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.HostCluster"
TASK_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.Task"


def host_obj(cluster: str, h: dict[str, Any], world: World) -> dict[str, Any]:
    up = h["state"] == "Up"
    overall = HostOverallState.OK
    if not up:
        overall = HostOverallState.NotResponding
    elif h["maintenance"]:
        overall = HostOverallState.MaintenanceMode
    return {
        "__type__": HOST_TYPE,
        "ID": stable_guid(h["name"]),
        "Name": fqdn(h["name"]),
        "ComputerName": h["name"],
        "FullyQualifiedDomainName": fqdn(h["name"]),
        "HostCluster": fqdn(cluster),
        "OverallState": overall,
        "CommunicationState": CommunicationState.Responding
        if up
        else CommunicationState.NotResponding,
        "AvailableForPlacement": up and not h["maintenance"],
        "MaintenanceHost": h["name"].lower() in world.designated_maintenance_hosts,
        "TotalMemory": memory_bytes(h["memory_mb"]),
        "AvailableMemory": world.available_memory_mb(h["name"], h["memory_mb"]),
        "MemoryReserveMB": world.memory_reserve_mb,
        "VMPaths": list(world.vm_paths.get(h["name"].lower(), world.default_vm_paths)),
    }


def vm_obj(v: dict[str, Any], world: World) -> dict[str, Any]:
    memory = world.memory_of(v)
    status = world.vm_status.get(v["id"], v["state"])
    return {
        "__type__": VM_TYPE,
        "ID": guid(v["id"]),
        "Name": v["name"],
        "HostName": fqdn(v["host"]),
        "VMHost": fqdn(v["host"]),
        "Status": VMComputerSystemState[status],
        "StatusString": status,
        "VirtualMachineState": VirtualMachineState[v["state"]],
        "IsHighlyAvailable": v["ha"],
        "Memory": memory["startup"],
        "MemoryAssignedMB": memory["assigned"],
        "DynamicMemoryEnabled": memory["maximum"] is not None,
        "DynamicMemoryMaximumMB": memory["maximum"] or memory["startup"],
        "MostRecentTaskID": world.most_recent_task(v["id"]),
    }


class VmmCmdlets:
    def __init__(self, world: World) -> None:
        self.w = world

    def handlers(self) -> dict[str, dispatch.Handler]:
        return {
            "Get-SCVMMServer": lambda inv: [{"__type__": "ServerConnection", "Name": "vmm"}],
            "Get-SCVMHostCluster": self.get_cluster,
            "Get-SCVMHost": self.get_host,
            "Get-SCVirtualMachine": self.get_vm,
            "Disable-SCVMHost": self.host_job("enter_maintenance"),
            "Enable-SCVMHost": self.host_job("exit_maintenance"),
            "Start-SCVirtualMachine": self.vm_job("start_vm"),
            "Resume-SCVirtualMachine": self.vm_job("start_vm"),
            "Stop-SCVirtualMachine": self.vm_job("stop"),
            "Save-SCVirtualMachine": self.save_to_library,
            "Get-SCJob": self.get_job,
            "Get-Variable": self.get_variable,
            "Get-Command": self.get_command,
        }

    def scripts(self) -> dict[str, dispatch.Handler]:
        return {vmm.MOVE_VM_SCRIPT: self.move_script}

    # -- reads -------------------------------------------------------------------------------

    def get_cluster(self, inv: dispatch.Invocation) -> list[Any]:
        """Clusters are named by FQDN in VMM; -Name matches the whole name only."""
        name, by_id = inv.get("Name"), inv.get("ID")
        return [
            {"__type__": CLUSTER_TYPE, "Name": fqdn(c["name"]), "ID": stable_guid(c["name"])}
            for c in self.w.snapshot()["clusters"]
            if (name is None or fqdn(c["name"]).lower() == str(name).lower())
            and (by_id is None or str(stable_guid(c["name"])) == str(by_id))
        ]

    def get_host(self, inv: dispatch.Invocation) -> list[Any]:
        hosts = self.w.hosts()
        name = inv.get("ComputerName")
        if name is not None:
            found = self.w.find_host(str(name))
            return [host_obj(*found, self.w)] if found else []
        clusters = {str(c["Name"]).lower() for c in inv.input if isinstance(c, dict)}
        return [
            host_obj(c, h, self.w) for c, h in hosts if not clusters or fqdn(c).lower() in clusters
        ]

    def get_vm(self, inv: dispatch.Invocation) -> list[Any]:
        vms = self.w.snapshot()["vms"]
        if inv.has("ID"):
            return [vm_obj(v, self.w) for v in vms if v["id"] == str(inv.get("ID"))]
        hosts = {str(h["ComputerName"]).lower() for h in inv.input if isinstance(h, dict)}
        return [vm_obj(v, self.w) for v in vms if not inv.input or v["host"].lower() in hosts]

    def get_job(self, inv: dispatch.Invocation) -> list[Any]:
        if inv.has("ID"):
            ids = [str(inv.get("ID"))]
        elif inv.has("Running"):
            ids = list(self.w.jobs)
        else:
            newest = int(inv.get("Newest") or 10)
            ids = list(self.w.jobs)[-newest:]
        tasks = [self.task(i) for i in ids if i in self.w.jobs]
        if inv.has("Running"):
            tasks = [t for t in tasks if t["Status"] in ("Running", "NotStarted")]
        return tasks

    def task(self, job_id: str) -> dict[str, Any]:
        record = self.w.jobs[job_id]
        job = self.w.call(lambda: self.w.sim.job(job_id), "Get-SCJob")
        code, problem = 0, ""
        if job.status is base.JobStatus.FAILED:
            code, problem = 10000, job.message
        elif job.status is base.JobStatus.SUCCEED_WITH_INFO:
            problem = job.message
        error_info = {
            "__type__": ERROR_INFO_TYPE,
            "__tostring__": f"{'Success' if code == 0 else 'VmmError'} ({code})",
            "DisplayableErrorCode": code,
            "Problem": problem,
            "RecommendedAction": "Retry the operation." if code else "",
        }
        return {
            "__type__": TASK_TYPE,
            "ID": guid(job_id),
            "Name": TASK_NAMES[record.kind],
            "CmdletName": record.cmdlet,
            "Status": job.status.value,
            "Progress": f"{job.progress} %",
            "ErrorInfo": error_info,
            "ResultName": record.result_name,
            "ResultObjectID": guid(record.target_id),
        }

    def get_variable(self, inv: dispatch.Invocation) -> list[Any]:
        name = str(inv.get("Name"))
        if name not in inv.ctx.variables:
            inv.error(f"Cannot find a variable with the name '{name}'.", "ObjectNotFound", name)
            return []
        value = inv.ctx.variables[name]
        return [value] if inv.has("ValueOnly") else [{"Name": name, "Value": value}]

    def get_command(self, inv: dispatch.Invocation) -> list[Any]:
        name = str(inv.get("Name") or (inv.get("__args__") or [""])[0])
        if not self.w.vmm_module and name.lower().endswith("-scvmhost"):
            inv.error(f"The term '{name}' is not recognized", "ObjectNotFound", name)
            return []
        return [{"__type__": "System.Management.Automation.CmdletInfo", "Name": name}]

    # -- jobs --------------------------------------------------------------------------------

    def _store(self, inv: dispatch.Invocation, job_id: str) -> None:
        variable = inv.get("JobVariable")
        if variable:
            inv.ctx.variables[str(variable)] = self.task(job_id)

    def host_job(self, kind: str) -> dispatch.Handler:
        def handler(inv: dispatch.Invocation) -> list[Any]:
            if kind == "enter_maintenance" and not inv.has("MoveWithinCluster"):
                raise dispatch.Terminating("stand-in supports only -MoveWithinCluster")
            out = []
            for h in [o for o in inv.input if isinstance(o, dict)]:
                name = str(h["ComputerName"])
                if kind == "enter_maintenance":
                    self._save_instead_of_migrating(name, inv.name)
                op = getattr(self.w.sim, kind)
                job_id = self.w.call(lambda n=name, op=op: op(n), inv.name)
                self.w.submit(job_id, kind, str(h["ID"]), str(h["Name"]), inv.name)
                self._store(inv, job_id)
                out.append(h)
            return out

        return handler

    def _save_instead_of_migrating(self, host: str, command: str) -> None:
        """VMM may save an HA VM it fails to live-migrate, and still finish the drain."""
        for v in self.w.snapshot()["vms"]:
            if v["id"] in self.w.save_instead_of_migrate and v["host"].lower() == host.lower():
                self.w.wait(self.w.call(lambda i=v["id"]: self.w.sim.save_vm(i), command), command)

    def save_to_library(self, inv: dispatch.Invocation) -> list[Any]:
        raise dispatch.Terminating(
            "Save-SCVirtualMachine stores the VM in the VMM library: never wanted here",
            "InvalidOperation",
            command=inv.name,
        )

    def vm_job(self, kind: str) -> dispatch.Handler:
        def handler(inv: dispatch.Invocation) -> list[Any]:
            op_kind = kind
            if kind == "stop":
                if inv.has("SaveState"):
                    op_kind = "save_vm"
                elif inv.has("Shutdown"):
                    op_kind = "shutdown_vm"
                else:
                    raise dispatch.Terminating(
                        "stand-in supports Stop-SCVirtualMachine -Shutdown or -SaveState only"
                    )
            out = []
            for v in [o for o in inv.input if isinstance(o, dict)]:
                vm_id = str(v["ID"])
                op = getattr(self.w.sim, op_kind)
                job_id = self.w.call(lambda i=vm_id, op=op: op(i), inv.name)
                self.w.submit(job_id, op_kind, vm_id, str(v["Name"]), inv.name)
                self._store(inv, job_id)
                out.append(v)
            return out

        return handler

    def move_script(self, inv: dispatch.Invocation) -> list[Any]:
        vm_id, host = str(inv.get("VMId")), str(inv.get("HostName"))
        vm = self.w.find_vm(vm_id)
        if vm is None:
            raise dispatch.Terminating(f"VM {vm_id} is not known to VMM", "ObjectNotFound")
        if self.w.find_host(host) is None:
            raise dispatch.Terminating(f"host {host} is not known to VMM", "ObjectNotFound")
        if not vm["ha"] and not inv.get("Path"):
            raise dispatch.Terminating(
                f"VM {vm['name']} is on local storage: Move-SCVirtualMachine needs -Path",
                "InvalidArgument",
                command="Move-SCVirtualMachine",
            )
        job_id = self.w.call(lambda: self.w.sim.move_vm(vm_id, host), "Move-SCVirtualMachine")
        self.w.submit(job_id, "move_vm", vm_id, vm["name"], "Move-SCVirtualMachine")
        self._store(inv, job_id)
        return [job_id]
