"""ClusterBackend over System Center VMM, through a PSRP runspace pool to the VMM server.

Every call is a pipeline of cmdlets with typed parameters, or a module-level constant script
with a `param()` block (`*_SCRIPT`); no value is ever formatted into script text. Asynchronous
VMM jobs are started with `-RunAsynchronously -JobVariable <unique name>`; the job object is read
back with `Get-Variable -ValueOnly` in the same runspace and its ID becomes our job ID.

VMM reads: `Status` (VMComputerSystemState) is mapped to `base.PowerState` (transitional and
unknown states count as Running, which is the conservative choice for capacity); a host is in
maintenance when its `OverallState` says so (never `MaintenanceHost`, which is obsolete).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from engine import errors
from workflows.backends import base, connection, psrp

VM_FIELDS = ["ID", "Name", "HostName", "Status", "IsHighlyAvailable", "Memory"]
HOST_FIELDS = [
    "Name",
    "ComputerName",
    "OverallState",
    "CommunicationState",
    "AvailableForPlacement",
    "TotalMemory",
]
JOB_FIELDS = ["ID", "Name", "Status", "Progress", "ErrorInfo", "ResultName"]

MOVE_VM_SCRIPT = """\
param(
    [Parameter(Mandatory = $true)] [guid] $VMId,
    [Parameter(Mandatory = $true)] [string] $HostName,
    [Parameter(Mandatory = $true)] [string] $JobVariable
)
$vm = Get-SCVirtualMachine -ID $VMId
if ($null -eq $vm) {
    throw "VM $VMId is not known to VMM"
}
$vmHost = Get-SCVMHost -ComputerName $HostName
if ($null -eq $vmHost) {
    throw "host $HostName is not known to VMM"
}
$null = Move-SCVirtualMachine -VM $vm -VMHost $vmHost -RunAsynchronously -JobVariable $JobVariable
(Get-Variable -Name $JobVariable -ValueOnly).ID.ToString()
"""

# Job names VMM gives the tasks we start (best knowledge; verify with Get-SCJob on site).
JOB_NAMES: Mapping[str, tuple[str, ...]] = {
    "enter_maintenance": ("Start maintenance mode on host", "Disable host"),
    "exit_maintenance": ("Stop maintenance mode on host", "Enable host"),
    "move_vm": ("Migrate virtual machine", "Move virtual machine"),
    "start_vm": ("Start virtual machine", "Resume virtual machine"),
    "save_vm": ("Save state virtual machine", "Save virtual machine"),
    "shutdown_vm": ("Shut down virtual machine", "Stop virtual machine"),
}
POWER_CMDLETS: Mapping[str, tuple[str, Mapping[str, object]]] = {
    "save_vm": ("SaveState-SCVirtualMachine", {}),
    "shutdown_vm": ("Stop-SCVirtualMachine", {"Shutdown": True}),
}
STATUS_MAP = {
    "running": base.PowerState.RUNNING,
    "poweroff": base.PowerState.POWER_OFF,
    "stored": base.PowerState.POWER_OFF,
    "saved": base.PowerState.SAVED,
    "paused": base.PowerState.PAUSED,
}
JOB_STATUS_MAP = {s.value.lower(): s for s in base.JobStatus}


class VmmBackend:
    """`base.ClusterBackend` over VMM. One runspace pool, opened lazily, reopened after errors."""

    def __init__(
        self, settings: connection.ConnectionSettings, *, vmm_server: str = "localhost"
    ) -> None:
        """`vmm_server` is what Get-SCVMMServer connects to inside each new runspace."""
        connect = psrp.Cmd("Get-SCVMMServer", {"ComputerName": vmm_server})
        self._session = psrp.Session(settings, on_open=[connect])

    def close(self) -> None:
        self._session.close()

    # -- reads -------------------------------------------------------------------------------

    def inventory(self, cluster: str) -> base.Inventory:
        found = self._run([psrp.Cmd("Get-SCVMHostCluster", {"Name": cluster})], cluster)
        if not found:
            raise errors.BackendError(f"unknown cluster {cluster!r}", target=cluster)
        name = str(psrp.props(found[0]).get("Name") or cluster)
        hosts_cmds = [
            psrp.Cmd("Get-SCVMHostCluster", {"Name": cluster}),
            psrp.Cmd("Get-SCVMHost"),
        ]
        raw_hosts = self._run([*hosts_cmds, _select(HOST_FIELDS)], cluster)
        raw_vms = self._run([*hosts_cmds, psrp.Cmd("Get-SCVirtualMachine"), _select(VM_FIELDS)])
        hosts = tuple(host_from(psrp.props(h), name) for h in raw_hosts)
        vms = tuple(vm_from(psrp.props(v)) for v in raw_vms)
        return base.Inventory(cluster=name, hosts=hosts, vms=vms)

    def job(self, job_id: str) -> base.Job:
        guid = _guid(job_id, "job")
        found = self._run([psrp.Cmd("Get-SCJob", {"ID": guid}), _select(JOB_FIELDS)], job_id)
        if not found:
            raise errors.BackendError(f"unknown job {job_id!r}", target=job_id)
        return job_from(psrp.props(found[0]), job_id)

    def find_job(self, kind: str, target: str) -> str | None:
        if kind not in JOB_NAMES:
            raise errors.UsageError(f"unknown job kind {kind!r}")
        result_name = target
        if kind not in ("enter_maintenance", "exit_maintenance"):
            result_name = str(self._vm(target).get("Name", target))
        running = self._run([psrp.Cmd("Get-SCJob", {"Running": True}), _select(JOB_FIELDS)])
        names = {n.lower() for n in JOB_NAMES[kind]}
        for raw in running:
            job = psrp.props(raw)
            if (
                str(job.get("Name", "")).lower() in names
                and _short(str(job.get("ResultName", ""))).lower() == _short(result_name).lower()
            ):
                return str(job["ID"])
        return None

    def interference(self, cluster: str) -> list[str]:
        """VMM jobs running on the cluster's hosts or on its VMs (`Get-SCJob -Running`; a
        job's ResultName is the host or VM it acts on)."""
        found = self.inventory(cluster)
        mine = {_short(h.name).lower() for h in found.hosts} | {v.name.lower() for v in found.vms}
        running = self._run([psrp.Cmd("Get-SCJob", {"Running": True}), _select(JOB_FIELDS)])
        return [
            f"VMM job {job.get('ID')} ({job.get('Name')} on {job.get('ResultName')}) is running"
            for job in map(psrp.props, running)
            if _short(str(job.get("ResultName", ""))).lower() in mine
        ]

    # -- writes ------------------------------------------------------------------------------

    def enter_maintenance(self, host: str) -> str:
        params = {"MoveWithinCluster": True}
        return self._host_job("Disable-SCVMHost", host, params)

    def exit_maintenance(self, host: str) -> str:
        return self._host_job("Enable-SCVMHost", host, {})

    def move_vm(self, vm_id: str, host: str) -> str:
        params = {"VMId": _guid(vm_id, "VM"), "HostName": host, "JobVariable": _job_variable()}
        out = self._run([psrp.Cmd(MOVE_VM_SCRIPT, params, script=True)], vm_id)
        if not out:
            raise errors.BackendError(f"moving VM {vm_id} started no job", target=vm_id)
        return str(out[-1])

    def start_vm(self, vm_id: str) -> str:
        state = vm_from(self._vm(vm_id)).state
        cmdlet = "Resume-SCVirtualMachine" if state is base.PowerState.PAUSED else None
        return self._vm_job(cmdlet or "Start-SCVirtualMachine", vm_id, {})

    def save_vm(self, vm_id: str) -> str:
        self._vm(vm_id)
        cmdlet, params = POWER_CMDLETS["save_vm"]
        return self._vm_job(cmdlet, vm_id, params)

    def shutdown_vm(self, vm_id: str) -> str:
        self._vm(vm_id)
        cmdlet, params = POWER_CMDLETS["shutdown_vm"]
        return self._vm_job(cmdlet, vm_id, params)

    # -- helpers -----------------------------------------------------------------------------

    def _run(self, cmds: list[psrp.Cmd], target: str | None = None) -> list[Any]:
        return self._session.run(cmds, target=target)

    def _vm(self, vm_id: str) -> dict[str, Any]:
        guid = _guid(vm_id, "VM")
        found = self._run([psrp.Cmd("Get-SCVirtualMachine", {"ID": guid}), _select(VM_FIELDS)])
        if not found:
            raise errors.BackendError(f"unknown VM {vm_id!r}", target=vm_id)
        return psrp.props(found[0])

    def _host_job(self, cmdlet: str, host: str, params: Mapping[str, object]) -> str:
        getter = psrp.Cmd("Get-SCVMHost", {"ComputerName": host})
        job_id = self._async_job(getter, cmdlet, params, host)
        if job_id is None:
            raise errors.BackendError(f"unknown host {host!r}: VMM does not manage it", target=host)
        return job_id

    def _vm_job(self, cmdlet: str, vm_id: str, params: Mapping[str, object]) -> str:
        getter = psrp.Cmd("Get-SCVirtualMachine", {"ID": _guid(vm_id, "VM")})
        job_id = self._async_job(getter, cmdlet, params, vm_id)
        if job_id is None:
            raise errors.BackendError(f"unknown VM {vm_id!r}", target=vm_id)
        return job_id

    def _async_job(
        self, getter: psrp.Cmd, cmdlet: str, params: Mapping[str, object], target: str
    ) -> str | None:
        """`getter | cmdlet -RunAsynchronously -JobVariable v`, then the job ID from `v`."""
        variable = _job_variable()
        full = {**params, "RunAsynchronously": True, "JobVariable": variable}
        self._run([getter, psrp.Cmd(cmdlet, full)], target)
        value_cmd = psrp.Cmd(
            "Get-Variable", {"Name": variable, "ValueOnly": True, "ErrorAction": "SilentlyContinue"}
        )
        found = self._run([value_cmd], target)
        if not found:
            return None
        return str(psrp.props(found[0]).get("ID") or found[0])


