"""ClusterBackend over Failover Clustering and Hyper-V cmdlets, for clusters without VMM.

Cluster cmdlets (`Get-ClusterNode`, `Suspend-/Resume-ClusterNode`) run in a session on one
cluster node, the *cluster session*: first the configured `server`, and whenever that node is
unreachable (rebooting) or is the node being put in maintenance, another node of the cluster.
Hyper-V reads and writes run in a session on the node that holds the VM (`Get-VM` without
`-ComputerName`), so nothing ever needs the second hop (reaching a third computer from a remote
session is refused under default authentication); a node whose session cannot be opened is
reported as that node being down, its VMs unknown, and the rest of the inventory still comes.
`Move-ClusterVirtualMachineRole` runs in the session of the node that owns the VM (the doc:
it "cannot be run remotely without CredSSP"). A node's address is `node_addresses[node]` from
the configuration, else `<node>.<cluster Domain>` (its FQDN: certificates and Kerberos SPNs
name FQDNs).

Failover Clustering has no job objects, so job IDs are synthetic and self-describing
(`fc:<kind>:<target>[:<host>]`), and `job()` derives the status from the cluster's state:
a drain is `Get-ClusterNode`'s `DrainStatus`; the other operations run synchronously
(`Move-ClusterVirtualMachineRole` waits for the migration, `Start-VM`/`Resume-VM`/`Save-VM`
block, a guest shutdown is bounded by `shutdown_timeout_s`) and their job reports whether the
VM is now where, or in the state, it should be. Non-HA VMs can be powered on, saved and shut
down but not moved (BackendError).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from engine import errors
from workflows.backends import base, connection, psrp

PREFIX = "fc"
VM_STATES = {
    "running": base.PowerState.RUNNING,
    "off": base.PowerState.POWER_OFF,
    "saved": base.PowerState.SAVED,
    "paused": base.PowerState.PAUSED,
}
POWER_OPS: Mapping[str, tuple[str, dict[str, object], base.PowerState]] = {
    "start_vm": ("Start-VM", {}, base.PowerState.RUNNING),
    "save_vm": ("Save-VM", {}, base.PowerState.SAVED),
    "shutdown_vm": ("Stop-VM", {"Force": True}, base.PowerState.POWER_OFF),
}
NODE_FIELDS = ["Name", "State", "DrainStatus", "Id"]
VM_FIELDS = ["VMId", "Name", "ComputerName", "State", "IsClustered", "MemoryStartup"]
DEFAULT_SHUTDOWN_TIMEOUT_S = 360.0  # Stop-VM -Force gives the guest 5 minutes

# Stop-VM -Force is a guest shutdown with a grace period: bounded here, explicitly.
STOP_VM_SCRIPT = """\
param(
    [Parameter(Mandatory = $true)] [guid] $VMId,
    [Parameter(Mandatory = $true)] [int] $TimeoutSeconds
)
$vm = Get-VM -Id $VMId -ErrorAction Stop
$job = Stop-VM -VM $vm -Force -AsJob
if ($null -eq (Wait-Job -Job $job -Timeout $TimeoutSeconds)) {
    Stop-Job -Job $job
    throw ('the guest shutdown of {0} did not finish within {1} s' -f $vm.Name, $TimeoutSeconds)
}
Receive-Job -Job $job -ErrorAction Stop
"""


# Storage Spaces Direct: repair/resync jobs running and virtual disks not healthy.
STORAGE_SCRIPT = """\
param()
$s2d = Get-ClusterStorageSpacesDirect -ErrorAction SilentlyContinue
$enabled = ($null -ne $s2d) -and ([string]$s2d.State -eq 'Enabled')
$jobs = @()
$disks = @()
if ($enabled) {
    $jobs = @(Get-StorageJob | Where-Object { [string]$_.JobState -eq 'Running' } |
        ForEach-Object { [string]$_.Name })
    foreach ($disk in Get-VirtualDisk) {
        $healthy = [string]$disk.HealthStatus -eq 'Healthy'
        if (-not $healthy -or [string]$disk.OperationalStatus -ne 'OK') {
            $disks += [string]$disk.FriendlyName
        }
    }
}
[pscustomobject]@{
    Enabled = $enabled
    RunningJobs = $jobs
    UnhealthyDisks = $disks
}
"""


class FailoverBackend:
    """`base.ClusterBackend` over the FailoverClusters and Hyper-V modules on the nodes."""

    def __init__(
        self,
        settings: connection.ConnectionSettings,
        *,
        node_addresses: Mapping[str, str] | None = None,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.node_addresses = {k.lower(): v for k, v in (node_addresses or {}).items()}
        self.shutdown_timeout_s = shutdown_timeout_s
        self._sessions: dict[str, psrp.Session] = {}
        self._cluster_at: str | None = None  # the cluster session's node; None: `server`
        self._nodes: list[str] = list(self.node_addresses)  # until the cluster names them
        self._domain = ""
        self._avoid = ""  # the node in maintenance: not used for the cluster session

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    # -- reads -------------------------------------------------------------------------------

    def inventory(self, cluster: str) -> base.Inventory:
        name = self._cluster_name()
        if name.lower() != cluster.split(".", 1)[0].lower():
            raise errors.BackendError(
                f"unknown cluster {cluster!r} (this is {name})", target=cluster
            )
        nodes = self._cluster_nodes()
        hosts: list[base.Host] = []
        vms: list[base.Vm] = []
        for node in nodes:
            host, found = self._node_view(node, name)
            hosts.append(host)
            vms += found
        return base.Inventory(cluster=name, hosts=tuple(hosts), vms=tuple(vms))

    def _node_view(self, node: Mapping[str, Any], cluster: str) -> tuple[base.Host, list[base.Vm]]:
        """The host as its own session sees it; unreachable: the node is down, VMs unknown."""
        name = str(node["Name"])
        if str(node.get("State")).lower() == "down":
            return _host(node, cluster, 0, self.address(name), up=False), []
        try:
            memory = self._node_memory(name)
            vms = self._vms(name)
        except errors.TransientBackendError:
            return _host(node, cluster, 0, self.address(name), up=False), []
        return _host(node, cluster, memory, self.address(name), up=True), vms

    def job(self, job_id: str) -> base.Job:
        parts = job_id.split(":")
        if len(parts) < 3 or parts[0] != PREFIX:
            raise errors.BackendError(f"unknown job {job_id!r}", target=job_id)
        kind, target = parts[1], parts[2]
        if kind == "enter_maintenance":
            return self._drain_job(job_id, target)
        if kind == "exit_maintenance":
            node = self._node(target)
            ok = str(node.get("State")).lower() == "up"
            return _job(
                job_id,
                ok,
                f"node {target} resumed" if ok else f"node {target} is {node.get('State')}",
            )
        vm = self._vm(target)
        if kind == "move_vm" and len(parts) == 4:
            ok = vm.host.lower() == parts[3].lower()
            return _job(job_id, ok, f"VM {vm.name} is on {vm.host}")
        if kind in POWER_OPS:
            ok = vm.state is POWER_OPS[kind][2]
            return _job(job_id, ok, f"VM {vm.name} is {vm.state.value}")
        raise errors.BackendError(f"unknown job {job_id!r}", target=job_id)

    def find_job(self, kind: str, target: str) -> str | None:
        """Only drains run in the background; everything else finished before returning."""
        if kind != "enter_maintenance":
            return None
        node = self._node(target)
        if str(node.get("DrainStatus")).lower() == "inprogress":
            return f"{PREFIX}:enter_maintenance:{node['Name']}"
        return None

    def storage_health(self, cluster: str) -> base.StorageHealth:
        """Get-ClusterStorageSpacesDirect, Get-StorageJob and Get-VirtualDisk on a node."""
        rows = self._cluster_run([psrp.Cmd(STORAGE_SCRIPT, {}, script=True)], cluster)
        found = psrp.props(rows[0]) if rows else {}
        return base.StorageHealth(
            s2d=bool(found.get("Enabled")),
            repair_jobs=tuple(str(j) for j in found.get("RunningJobs") or ()),
            unhealthy_disks=tuple(str(d) for d in found.get("UnhealthyDisks") or ()),
        )

    # -- writes ------------------------------------------------------------------------------

    def enter_maintenance(self, host: str) -> str:
        node = self._node(host)
        name = str(node["Name"])
        for vm in self._vms(name):
            if not vm.ha and vm.state is base.PowerState.RUNNING:
                self._power(vm, "save_vm")
        self._avoid = name.lower()
        self._cluster_run([psrp.Cmd("Suspend-ClusterNode", {"Name": host, "Drain": True})], host)
        return f"{PREFIX}:enter_maintenance:{name}"

    def exit_maintenance(self, host: str) -> str:
        node = self._node(host)
        params = {"Name": host, "Failback": "NoFailback"}
        self._cluster_run([psrp.Cmd("Resume-ClusterNode", params)], host)
        if self._avoid == str(node["Name"]).lower():
            self._avoid = ""
        return f"{PREFIX}:exit_maintenance:{node['Name']}"

    def move_vm(self, vm_id: str, host: str) -> str:
        vm = self._vm(vm_id)
        if not vm.ha:
            raise errors.BackendError(
                f"VM {vm.name} is not clustered; FailoverBackend cannot move non-HA VMs",
                target=vm_id,
            )
        node = self._node(host)
        params = {"VMId": _guid(vm_id), "Node": host, "MigrationType": _migration(vm)}
        self._node_run(vm.host, [psrp.Cmd("Move-ClusterVirtualMachineRole", params)], vm_id)
        return f"{PREFIX}:move_vm:{vm.id}:{node['Name']}"

    def start_vm(self, vm_id: str) -> str:
        return self._power(self._vm(vm_id), "start_vm")

    def save_vm(self, vm_id: str) -> str:
        return self._power(self._vm(vm_id), "save_vm")

    def shutdown_vm(self, vm_id: str) -> str:
        return self._power(self._vm(vm_id), "shutdown_vm")

    # -- sessions ----------------------------------------------------------------------------

    def address(self, node: str) -> str:
        """How to reach a node: `node_addresses`, else its FQDN from the cluster's domain."""
        configured = self.node_addresses.get(node.lower())
        if configured:
            return configured
        return f"{node}.{self._domain}" if self._domain and "." not in node else node

    def _session(self, address: str) -> psrp.Session:
        if address not in self._sessions:
            self._sessions[address] = psrp.Session(self.settings.for_address(address))
        return self._sessions[address]

    def _node_run(self, node: str, cmds: list[psrp.Cmd], target: str | None = None) -> list[Any]:
        return self._session(self.address(node)).run(cmds, target=target)

    def _cluster_run(self, cmds: list[psrp.Cmd], target: str | None = None) -> list[Any]:
        """Run in the cluster session; move on to another node when its node is unreachable
        or is the node in maintenance."""
        last: errors.TransientBackendError | None = None
        for node in self._cluster_candidates():
            address = self.address(node) if node else _server_address(self.settings)
            try:
                out = self._session(address).run(cmds, target=target)
            except errors.TransientBackendError as exc:
                last = exc
                continue
            self._cluster_at = node or None
            return out
        assert last is not None
        raise last

    def _cluster_candidates(self) -> list[str]:
        """Node names to try ("" is the configured server), the node in maintenance last."""
        current = self._cluster_at or ""
        others = [n for n in self._nodes if n.lower() != current.lower()]
        order = [current, *others] if current else ["", *others]
        if self._avoid:
            order.sort(key=self._is_avoided)
        unique: dict[str, str] = {}  # one try per address (the server is usually a node too)
        for node in order:
            address = (self.address(node) if node else _server_address(self.settings)).lower()
            unique.setdefault(address, node)
        return list(unique.values())

    def _is_avoided(self, node: str) -> bool:
        """Whether the candidate ("" is the configured server) is the node in maintenance."""
        if node:
            return node.lower() == self._avoid
        server = _server_address(self.settings).lower()
        short = self.settings.server.split(".", 1)[0].lower()
        return short == self._avoid or server == self.address(self._avoid).lower()

    # -- helpers -----------------------------------------------------------------------------

    def interference(self, cluster: str) -> list[str]:
        """A Cluster-Aware Updating run in progress, or the lock a failed one left: `Get-CauRun`
        answers `RunNotInProgress` when there is neither (anything else names the run)."""
        del cluster  # the session's own cluster
        answer = self._cluster_run([psrp.Cmd("Get-CauRun", {"ErrorAction": "Stop"})])
        text = "; ".join(
            a if isinstance(a, str) else ", ".join(f"{k} {v}" for k, v in psrp.props(a).items())
            for a in answer
        ).strip()
        if not answer or "RunNotInProgress" in text:
            return []
        return [f"a Cluster-Aware Updating run is in progress or left the cluster locked: {text}"]

    def _cluster_name(self) -> str:
        found = self._cluster_run([psrp.Cmd("Get-Cluster"), _sel(["Name", "Domain"])])
        if not found:
            raise errors.BackendError("this server is not a cluster node")
        props = psrp.props(found[0])
        self._domain = str(props.get("Domain") or "")
        return str(props["Name"])

    def _cluster_nodes(self) -> list[dict[str, Any]]:
        rows = self._cluster_run([psrp.Cmd("Get-ClusterNode"), _sel(NODE_FIELDS)])
        nodes = [psrp.props(n) for n in rows]
        self._nodes = [str(n["Name"]) for n in nodes]
        return nodes

    def _node(self, host: str) -> dict[str, Any]:
        cmd = psrp.Cmd("Get-ClusterNode", {"Name": host, "ErrorAction": "SilentlyContinue"})
        found = self._cluster_run([cmd, _sel(NODE_FIELDS)], host)
        if not found:
            raise errors.BackendError(
                f"unknown host {host!r}: not a node of this cluster", target=host
            )
        return psrp.props(found[0])

    def _node_memory(self, node: str) -> int:
        rows = self._node_run(node, [psrp.Cmd("Get-VMHost"), _sel(["MemoryCapacity"])], node)
        return int(psrp.props(rows[0])["MemoryCapacity"]) // 2**20 if rows else 0

    def _vms(self, node: str, vm_id: str | None = None) -> list[base.Vm]:
        params: dict[str, object] = {}
        if vm_id is not None:
            params["Id"] = _guid(vm_id)
            params["ErrorAction"] = "SilentlyContinue"
        rows = self._node_run(node, [psrp.Cmd("Get-VM", params), _sel(VM_FIELDS)], vm_id)
        return [_vm(psrp.props(r)) for r in rows]

    def _vm(self, vm_id: str) -> base.Vm:
        _guid(vm_id)
        if not self._nodes:
            self._cluster_nodes()
        for node in self._nodes:
            try:
                found = self._vms(node, vm_id)
            except errors.TransientBackendError:
                continue  # an unreachable node holds no VM we can act on
            if found:
                return found[0]
        raise errors.BackendError(f"unknown VM {vm_id!r}", target=vm_id)

    def _power(self, vm: base.Vm, kind: str) -> str:
        if kind == "shutdown_vm":
            params = {"VMId": _guid(vm.id), "TimeoutSeconds": int(self.shutdown_timeout_s)}
            self._node_run(vm.host, [psrp.Cmd(STOP_VM_SCRIPT, params, script=True)], vm.id)
            return f"{PREFIX}:{kind}:{vm.id}"
        cmdlet, extra, _ = POWER_OPS[kind]
        if kind == "start_vm" and vm.state is base.PowerState.PAUSED:
            cmdlet = "Resume-VM"
        getter = psrp.Cmd("Get-VM", {"Id": _guid(vm.id)})
        self._node_run(vm.host, [getter, psrp.Cmd(cmdlet, dict(extra))], vm.id)
        return f"{PREFIX}:{kind}:{vm.id}"

    def _drain_job(self, job_id: str, host: str) -> base.Job:
        node = self._node(host)
        drain = str(node.get("DrainStatus")).lower()
        state = str(node.get("State")).lower()
        if drain == "completed" and state == "paused":
            return base.Job(job_id, base.JobStatus.COMPLETED, 100, f"node {host} drained")
        if drain == "failed":
            return base.Job(job_id, base.JobStatus.FAILED, 100, f"drain of node {host} failed")
        return base.Job(job_id, base.JobStatus.RUNNING, 0, f"draining node {host} ({drain})")


