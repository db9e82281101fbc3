"""The cluster backend Protocol and the value types every backend speaks.

VMs are identified by ID, never by name. Long operations are asynchronous jobs: a call returns a
job ID at once, and `job(job_id)` reports its progress. Backends raise
`engine.errors.BackendError` for refused operations and `engine.errors.TransientBackendError` for
connection trouble that a retry may cure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class PowerState(enum.StrEnum):
    RUNNING = "Running"
    POWER_OFF = "PowerOff"
    SAVED = "Saved"
    PAUSED = "Paused"


class HostState(enum.StrEnum):
    UP = "Up"
    REBOOTING = "Rebooting"
    DOWN = "Down"


class JobStatus(enum.StrEnum):
    NOT_STARTED = "NotStarted"
    RUNNING = "Running"
    COMPLETED = "Completed"
    SUCCEED_WITH_INFO = "SucceedWithInfo"
    FAILED = "Failed"
    CANCELED = "Canceled"


@dataclass(frozen=True)
class Host:
    name: str
    cluster: str
    memory_mb: int
    maintenance: bool = False
    state: HostState = HostState.UP
    available_for_placement: bool = True

    @property
    def responding(self) -> bool:
        return self.state is HostState.UP


@dataclass(frozen=True)
class Vm:
    id: str
    name: str
    host: str
    ha: bool
    state: PowerState
    memory_mb: int

    @property
    def uses_memory(self) -> bool:
        """Running and paused VMs hold their memory on the host; saved and stopped ones do not."""
        return self.state in (PowerState.RUNNING, PowerState.PAUSED)


@dataclass(frozen=True)
class Inventory:
    cluster: str
    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...]

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name.lower() == name.lower()), None)

    def vm(self, vm_id: str) -> Vm | None:
        return next((v for v in self.vms if v.id == vm_id), None)

    def vms_on(self, host: str) -> tuple[Vm, ...]:
        return tuple(v for v in self.vms if v.host.lower() == host.lower())

    def free_memory_mb(self, host: str) -> int:
        h = self.host(host)
        used = sum(v.memory_mb for v in self.vms_on(host) if v.uses_memory)
        return (h.memory_mb if h else 0) - used


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    progress: int = 0
    message: str = ""
    details: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status not in (JobStatus.NOT_STARTED, JobStatus.RUNNING)

    @property
    def ok(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.SUCCEED_WITH_INFO)


class ClusterBackend(Protocol):
    """What node patching needs from a cluster manager (VMM, Failover Clustering, the simulator)."""

    def inventory(self, cluster: str) -> Inventory:
        """Hosts and VMs of the cluster. Raises BackendError if the cluster is unknown."""
        ...

    def enter_maintenance(self, host: str) -> str:
        """Start draining the host: running HA VMs live-migrate, running non-HA VMs are saved."""
        ...

    def exit_maintenance(self, host: str) -> str:
        """Start taking the host out of maintenance. Moves nothing back."""
        ...

    def move_vm(self, vm_id: str, host: str) -> str:
        """Start moving the VM to host (live if running, quick/storage otherwise)."""
        ...

    def start_vm(self, vm_id: str) -> str:
        """Start a stopped VM or resume a saved or paused one."""
        ...

    def save_vm(self, vm_id: str) -> str:
        """Start saving the VM's state."""
        ...

    def shutdown_vm(self, vm_id: str) -> str:
        """Start a guest shutdown of the VM."""
        ...

    def job(self, job_id: str) -> Job:
        """The job's current status. Raises BackendError if it is unknown."""
        ...

    def find_job(self, kind: str, target: str) -> str | None:
        """The ID of an unfinished job of this kind on this target, if one exists.

        Used to re-attach after a crash between submitting a job and journaling its ID.
        `kind` is one of: enter_maintenance, exit_maintenance, move_vm, start_vm, save_vm,
        shutdown_vm; `target` is a host name or a VM ID.
        """
        ...

    def interference(self, cluster: str) -> list[str]:
        """What else is changing the cluster now (jobs running on its hosts, a Cluster-Aware
        Updating run or its lock), each named: a cycle refuses to start while there is any."""
        ...

    def close(self) -> None: ...
