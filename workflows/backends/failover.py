"""ClusterBackend over Failover Clustering and Hyper-V cmdlets, for clusters without VMM.

The connection goes to one cluster node (the `server` of the settings); cluster cmdlets act on
the local cluster there, and `Get-VM -ComputerName <all nodes>` lists every VM, clustered (HA)
or not. Reaching the other nodes from that session is a second hop: use `auth: credssp` (or
Kerberos delegation) in production.

Failover Clustering has no job objects, so job IDs are synthetic and self-describing
(`fc:<kind>:<target>[:<host>]`), and `job()` derives the status from the cluster's state:
a drain is `Get-ClusterNode`'s `DrainStatus`; the other operations run synchronously
(`Move-ClusterVirtualMachineRole` waits for the migration, `Start-VM`/`Save-VM`/`Stop-VM`
block) and their job reports whether the VM is now where, or in the state, it should be.
Non-HA VMs can be powered on, saved and shut down but not moved (BackendError).
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


class FailoverBackend:
    """`base.ClusterBackend` over the FailoverClusters and Hyper-V modules on a cluster node."""

    def __init__(self, settings: connection.ConnectionSettings) -> None:
        self._session = psrp.Session(settings)

    def close(self) -> None:
        self._session.close()

    # -- reads -------------------------------------------------------------------------------

    def inventory(self, cluster: str) -> base.Inventory:
        name = self._cluster_name()
        if name.lower() != cluster.split(".", 1)[0].lower():
            raise errors.BackendError(
                f"unknown cluster {cluster!r} (this is {name})", target=cluster
            )
        nodes = [psrp.props(n) for n in self._run([psrp.Cmd("Get-ClusterNode"), _sel(NODE_FIELDS)])]
        names = [str(n["Name"]) for n in nodes]
        memory = self._node_memory(names)
        hosts = tuple(_host(n, name, memory.get(str(n["Name"]).lower(), 0)) for n in nodes)
        return base.Inventory(cluster=name, hosts=hosts, vms=tuple(self._vms(names)))

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

    # -- writes ------------------------------------------------------------------------------

    def enter_maintenance(self, host: str) -> str:
        node = self._node(host)
        for vm in self._vms([str(node["Name"])]):
            if not vm.ha and vm.state is base.PowerState.RUNNING:
                self._power(vm, "save_vm")
        self._run([psrp.Cmd("Suspend-ClusterNode", {"Name": host, "Drain": True})], host)
        return f"{PREFIX}:enter_maintenance:{node['Name']}"

    def exit_maintenance(self, host: str) -> str:
        node = self._node(host)
        params = {"Name": host, "Failback": "NoFailback"}
        self._run([psrp.Cmd("Resume-ClusterNode", params)], host)
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
        self._run([psrp.Cmd("Move-ClusterVirtualMachineRole", params)], vm_id)
        return f"{PREFIX}:move_vm:{vm.id}:{node['Name']}"

    def start_vm(self, vm_id: str) -> str:
        return self._power(self._vm(vm_id), "start_vm")

    def save_vm(self, vm_id: str) -> str:
        return self._power(self._vm(vm_id), "save_vm")

    def shutdown_vm(self, vm_id: str) -> str:
        return self._power(self._vm(vm_id), "shutdown_vm")

    # -- helpers -----------------------------------------------------------------------------

    def interference(self, cluster: str) -> list[str]:
        """A Cluster-Aware Updating run in progress, or the lock a failed one left: `Get-CauRun`
        answers `RunNotInProgress` when there is neither (anything else names the run)."""
        del cluster  # the session's own cluster
        answer = self._run([psrp.Cmd("Get-CauRun", {"ErrorAction": "Stop"})])
        text = "; ".join(str(a) for a in answer).strip()
        if not answer or "RunNotInProgress" in text:
            return []
        return [f"a Cluster-Aware Updating run is in progress or left the cluster locked: {text}"]

    def _run(self, cmds: list[psrp.Cmd], target: str | None = None) -> list[Any]:
        return self._session.run(cmds, target=target)

    def _cluster_name(self) -> str:
        found = self._run([psrp.Cmd("Get-Cluster"), _sel(["Name"])])
        if not found:
            raise errors.BackendError("this server is not a cluster node")
        return str(psrp.props(found[0])["Name"])

    def _node(self, host: str) -> dict[str, Any]:
        cmd = psrp.Cmd("Get-ClusterNode", {"Name": host, "ErrorAction": "SilentlyContinue"})
        found = self._run([cmd, _sel(NODE_FIELDS)], host)
        if not found:
            raise errors.BackendError(
                f"unknown host {host!r}: not a node of this cluster", target=host
            )
        return psrp.props(found[0])

    def _node_memory(self, names: list[str]) -> dict[str, int]:
        cmds = [
            psrp.Cmd("Get-VMHost", {"ComputerName": names}),
            _sel(["ComputerName", "MemoryCapacity"]),
        ]
        rows = [psrp.props(r) for r in self._run(cmds)]
        return {str(r["ComputerName"]).lower(): int(r["MemoryCapacity"]) // 2**20 for r in rows}

    def _vms(self, nodes: list[str], vm_id: str | None = None) -> list[base.Vm]:
        params: dict[str, object] = {"ComputerName": nodes}
        if vm_id is not None:
            params["Id"] = _guid(vm_id)
            params["ErrorAction"] = "SilentlyContinue"
        rows = self._run([psrp.Cmd("Get-VM", params), _sel(VM_FIELDS)], vm_id)
        return [_vm(psrp.props(r)) for r in rows]

    def _vm(self, vm_id: str) -> base.Vm:
        _guid(vm_id)
        nodes = [
            str(psrp.props(n)["Name"])
            for n in self._run([psrp.Cmd("Get-ClusterNode"), _sel(["Name"])])
        ]
        found = self._vms(nodes, vm_id)
        if not found:
            raise errors.BackendError(f"unknown VM {vm_id!r}", target=vm_id)
        return found[0]

    def _power(self, vm: base.Vm, kind: str) -> str:
        cmdlet, extra, _ = POWER_OPS[kind]
        getter = psrp.Cmd("Get-VM", {"ComputerName": vm.host, "Id": _guid(vm.id)})
        self._run([getter, psrp.Cmd(cmdlet, dict(extra))], vm.id)
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


def _host(node: Mapping[str, Any], cluster: str, memory_mb: int) -> base.Host:
    state = str(node.get("State")).lower()
    drain = str(node.get("DrainStatus")).lower()
    maintenance = state == "paused" and drain == "completed"
    return base.Host(
        name=str(node["Name"]),
        cluster=cluster,
        memory_mb=memory_mb,
        maintenance=maintenance,
        state=base.HostState.DOWN if state == "down" else base.HostState.UP,
        available_for_placement=state == "up",
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
