"""ClusterBackend over System Center VMM, through a PSRP runspace pool to the VMM server.

Every call is a pipeline of cmdlets with typed parameters, or a module-level constant script
with a `param()` block (`*_SCRIPT`); no value is ever formatted into script text. Asynchronous
VMM jobs are started with `-RunAsynchronously -JobVariable <unique name>`; the job object is read
back with `Get-Variable -ValueOnly` in the same runspace and its ID becomes our job ID.

VMM reads (sources in docs/windows-facts.md):
- power comes from `VirtualMachineState`; `Status` also has non-power values (UpdateFailed,
  MigrationFailed, HostNotResponding, ...): such a VM is "not safe to touch" (`Vm.problem`), and
  preflight names it.
- a VM's memory is `max(Memory (startup), MemoryAssignedMB)`, or its Dynamic Memory maximum when
  `dynamic_memory: maximum` is configured; a host's capacity leaves out `MemoryReserveMB` (VMM
  placement never uses it) and is bounded by what `AvailableMemory` says is free.
- a host is in maintenance when its `OverallState` says so; `AvailableForPlacement` is read too
  (never `MaintenanceHost`, obsolete, which marks a designated maintenance host).
- clusters are found by short name or FQDN (VMM names them by FQDN).
- re-attaching after a crash reads the VM's `MostRecentTaskID`, or the running jobs' `CmdletName`
  and `ResultObjectID`: the cmdlets this module itself runs, never guessed job names.
- `ErrorInfo` arrives as a string ("Success (0)") at default serialization depth; the problem
  text is read with `Select-Object -ExpandProperty ErrorInfo` when a job failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from engine import errors
from workflows.backends import base, connection, psrp

VM_FIELDS = [
    "ID",
    "Name",
    "HostName",
    "Status",
    "VirtualMachineState",
    "IsHighlyAvailable",
    "Memory",
    "MemoryAssignedMB",
    "DynamicMemoryEnabled",
    "DynamicMemoryMaximumMB",
    "MostRecentTaskID",
]
HOST_FIELDS = [
    "ID",
    "Name",
    "ComputerName",
    "FullyQualifiedDomainName",
    "OverallState",
    "CommunicationState",
    "AvailableForPlacement",
    "TotalMemory",
    "AvailableMemory",
    "MemoryReserveMB",
    "VMPaths",
]
JOB_FIELDS = [
    "ID",
    "Name",
    "Status",
    "Progress",
    "ErrorInfo",
    "ResultName",
    "CmdletName",
    "ResultObjectID",
]
DYNAMIC_MEMORY_CHOICES = ("assigned", "maximum")

MOVE_VM_SCRIPT = """\
param(
    [Parameter(Mandatory = $true)] [guid] $VMId,
    [Parameter(Mandatory = $true)] [string] $HostName,
    [Parameter(Mandatory = $true)] [string] $JobVariable,
    [string] $Path = ''
)
$vm = Get-SCVirtualMachine -ID $VMId
if ($null -eq $vm) {
    throw "VM $VMId is not known to VMM"
}
$vmHost = Get-SCVMHost -ComputerName $HostName
if ($null -eq $vmHost) {
    throw "host $HostName is not known to VMM"
}
$move = @{ VM = $vm; VMHost = $vmHost; RunAsynchronously = $true; JobVariable = $JobVariable }
if ($Path) {
    $move.Path = $Path
}
$null = Move-SCVirtualMachine @move
(Get-Variable -Name $JobVariable -ValueOnly).ID.ToString()
"""

# The cmdlets this module runs for each kind of job: how a job is recognised after a crash
# (the Task's CmdletName), instead of guessing the names VMM gives its jobs.
JOB_CMDLETS: Mapping[str, frozenset[str]] = {
    "enter_maintenance": frozenset({"disable-scvmhost"}),
    "exit_maintenance": frozenset({"enable-scvmhost"}),
    "move_vm": frozenset({"move-scvirtualmachine"}),
    "start_vm": frozenset({"start-scvirtualmachine", "resume-scvirtualmachine"}),
    "save_vm": frozenset({"stop-scvirtualmachine"}),
    "shutdown_vm": frozenset({"stop-scvirtualmachine"}),
}
# Stop-SCVirtualMachine -SaveState is the documented way to save a VM's state
# (Save-SCVirtualMachine stores a VM in the library: never called).
POWER_CMDLETS: Mapping[str, tuple[str, Mapping[str, object]]] = {
    "save_vm": ("Stop-SCVirtualMachine", {"SaveState": True}),
    "shutdown_vm": ("Stop-SCVirtualMachine", {"Shutdown": True}),
}
STATUS_MAP = {
    "running": base.PowerState.RUNNING,
    "poweroff": base.PowerState.POWER_OFF,
    "stored": base.PowerState.POWER_OFF,
    "saved": base.PowerState.SAVED,
    "paused": base.PowerState.PAUSED,
}
# Status values that are normal for a VM whose power state VirtualMachineState gives.
SAFE_STATUSES = frozenset({*STATUS_MAP, "stopped"})
JOB_STATUS_MAP = {s.value.lower(): s for s in base.JobStatus}


class VmmBackend:
    """`base.ClusterBackend` over VMM. One runspace pool, opened lazily, reopened after errors."""

    def __init__(
        self,
        settings: connection.ConnectionSettings,
        *,
        vmm_server: str = "localhost",
        dynamic_memory: str = "assigned",
        vm_path: str | None = None,
    ) -> None:
        """`vmm_server` is what Get-SCVMMServer connects to inside each new runspace;
        `dynamic_memory` (assigned | maximum) how much memory a Dynamic Memory VM is counted
        for; `vm_path` the destination path of non-HA moves (default: the target host's first
        VMPaths entry)."""
        if dynamic_memory not in DYNAMIC_MEMORY_CHOICES:
            raise errors.ConfigError(
                f"backend.vmm.dynamic_memory: must be one of {', '.join(DYNAMIC_MEMORY_CHOICES)}"
            )
        connect = psrp.Cmd("Get-SCVMMServer", {"ComputerName": vmm_server})
        self._session = psrp.Session(settings, on_open=[connect])
        self.dynamic_memory = dynamic_memory
        self.vm_path = vm_path

    def close(self) -> None:
        self._session.close()

    # -- reads -------------------------------------------------------------------------------

    def inventory(self, cluster: str) -> base.Inventory:
        cluster_id = self._cluster_id(cluster)
        hosts_cmds = [
            psrp.Cmd("Get-SCVMHostCluster", {"ID": cluster_id}),
            psrp.Cmd("Get-SCVMHost"),
        ]
        raw_hosts = [psrp.props(h) for h in self._run([*hosts_cmds, _select(HOST_FIELDS)])]
        raw_vms = self._run([*hosts_cmds, psrp.Cmd("Get-SCVirtualMachine"), _select(VM_FIELDS)])
        vms = tuple(vm_from(psrp.props(v), self.dynamic_memory) for v in raw_vms)
        hosts = tuple(host_from(h, cluster, vms, vm_path=self.vm_path) for h in raw_hosts)
        return base.Inventory(cluster=cluster, hosts=hosts, vms=vms)

    def _cluster_id(self, cluster: str) -> uuid.UUID:
        """The VMM host cluster named `cluster`, given as its short name or its FQDN."""
        found = self._run([psrp.Cmd("Get-SCVMHostCluster"), _select(["Name", "ID"])], cluster)
        for raw in found:
            p = psrp.props(raw)
            name = str(p.get("Name") or "")
            if _same_name(name, cluster):
                return _guid(str(p.get("ID")), "cluster")
        raise errors.BackendError(f"unknown cluster {cluster!r}", target=cluster)

    def job(self, job_id: str) -> base.Job:
        guid = _guid(job_id, "job")
        found = self._run([psrp.Cmd("Get-SCJob", {"ID": guid}), _select(JOB_FIELDS)], job_id)
        if not found:
            raise errors.BackendError(f"unknown job {job_id!r}", target=job_id)
        fields = psrp.props(found[0])
        status = JOB_STATUS_MAP.get(str(fields.get("Status", "")).lower(), base.JobStatus.FAILED)
        explains = status not in (
            base.JobStatus.COMPLETED,
            base.JobStatus.RUNNING,
            base.JobStatus.NOT_STARTED,
        )
        if explains and not isinstance(fields.get("ErrorInfo"), Mapping):
            fields["ErrorInfo"] = self._error_info(guid) or fields.get("ErrorInfo")
        return job_from(fields, job_id)

    def _error_info(self, guid: uuid.UUID) -> dict[str, Any] | None:
        """The job's ErrorInfo as an object (default depth sends only its ToString)."""
        expand = psrp.Cmd("Select-Object", {"ExpandProperty": "ErrorInfo"})
        found = self._run([psrp.Cmd("Get-SCJob", {"ID": guid}), expand], str(guid))
        if not found or isinstance(found[0], str):
            return None
        return psrp.props(found[0])

    def find_job(self, kind: str, target: str) -> str | None:
        """An unfinished job of ours on target: the VM's MostRecentTaskID, else a running job
        started by the cmdlet we use for `kind` on this VM or host (ResultObjectID)."""
        if kind not in JOB_CMDLETS:
            raise errors.UsageError(f"unknown job kind {kind!r}")
        if kind in ("enter_maintenance", "exit_maintenance"):
            target_id = self._host_id(target)
            if target_id is None:
                return None
        else:
            vm = self._vm(target)
            target_id = str(vm.get("ID"))
            recent = vm.get("MostRecentTaskID")
            if recent and self._ours(self._job_fields(str(recent)), kind, target_id):
                return str(recent)
        running = self._run([psrp.Cmd("Get-SCJob", {"Running": True}), _select(JOB_FIELDS)])
        for raw in running:
            fields = psrp.props(raw)
            if self._ours(fields, kind, target_id):
                return str(fields["ID"])
        return None

    def interference(self, cluster: str) -> list[str]:
        """VMM jobs running on the cluster's hosts or on its VMs (`Get-SCJob -Running`; a
        job's ResultObjectID is the VM or host it acts on, its ResultName that object's name)."""
        found = self.inventory(cluster)
        names = {_short(h.name).lower() for h in found.hosts} | {v.name.lower() for v in found.vms}
        ids = {v.id.lower() for v in found.vms}
        running = self._run([psrp.Cmd("Get-SCJob", {"Running": True}), _select(JOB_FIELDS)])
        return [
            f"VMM job {job.get('ID')} ({job.get('Name')} on {job.get('ResultName')}) is running"
            for job in map(psrp.props, running)
            if _short(str(job.get("ResultName", ""))).lower() in names
            or str(job.get("ResultObjectID", "")).lower() in ids
        ]

    def _job_fields(self, job_id: str) -> dict[str, Any]:
        guid = _guid(job_id, "job")
        found = self._run([psrp.Cmd("Get-SCJob", {"ID": guid}), _select(JOB_FIELDS)], job_id)
        return psrp.props(found[0]) if found else {}

    @staticmethod
    def _ours(fields: Mapping[str, Any], kind: str, target_id: str) -> bool:
        status = JOB_STATUS_MAP.get(str(fields.get("Status", "")).lower())
        return (
            status in (base.JobStatus.RUNNING, base.JobStatus.NOT_STARTED)
            and str(fields.get("CmdletName", "")).lower() in JOB_CMDLETS[kind]
            and str(fields.get("ResultObjectID", "")).lower() == target_id.lower()
        )

    def _host_id(self, host: str) -> str | None:
        cmds = [psrp.Cmd("Get-SCVMHost", {"ComputerName": host}), _select(["ID"])]
        found = self._run(cmds, host)
        return str(psrp.props(found[0]).get("ID")) if found else None

    def storage_health(self, cluster: str) -> base.StorageHealth:
        """VMM's own session cannot read the nodes' storage jobs (that would be a second hop
        from the VMM server): not checked, and said so."""
        return base.StorageHealth(
            s2d=False,
            checked=False,
            note="the vmm backend does not read Storage Spaces Direct repair jobs; "
            "`nodepatch doctor --survey` records whether the cluster has S2D",
        )

    # -- writes ------------------------------------------------------------------------------

    def enter_maintenance(self, host: str) -> str:
        params = {"MoveWithinCluster": True}
        return self._host_job("Disable-SCVMHost", host, params)

    def exit_maintenance(self, host: str) -> str:
        return self._host_job("Enable-SCVMHost", host, {})

    def move_vm(self, vm_id: str, host: str) -> str:
        params: dict[str, object] = {
            "VMId": _guid(vm_id, "VM"),
            "HostName": host,
            "JobVariable": _job_variable(),
        }
        vm = self._vm(vm_id)
        if not vm.get("IsHighlyAvailable"):
            params["Path"] = self._destination_path(str(vm.get("Name")), vm_id, host)
        out = self._run([psrp.Cmd(MOVE_VM_SCRIPT, params, script=True)], vm_id)
        if not out:
            raise errors.BackendError(f"moving VM {vm_id} started no job", target=vm_id)
        return str(out[-1])

    def _destination_path(self, name: str, vm_id: str, host: str) -> str:
        """Where a non-HA VM's files go on `host`: the configured path or its first VMPaths."""
        if self.vm_path:
            return self.vm_path
        cmds = [psrp.Cmd("Get-SCVMHost", {"ComputerName": host}), _select(["VMPaths"])]
        found = self._run(cmds, host)
        paths = _paths(psrp.props(found[0]).get("VMPaths")) if found else []
        if not paths:
            raise errors.BackendError(
                f"VM {name!r} ({vm_id}) is not highly available and {host} has no default VM "
                "path: set backend.vmm.vm_path",
                target=vm_id,
            )
        return paths[0]

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