def _server_address(settings: connection.ConnectionSettings) -> str:
    return f"{settings.server}:{settings.port}" if settings.port else settings.server


def _sel(fields: list[str]) -> psrp.Cmd:
    return psrp.Cmd("Select-Object", {"Property": list(fields)})


def _guid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(text))
    except ValueError:
        raise errors.BackendError(f"unknown VM {text!r} (not a GUID)", target=text) from None


def _migration(vm: base.Vm) -> str:
    return "Live" if vm.state is base.PowerState.RUNNING else "Quick"


def _job(job_id: str, ok: bool, message: str) -> base.Job:
    status = base.JobStatus.COMPLETED if ok else base.JobStatus.FAILED
    return base.Job(job_id, status, 100, message)


def _host(
    node: Mapping[str, Any], cluster: str, memory_mb: int, address: str, *, up: bool
) -> base.Host:
    state = str(node.get("State")).lower()
    drain = str(node.get("DrainStatus")).lower()
    maintenance = state == "paused" and drain == "completed"
    return base.Host(
        name=str(node["Name"]),
        cluster=cluster,
        memory_mb=memory_mb,
        maintenance=maintenance,
        state=base.HostState.UP if up else base.HostState.DOWN,
        available_for_placement=state == "up" and up,
        address=address,
    )


def _vm(p: Mapping[str, Any]) -> base.Vm:
    return base.Vm(
        id=str(p["VMId"]),
        name=str(p["Name"]),
        host=str(p["ComputerName"]),
        ha=bool(p.get("IsClustered")),
        state=VM_STATES.get(str(p.get("State")).lower(), base.PowerState.RUNNING),
        memory_mb=int(p.get("MemoryStartup") or 0) // 2**20,
    )
