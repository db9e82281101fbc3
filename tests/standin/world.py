"""What the stand-in knows beyond the SimulatedCluster: VMM-style objects and per-node state.

Objects travel between the commands of a pipeline as plain dicts with a `__type__` key; only
the pipeline's final output is converted to psrpcore `PSCustomObject`s (`to_ps`). Enums are
psrpcore `PSEnumBase` members, GUIDs `PSGuid`, so the client sees what VMM would send.
Errors from the simulator become what a Windows endpoint would do: `BackendError` a terminating
error record, `TransientBackendError` a dropped connection, `AuthenticationFailed` an HTTP 401.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from psrpcore.types import PSCustomObject, PSEnumBase, PSGuid, PSType, PSUInt64

from engine import errors
from tests.standin import dispatch
from workflows.backends import base, simulated

T = TypeVar("T")
FIRST_BOOT = dt.datetime(2024, 1, 1, 6, 0, tzinfo=dt.UTC)
DOMAIN = "corp.example"
NAMESPACE = uuid.UUID("5d9b6a1e-0a44-4f4e-9c1c-4d2f1c1a7e11")


@PSType(["Microsoft.VirtualManager.Utils.VMComputerSystemState"])
class VMComputerSystemState(PSEnumBase):
    """VMM `Status`: power values and others (windows-review.md: UpdateFailed, ...)."""

    Running = 0
    PowerOff = 1
    PoweringOff = 2
    Saved = 6
    Saving = 7
    Paused = 9
    UnderMigration = 100
    MigrationFailed = 101
    UpdateFailed = 102
    HostNotResponding = 103
    Incomplete = 104


@PSType(["Microsoft.VirtualManager.Utils.VirtualMachineState"])
class VirtualMachineState(PSEnumBase):
    """VMM `VirtualMachineState`: the power state alone."""

    Running = 0
    PowerOff = 1
    Saved = 6
    Paused = 9


@PSType(["Microsoft.VirtualManager.Utils.HostComputerState"])
class HostOverallState(PSEnumBase):
    OK = 0
    NeedsAttention = 1
    NotResponding = 2
    MaintenanceMode = 5


@PSType(["Microsoft.VirtualManager.Utils.CommunicationState"])
class CommunicationState(PSEnumBase):
    Responding = 0
    NotResponding = 1


@PSType(["Microsoft.FailoverClusters.PowerShell.ClusterNodeState"])
class ClusterNodeState(PSEnumBase):
    Up = 0
    Down = 1
    Paused = 2
    Joining = 3


@PSType(["Microsoft.FailoverClusters.PowerShell.NodeDrainStatus"])
class NodeDrainStatus(PSEnumBase):
    NotInitiated = 0
    InProgress = 1
    Completed = 2
    Failed = 3


@PSType(["Microsoft.HyperV.PowerShell.VMState"])
class VMState(PSEnumBase):
    Other = 1
    Running = 2
    Off = 3
    Paused = 9
    Saved = 6


@dataclasses.dataclass
class JobRecord:
    kind: str
    target_id: str
    result_name: str
    cmdlet: str


@dataclasses.dataclass
class NodeState:
    boot_time: dt.datetime = FIRST_BOOT
    reboot_job: str | None = None
    drops_left: int = 0
    wu_runs: dict[str, int] = dataclasses.field(default_factory=dict)
    reboot_pending: bool = False  # Microsoft.Update.SystemInfo.RebootRequired
    cm_updates: list[dict[str, Any]] | None = None  # this node's CCM_SoftwareUpdate instances


class World:
    """The SimulatedCluster plus the stand-in's own bookkeeping (jobs it started, nodes)."""

    def __init__(self, sim: simulated.SimulatedCluster) -> None:
        self.sim = sim
        self.jobs: dict[str, JobRecord] = {}
        self.drains: dict[str, str] = {}
        self.nodes: dict[str, NodeState] = {}
        self.reboot_drops = 1
        self.vmm_module = True
        self.wu_polls = 1
        self.wu_result: dict[str, Any] | None = None
        self.wu_task_exit: int | None = None  # Ready without a result, this LastTaskResult
        self.wu_drop_polls = 0
        # ConfigMgr client: the updates deployed to every node, each with the EvaluationState
        # values it goes through once submitted (2 Submitted, 7 Installing, 8 PendingSoftReboot,
        # 12 InstallComplete, 13 Error), its ComplianceState (0: missing) and ErrorCode.
        self.cm_client = True
        self.cm_deployed: list[dict[str, Any]] = [
            {"article": "5030219", "compliance": 0, "states": [2, 7, 8]},
            {"article": "5031364", "compliance": 0, "states": [2, 5, 7, 12]},
        ]
        # VMM knobs (documented behaviour the simulator does not model)
        self.vm_status: dict[str, str] = {}  # VM id -> a non-power VMM Status (UpdateFailed...)
        self.vm_memory: dict[str, dict[str, int | None]] = {}  # startup/assigned/maximum MB
        self.memory_reserve_mb = 0
        self.default_vm_paths = ["C:\\ProgramData\\Microsoft\\Windows\\Hyper-V"]
        self.vm_paths: dict[str, list[str]] = {}
        self.save_instead_of_migrate: set[str] = set()
        self.designated_maintenance_hosts: set[str] = set()
        # Failover knobs
        self.delegation = False  # the second hop (Get-VM -ComputerName other) is refused
        self.s2d = False  # Storage Spaces Direct enabled
        self.storage_repair_polls = 0  # storage reads that still see a repair job running
        self.unhealthy_disks = ["CSV1"]  # while a repair runs
        # Cluster-Aware Updating: None, or the run Get-CauRun reports (in progress, or the
        # Locked state a failed run leaves until `Invoke-CauRun -ForceRecovery`)
        self.cau_run: dict[str, Any] | None = None
        self._lock = threading.RLock()

    def call(self, fn: Callable[[], T], command: str) -> T:
        """Run a simulator call, translating its errors into what Windows would do."""
        try:
            return fn()
        except errors.AuthenticationFailed:
            raise dispatch.Unauthorized from None
        except errors.TransientBackendError:
            raise dispatch.DropConnection from None
        except errors.BackendError as exc:
            raise dispatch.Terminating(
                str(exc), "InvalidOperation", target=exc.target, command=command
            ) from None

    def node(self, name: str) -> NodeState:
        with self._lock:
            return self.nodes.setdefault(name.lower(), NodeState())

    def snapshot(self) -> dict[str, Any]:
        return self.sim.snapshot()

    def hosts(self) -> list[tuple[str, dict[str, Any]]]:
        """(cluster name, host dict) for every host."""
        return [(c["name"], h) for c in self.snapshot()["clusters"] for h in c["hosts"]]

    def find_host(self, name: str) -> tuple[str, dict[str, Any]] | None:
        short = name.split(".", 1)[0].lower()
        return next(((c, h) for c, h in self.hosts() if h["name"].lower() == short), None)

    def find_vm(self, vm_id: object) -> dict[str, Any] | None:
        return next((v for v in self.snapshot()["vms"] if v["id"] == str(vm_id)), None)

    def submit(self, job_id: str, kind: str, target_id: str, result_name: str, cmdlet: str) -> str:
        with self._lock:
            self.jobs[job_id] = JobRecord(kind, target_id, result_name, cmdlet)
        return job_id

    def most_recent_task(self, target_id: str) -> PSGuid | None:
        with self._lock:
            ids = [j for j, r in self.jobs.items() if r.target_id.lower() == target_id.lower()]
        return guid(ids[-1]) if ids else None

    def memory_of(self, v: dict[str, Any]) -> dict[str, int | None]:
        """startup, assigned (0 unless running or paused) and Dynamic Memory maximum, in MB."""
        holds = v["state"] in (base.PowerState.RUNNING, base.PowerState.PAUSED)
        known = self.vm_memory.get(v["id"], {})
        startup = known.get("startup", v["memory_mb"])
        assigned = known.get("assigned", v["memory_mb"]) if holds else 0
        return {"startup": startup, "assigned": assigned, "maximum": known.get("maximum")}

    def available_memory_mb(self, host: str, total_mb: int) -> int:
        """What VMM reports as AvailableMemory (MB): total less the memory VMs hold."""
        used = sum(
            self.memory_of(v)["assigned"] or 0
            for v in self.snapshot()["vms"]
            if v["host"].lower() == host.lower()
        )
        return total_mb - used

    def wait(self, job_id: str, command: str, timeout: float = 30.0) -> base.Job:
        """Block like a synchronous cmdlet until the simulator's job ends."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.call(lambda: self.sim.job(job_id), command)
            if job.done:
                if not job.ok:
                    raise dispatch.Terminating(job.message, "InvalidOperation", command=command)
                return job
            if time.monotonic() > deadline:
                raise dispatch.Terminating(
                    f"{command} timed out", "OperationTimeout", command=command
                )
            time.sleep(0.01)

    def before_request(self, computer: str, body: bytes) -> str | None:
        """A node that is down, or rebooting, answers nothing."""
        found = self.find_host(computer)
        if found is not None and found[1]["state"] == base.HostState.DOWN:
            return "drop"
        return self._rebooting(computer, body)

    def _rebooting(self, computer: str, body: bytes) -> str | None:
        """Node endpoints are unreachable while their reboot is in progress.

        The first `reboot_drops` new sessions after a restart are refused even when the
        simulator's reboot is already over (at speed 0 it ends at once).
        """
        state = self.nodes.get(computer.lower())
        if state is None or state.reboot_job is None:
            return None
        if state.drops_left > 0:
            if b"/transfer/Create<" not in body:
                return None
            state.drops_left -= 1
            return "drop"
        try:
            job = self.sim.job(state.reboot_job)
        except errors.EngineError:
            return "drop"
        if not job.done:
            return "drop"
        state.reboot_job = None
        state.reboot_pending = False
        if state.cm_updates is not None:  # installed updates are compliant after the restart
            state.cm_updates = [
                dict(u, compliance=1, submitted=False)
                for u in state.cm_updates
                if u.get("submitted") and u["states"][-1] in (8, 9, 10, 12)
            ] + [u for u in state.cm_updates if not u.get("submitted")]
        state.boot_time = dt.datetime.now(dt.UTC).replace(microsecond=0)
        return None


def guid(text: str) -> PSGuid:
    return PSGuid(str(text))


def stable_guid(name: str) -> PSGuid:
    return PSGuid(str(uuid.uuid5(NAMESPACE, name.lower())))


def fqdn(host: str) -> str:
    return f"{host}.{DOMAIN}"


def to_ps(obj: Any) -> Any:
    """Dicts (with `__type__`) become PSCustomObjects; everything else goes as it is.

    A nested object with a `__tostring__` arrives as that string, as PowerShell remoting sends
    nested objects at its default serialization depth."""
    if isinstance(obj, dict):
        props = {
            k: v["__tostring__"] if isinstance(v, dict) and "__tostring__" in v else to_ps(v)
            for k, v in obj.items()
            if k not in ("__type__", "__tostring__")
        }
        type_name = obj.get("__type__")
        if type_name:
            props["PSTypeName"] = type_name
        return PSCustomObject(**props)
    if isinstance(obj, list):
        return [to_ps(o) for o in obj]
    return obj


def select(inv: dispatch.Invocation) -> list[Any]:
    """Select-Object -Property a,b,c: only those properties, type `Selected.<type>`."""
    wanted = inv.get("Property") or []
    if isinstance(wanted, str):
        wanted = [wanted]
    expand = inv.get("ExpandProperty")
    out: list[Any] = []
    for obj in inv.input:
        if not isinstance(obj, dict):
            out.append(obj)
        elif expand:
            out.append(obj.get(str(expand)))  # a nested object comes whole

        elif list(wanted) == ["*"]:
            out.append({**obj, "__type__": f"Selected.{obj.get('__type__', 'System.Object')}"})
        else:
            picked = {str(p): obj.get(str(p)) for p in wanted}
            out.append({"__type__": f"Selected.{obj.get('__type__', 'System.Object')}", **picked})
    return out


def memory_bytes(mb: int) -> PSUInt64:
    return PSUInt64(mb * 1024 * 1024)