def vm_from(p: Mapping[str, Any], dynamic_memory: str = "assigned") -> base.Vm:
    """Power from VirtualMachineState (Status when absent); a non-power Status is a problem."""
    status = _word(p.get("Status"))
    power = _word(p.get("VirtualMachineState")) or status
    problem = ""
    if status and status not in SAFE_STATUSES:
        problem = f"VMM reports it {p.get('Status')}: not safe to touch; repair it in VMM first"
    return base.Vm(
        id=str(p.get("ID")),
        name=str(p.get("Name")),
        host=_short(str(p.get("HostName") or p.get("VMHost") or "")),
        ha=bool(p.get("IsHighlyAvailable")),
        state=STATUS_MAP.get(power, base.PowerState.RUNNING),
        memory_mb=_vm_memory(p, dynamic_memory),
        problem=problem,
    )


def _vm_memory(p: Mapping[str, Any], dynamic_memory: str) -> int:
    """max(startup, assigned); a Dynamic Memory VM at its maximum when so configured."""
    memory = max(_int(p.get("Memory")), _int(p.get("MemoryAssignedMB")))
    if dynamic_memory == "maximum" and p.get("DynamicMemoryEnabled"):
        memory = max(memory, _int(p.get("DynamicMemoryMaximumMB")))
    return memory