def _select(fields: list[str]) -> psrp.Cmd:
    return psrp.Cmd("Select-Object", {"Property": list(fields)})


def _job_variable() -> str:
    """A fresh variable name per job, so a stale value from an earlier call is never read."""
    return f"nodepatchJob{uuid.uuid4().hex}"


def _guid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(text))
    except ValueError:
        raise errors.BackendError(f"unknown {what} {text!r} (not a GUID)", target=text) from None


def vm_from(p: Mapping[str, Any]) -> base.Vm:
    status = str(p.get("Status", "")).replace(" ", "").lower()
    return base.Vm(
        id=str(p.get("ID")),
        name=str(p.get("Name")),
        host=_short(str(p.get("HostName") or p.get("VMHost") or "")),
        ha=bool(p.get("IsHighlyAvailable")),
        state=STATUS_MAP.get(status, base.PowerState.RUNNING),
        memory_mb=int(p.get("Memory") or 0),
    )


def host_from(p: Mapping[str, Any], cluster: str) -> base.Host:
    overall = str(p.get("OverallState", "")).lower()
    communication = str(p.get("CommunicationState", "")).lower()
    responding = communication == "responding" and "notresponding" not in overall
    return base.Host(
        name=_short(str(p.get("ComputerName") or p.get("Name"))),
        cluster=cluster,
        memory_mb=int(p.get("TotalMemory") or 0) // (1024 * 1024),
        maintenance="maintenance" in overall,
        state=base.HostState.UP if responding else base.HostState.DOWN,
        available_for_placement=bool(p.get("AvailableForPlacement")),
    )


def job_from(p: Mapping[str, Any], job_id: str) -> base.Job:
    status = JOB_STATUS_MAP.get(str(p.get("Status", "")).lower(), base.JobStatus.FAILED)
    progress = _progress(str(p.get("Progress") or "0"))
    info = _error_info(p.get("ErrorInfo"))
    message = str(p.get("Name") or "")
    details: dict[str, str] = {}
    if info and status is not base.JobStatus.COMPLETED:
        message = f"{message}: {info}" if message else info
        details["error_info"] = info
    return base.Job(job_id, status, progress, message, details)


def _progress(text: str) -> int:
    digits = "".join(ch for ch in text if ch.isdigit())
    return min(int(digits), 100) if digits else 0


def _error_info(raw: object) -> str:
    if isinstance(raw, Mapping):
        problem = raw.get("Problem") or raw.get("DisplayableErrorCode") or ""
        action = raw.get("RecommendedAction") or ""
        return f"{problem} {action}".strip()
    text = str(raw or "")
    return "" if text.lower() in ("success", "none") else text


def _short(name: str) -> str:
    """hv01.corp.example -> hv01 (VMM reports FQDNs; the cluster speaks short names)."""
    return name.split(".", 1)[0] if name and not name[0].isdigit() else name
