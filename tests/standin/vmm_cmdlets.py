"""VMM cmdlets (module virtualmachinemanager) answered from the SimulatedCluster.

Semantics follow windows-side.md §4.1: `-VMHost`/`-VM` take objects (here: from the pipeline),
`Disable-SCVMHost -MoveWithinCluster` drains, `-RunAsynchronously -JobVariable v` stores the
Task in the runspace's variables, `Get-SCJob` reports Status, Progress "NN %" and ErrorInfo.
Lookups of unknown objects return nothing, as VMM's Get-* cmdlets do.
"""

from __future__ import annotations

from typing import Any

from tests.standin import dispatch
from tests.standin.world import (
    CommunicationState,
    HostOverallState,
    VMComputerSystemState,
    World,
    fqdn,
    guid,
    memory_bytes,
    stable_guid,
)
from workflows.backends import base, vmm

VM_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.VM"
HOST_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.Host"
CLUSTER_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.HostCluster"
TASK_TYPE = "Microsoft.SystemCenter.VirtualMachineManager.Task"


def host_obj(cluster: str, h: dict[str, Any]) -> dict[str, Any]:
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
        "HostCluster": cluster,
        "OverallState": overall,
        "CommunicationState": CommunicationState.Responding
        if up
        else CommunicationState.NotResponding,
        "AvailableForPlacement": up and not h["maintenance"],
        "MaintenanceHost": False,
        "TotalMemory": memory_bytes(h["memory_mb"]),
    }


def vm_obj(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "__type__": VM_TYPE,
        "ID": guid(v["id"]),
        "Name": v["name"],
        "HostName": fqdn(v["host"]),
        "VMHost": fqdn(v["host"]),
        "Status": VMComputerSystemState[v["state"]],
        "StatusString": v["state"],
        "IsHighlyAvailable": v["ha"],
        "Memory": v["memory_mb"],
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
            "SaveState-SCVirtualMachine": self.vm_job("save_vm"),
            "Stop-SCVirtualMachine": self.vm_job("shutdown_vm"),
            "Get-SCJob": self.get_job,
            "Get-Variable": self.get_variable,
            "Get-Command": self.get_command,
        }

    def scripts(self) -> dict[str, dispatch.Handler]:
        return {vmm.MOVE_VM_SCRIPT: self.move_script}

    # -- reads -------------------------------------------------------------------------------

    def get_cluster(self, inv: dispatch.Invocation) -> list[Any]:
        name = inv.get("Name")
        return [
            {"__type__": CLUSTER_TYPE, "Name": c["name"], "ID": stable_guid(c["name"])}
            for c in self.w.snapshot()["clusters"]
            if name is None or c["name"].lower() == str(name).lower()
        ]

    def get_host(self, inv: dispatch.Invocation) -> list[Any]:
        hosts = self.w.hosts()
        name = inv.get("ComputerName")
        if name is not None:
            found = self.w.find_host(str(name))
            return [host_obj(*found)] if found else []
        clusters = {str(c["Name"]).lower() for c in inv.input if isinstance(c, dict)}
        return [host_obj(c, h) for c, h in hosts if not clusters or c.lower() in clusters]

    def get_vm(self, inv: dispatch.Invocation) -> list[Any]:
        vms = self.w.snapshot()["vms"]
        if inv.has("ID"):
            return [vm_obj(v) for v in vms if v["id"] == str(inv.get("ID"))]
        hosts = {str(h["ComputerName"]).lower() for h in inv.input if isinstance(h, dict)}
        return [vm_obj(v) for v in vms if not inv.input or v["host"].lower() in hosts]

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
        error_info: Any = "Success"
        if job.status is base.JobStatus.FAILED or job.status is base.JobStatus.SUCCEED_WITH_INFO:
            error_info = {
                "__type__": "Microsoft.VirtualManager.Utils.ErrorInfo",
                "DisplayableErrorCode": 10000 if job.status is base.JobStatus.FAILED else 0,
                "Problem": job.message,
                "RecommendedAction": "",
            }
        return {
            "__type__": TASK_TYPE,
            "ID": guid(job_id),
            "Name": vmm.JOB_NAMES[record.kind][0],
            "Status": job.status.value,
            "Progress": f"{job.progress} %",
            "ErrorInfo": error_info,
            "ResultName": record.result_name,
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
                op = getattr(self.w.sim, kind)
                job_id = self.w.call(lambda n=name, op=op: op(n), inv.name)
                self.w.submit(job_id, kind, name, name)
                self._store(inv, job_id)
                out.append(h)
            return out

        return handler

    def vm_job(self, kind: str) -> dispatch.Handler:
        def handler(inv: dispatch.Invocation) -> list[Any]:
            if kind == "shutdown_vm" and not inv.has("Shutdown"):
                raise dispatch.Terminating("stand-in supports only Stop-SCVirtualMachine -Shutdown")
            out = []
            for v in [o for o in inv.input if isinstance(o, dict)]:
                vm_id = str(v["ID"])
                op = getattr(self.w.sim, kind)
                job_id = self.w.call(lambda i=vm_id, op=op: op(i), inv.name)
                self.w.submit(job_id, kind, vm_id, str(v["Name"]))
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
        job_id = self.w.call(lambda: self.w.sim.move_vm(vm_id, host), "Move-SCVirtualMachine")
        self.w.submit(job_id, "move_vm", vm_id, vm["name"])
        self._store(inv, job_id)
        return [job_id]