def host_from(
    p: Mapping[str, Any],
    cluster: str,
    vms: tuple[base.Vm, ...] = (),
    *,
    vm_path: str | None = None,
) -> base.Host:
    """Maintenance from OverallState (and not available for placement); capacity without
    MemoryReserveMB, and never more than AvailableMemory leaves free."""
    overall = _word(p.get("OverallState"))
    communication = _word(p.get("CommunicationState"))
    responding = communication == "responding" and "notresponding" not in overall
    name = _short(str(p.get("ComputerName") or p.get("Name")))
    reserve = _int(p.get("MemoryReserveMB"))
    capacity = _int(p.get("TotalMemory")) // (1024 * 1024) - reserve
    held = sum(v.memory_mb for v in vms if v.host.lower() == name.lower() and v.uses_memory)
    if p.get("AvailableMemory") is not None:
        capacity = min(capacity, _int(p.get("AvailableMemory")) - reserve + held)
    return base.Host(
        name=name,
        cluster=cluster,
        memory_mb=capacity,
        maintenance="maintenance" in overall,
        state=base.HostState.UP if responding else base.HostState.DOWN,
        available_for_placement=bool(p.get("AvailableForPlacement")),
        address=str(p.get("FullyQualifiedDomainName") or ""),
        vm_path_known=bool(vm_path) or bool(_paths(p.get("VMPaths"))),
    )


def _word(raw: object) -> str:
    return str(raw or "").replace(" ", "").lower()


def _int(raw: object) -> int:
    try:
        return int(str(raw)) if raw not in (None, "") else 0
    except ValueError:
        return 0


def _paths(raw: object) -> list[str]:
    if isinstance(raw, list):
        return [str(p) for p in raw if p]
    return [str(raw)] if raw else []


def _same_name(a: str, b: str) -> bool:
    """cluster1 and cluster1.corp.example name the same cluster (either way round)."""
    a, b = a.lower(), b.lower()
    return a == b or _short(a) == b or a == _short(b)


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
    """ErrorInfo as an object (Problem, RecommendedAction) or as its string ("Success (0)")."""
    if isinstance(raw, Mapping):
        problem = raw.get("Problem") or raw.get("DisplayableErrorCode") or ""
        action = raw.get("RecommendedAction") or ""
        return f"{problem} {action}".strip()
    text = str(raw or "")
    first = text.split("(", 1)[0].strip().lower()
    return "" if first in ("success", "none", "") else text


def _short(name: str) -> str:
    """hv01.corp.example -> hv01 (VMM reports FQDNs; the cluster speaks short names)."""
    return name.split(".", 1)[0] if name and not name[0].isdigit() else name
