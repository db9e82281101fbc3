"""A stateful fake Hyper-V / VMM cluster (or a fleet of them) with VMM-like semantics and fault
injection.

The world (clusters, hosts, VMs, jobs, faults, operation counts) lives in one SQLite file
(`simdb`), so that separate processes see one fleet. Every public call is one transaction under
the file's lock: it fires the faults a call meets, moves the simulated clock, loads the clusters
it touches (advancing their jobs), applies the call and writes back the rows that changed. The
rules of the simulation are in `simworld` and `simsteps`; scenarios and faults in `simfaults`.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from engine import errors
from workflows.backends import base, simdb, simfaults, simrows, simsteps, simworld

JSON = dict[str, Any]
Clock = Callable[[], float]
T = TypeVar("T")

JOB_HISTORY = simdb.JOB_HISTORY
# The operation kinds `operations()` always reports (other kinds appear once counted).
OPERATIONS = (
    "enter_maintenance",
    "exit_maintenance",
    "reboot_host",
    "live_migrate",
    "move_vm",
    "save_vm",
    "start_vm",
    "shutdown_vm",
)
_HOST_OPS = simfaults.HOST_JOB_OPS
_LISTED_CLUSTERS = 20


def kbs_for(host: str) -> str:
    """The (simulated, deterministic) updates a host installs."""
    return simsteps.kbs_for(host)


class SimulatedCluster:
    """A fake VMM fleet in an SQLite file; implements `base.ClusterBackend` structurally."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        simdb.check(self.path)
        self._db = simdb.Handle(self.path)
        self._mutex = threading.Lock()  # one call at a time on this object's connection

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        scenario: Mapping[str, Any],
        *,
        speed: float = 0.0,
        clock: Clock = time.time,
        job_history: int = JOB_HISTORY,
    ) -> SimulatedCluster:
        """A new world from a scenario (replacing any file at path). `speed` wins when nonzero;
        each cluster keeps its newest `job_history` finished jobs."""
        state = simfaults.build_state(scenario, speed=speed)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        simdb.create(target, state, now=clock(), job_history=job_history)
        return cls(target, clock=clock)

    @classmethod
    def generate(
        cls,
        path: str | os.PathLike[str],
        *,
        hosts: int = 3,
        vms: int = 12,
        non_ha: int = 0,
        stopped_ha: int = 0,
        seed: int = 0,
        speed: float = 0.0,
        cluster: str = "cluster1",
        clusters: int = 1,
        clock: Clock = time.time,
        job_history: int = JOB_HISTORY,
        patch_seconds: simfaults.Range | None = None,
        reboot_seconds: simfaults.Range | None = None,
    ) -> SimulatedCluster:
        """Random clusters, deterministic by seed, each able to lose one node (N-1 fits). One
        cluster is named `cluster` with hosts hv01..; several are cluster1..clusterK with hosts
        c1-hv01.., VMs c1-vm001.. (hosts, vms, non_ha and stopped_ha are per cluster). With
        `patch_seconds` / `reboot_seconds` (low, high) each host gets its own patch and reboot
        time from those ranges (deterministic by seed)."""
        if clusters == 1:
            scenario = simfaults.generate(
                hosts=hosts,
                vms=vms,
                non_ha=non_ha,
                stopped_ha=stopped_ha,
                seed=seed,
                cluster=cluster,
                patch_seconds=patch_seconds,
                reboot_seconds=reboot_seconds,
            )
        else:
            scenario = simfaults.generate_fleet(
                clusters=clusters,
                hosts=hosts,
                vms=vms,
                non_ha=non_ha,
                stopped_ha=stopped_ha,
                seed=seed,
                patch_seconds=patch_seconds,
                reboot_seconds=reboot_seconds,
            )
        return cls.create(path, scenario, speed=speed, clock=clock, job_history=job_history)

    def _call(
        self, op: str | None, action: Callable[[simworld.World], T], *, guarded: bool = True
    ) -> T:
        """Lock, (fire call faults,) tick, act, write back. Refusals are written back too."""
        with self._mutex:
            try:
                return self._transact(op, action, guarded)
            except sqlite3.Error as exc:
                raise simdb.unusable(self.path, exc) from exc

    def _transact(self, op: str | None, action: Callable[[simworld.World], T], guarded: bool) -> T:
        failure: errors.EngineError | None = None
        with self._db.transaction() as conn:
            rows = simrows.Rows(conn, self._db.kept)
            world = simworld.World(rows, self._clock())
            try:
                result = _act(world, op, action, guarded)
            except (errors.BackendError, errors.TransientBackendError) as exc:
                failure = exc
            rows.flush()
        self._db.kept.update(rows.fresh)  # committed: what it wrote is what is stored
        if failure is not None:
            raise failure
        return result

    # ClusterBackend ----------------------------------------------------------------------------

    def inventory(self, cluster: str) -> base.Inventory:
        return self._call("inventory", lambda w: _inventory(w, cluster))

    def storage_health(self, cluster: str) -> base.StorageHealth:
        """The simulator has Storage Spaces Direct only through `storage_repair` faults: each
        read that takes one sees a repair job running on its disk."""
        return self._call(None, _storage)

    def enter_maintenance(self, host: str) -> str:
        return self._call("enter_maintenance", lambda w: w.enter_maintenance(host))

    def exit_maintenance(self, host: str) -> str:
        return self._call("exit_maintenance", lambda w: w.exit_maintenance(host))

    def move_vm(self, vm_id: str, host: str) -> str:
        return self._call("move_vm", lambda w: w.move_vm(vm_id, host))

    def start_vm(self, vm_id: str) -> str:
        return self._call("start_vm", lambda w: w.start_vm(vm_id))

    def save_vm(self, vm_id: str) -> str:
        return self._call("save_vm", lambda w: w.save_vm(vm_id))

    def shutdown_vm(self, vm_id: str) -> str:
        return self._call("shutdown_vm", lambda w: w.shutdown_vm(vm_id))

    def job(self, job_id: str) -> base.Job:
        return self._call("job", lambda w: _job(w, job_id))

    def find_job(self, kind: str, target: str) -> str | None:
        return self._call("find_job", lambda w: _find_job(w, kind, target))

    def interference(self, cluster: str) -> list[str]:
        return self._call("inventory", lambda w: _interference(w, cluster))

    def reboot_in_maintenance(self, host: str) -> str | None:
        """The reboot job that ran on host during its current maintenance window, if any: the
        evidence that a patch already happened there."""
        return self._call("find_job", lambda w: _reboot_in_maintenance(w, host))

    def close(self) -> None:
        """Close this process's connection to the file (the next call opens it again)."""
        with self._mutex:
            self._db.close()

    # simulator only ----------------------------------------------------------------------------

    def reboot_host(self, host: str, *, patch_seconds: float | None = None) -> str:
        """Patch and reboot a host in maintenance; `patch_seconds` None: the host's own patch
        time (`sim init --patch-seconds`), else 60 s."""
        return self._call("reboot_host", lambda w: w.reboot_host(host, patch_seconds))

    def clock(self) -> dict[str, float]:
        """The simulated clock now: `sim_time` (simulated seconds since the world was made) at
        `real_time` (Unix time), and `speed` (simulated seconds per real second, so that the
        clock read at another moment t is sim_time + (t - real_time) * speed)."""
        return self._call(None, _clock)

    def snapshot(self, cluster: str | None = None) -> dict[str, Any]:
        """The `sim show --json` document (without `operations`): every cluster, or one."""
        return self._call(None, lambda w: _snapshot(w, cluster))

    def counts(self) -> dict[str, int]:
        """Every count over the fleet: `op` and `op:target` for each request and effect."""
        return self._call(None, lambda w: _everywhere(w).totals())

    def operations(self, cluster: str | None = None) -> dict[str, int]:
        """Totals per operation kind (no per-target keys) over the fleet, or of one cluster."""
        return self._call(None, lambda w: _operations(w, cluster))

    def overview(self) -> list[dict[str, Any]]:
        """Per cluster: hosts, hosts in maintenance or not Up, VMs, running VMs, requests
        accepted, open jobs and finished jobs kept."""
        return self._call(None, _overview)

    def inject(self, fault: Mapping[str, Any]) -> None:
        checked = simfaults.validate_fault(fault)
        self._call(None, lambda w: _everywhere(w).faults.append(checked))

    def faults(self) -> list[dict[str, Any]]:
        """The faults that have not fired (or not used up their `times`) yet."""
        return self._call(None, lambda w: [dict(f) for f in _everywhere(w).faults])

    def clear_faults(self, kind: str | None = None) -> None:
        """Remove all faults, or all faults of one type (e.g. `auth_fails`)."""
        self._call(None, lambda w: _clear_faults(w, kind))

    def admin_move(self, vm_id: str, host: str) -> None:
        self._call("admin_move", lambda w: w.admin_move(vm_id, host), guarded=False)

    def admin_delete(self, vm_id: str) -> None:
        self._call("admin_delete", lambda w: w.admin_delete(vm_id), guarded=False)

    def admin_set_state(self, vm_id: str, state: base.PowerState) -> None:
        self._call("admin_set_state", lambda w: w.admin_set_state(vm_id, state), guarded=False)

    def set_speed(self, speed: float) -> None:
        if not math.isfinite(speed) or speed < 0:
            raise errors.UsageError(f"speed must be a non-negative number, got {speed!r}")
        self._call(None, lambda w: setattr(_everywhere(w), "speed", float(speed)))


def _storage(world: simworld.World) -> base.StorageHealth:
    faults = world.rows.faults
    fault = simfaults.take(faults, "storage_repair", lambda f: True)
    if fault is None:
        return base.StorageHealth(s2d=any(f["type"] == "storage_repair" for f in faults))
    disk = str(fault.get("disk") or "CSV1")
    return base.StorageHealth(s2d=True, repair_jobs=(f"Repair {disk}",), unhealthy_disks=(disk,))


def _act(
    world: simworld.World, op: str | None, action: Callable[[simworld.World], T], guarded: bool
) -> T:
    if op is not None and guarded:
        simfaults.fire_call_faults(world.rows.faults, op)
    world.tick()
    try:
        return action(world)
    except errors.BackendError:
        if op is not None:
            world.count(f"rejected:{op}")
        raise


def _everywhere(world: simworld.World) -> simrows.Rows:
    """The rows, with every cluster that has an unfinished job advanced to now: what a call that
    is about no cluster in particular (faults, speed, counts) must see and change."""
    world.rows.load_busy()
    return world.rows


def _cluster(world: simworld.World, name: str) -> simrows.Cluster:
    found = world.rows.cluster_named(name)
    if found is None:
        names = world.rows.cluster_names()
        known = ", ".join(names[:_LISTED_CLUSTERS])
        if len(names) > _LISTED_CLUSTERS:
            known += f", ... ({len(names)} in all)"
        raise errors.NotFound(f"unknown cluster {name!r} (clusters: {known})", target=name)
    return found


def _inventory(world: simworld.World, name: str) -> base.Inventory:
    cluster = _cluster(world, name)
    world.count("inventory", cluster=cluster.id)
    hosts = tuple(_host(cluster.name, h) for h in cluster.hosts)
    vms = tuple(
        base.Vm(v["id"], v["name"], v["host"], v["ha"], base.PowerState(v["state"]), v["memory_mb"])
        for v in world.rows.vms_on(*(h.name for h in hosts))
    )
    return base.Inventory(cluster=cluster.name, hosts=hosts, vms=vms)


def _host(cluster: str, h: JSON) -> base.Host:
    state = base.HostState(h["state"])
    return base.Host(
        name=h["name"],
        cluster=cluster,
        memory_mb=h["memory_mb"],
        maintenance=h["maintenance"],
        state=state,
        available_for_placement=not h["maintenance"] and state is base.HostState.UP,
    )


def _job(world: simworld.World, job_id: str) -> base.Job:
    job = world.rows.job(job_id)
    if job is None:
        raise errors.BackendError(f"unknown job {job_id!r}", target=job_id)
    world.count("job", cluster=world.rows.job_cluster[job_id])
    status = base.JobStatus(job["status"])
    return base.Job(job_id, status, job["progress"], job["message"], dict(job["details"]))


def _find_job(world: simworld.World, kind: str, target: str) -> str | None:
    cluster = 0
    if kind in _HOST_OPS:
        host = world.find_host(target)
        if host is not None:
            target, cluster = host["name"], world.cluster_of(host["name"])
    else:
        vm = world.find_vm(target)
        cluster = world.cluster_of(vm["host"]) if vm is not None else 0
    world.count("find_job", cluster=cluster)
    return next((j["id"] for j in world.rows.open_jobs_on(target) if j["kind"] == kind), None)


def _interference(world: simworld.World, name: str) -> list[str]:
    cluster = _cluster(world, name)
    return [
        f"job {job['id']} ({job['kind']} on {job['target']}) is running in cluster {cluster.name}"
        for job in world.rows.open_jobs(cluster.id)
    ]


def _reboot_in_maintenance(world: simworld.World, name: str) -> str | None:
    host = world.find_host(name)
    if host is None or not host["maintenance"]:
        return None
    found = world.rows.reboots[host["name"].lower()]
    job = world.rows.job(found) if found else None
    if job is not None and job["status"] in (base.JobStatus.FAILED, base.JobStatus.CANCELED):
        return None  # a reboot that failed patched nothing: a retry patches again
    return found


def _snapshot(world: simworld.World, name: str | None) -> JSON:
    chosen = [_cluster(world, name)] if name is not None else world.rows.all_clusters()
    clusters = [
        {
            "name": c.name,
            "hosts": [_shown_host(h) for h in c.hosts],
        }
        for c in chosen
    ]
    names = [h["name"] for c in chosen for h in c.hosts]
    return {"clusters": clusters, "vms": [dict(v) for v in world.rows.vms_on(*names)]}


def _clock(world: simworld.World) -> dict[str, float]:
    rows = world.rows
    return {"sim_time": rows.sim_time, "real_time": rows.real_time, "speed": rows.speed}


def _shown_host(host: JSON) -> JSON:
    """A host as `sim show --json` (and a scenario) has it: its own timings only when set."""
    shown = {k: host[k] for k in ("name", "memory_mb", "maintenance", "state")}
    shown.update({k: host[k] for k in simfaults.TIMING_KEYS if host.get(k) is not None})
    return shown


def _operations(world: simworld.World, name: str | None) -> dict[str, int]:
    cid = _cluster(world, name).id if name is not None else None
    return operations_of(_everywhere(world).totals(cid))


def operations_of(counts: Mapping[str, int]) -> dict[str, int]:
    """Totals per operation kind from counts: the usual kinds always, then any other counted."""
    totals = {op: 0 for op in OPERATIONS}
    for key in sorted(counts):
        if ":" not in key:
            totals[key] = totals.get(key, 0) + counts[key]
    return totals


def _overview(world: simworld.World) -> list[JSON]:
    clusters = world.rows.all_clusters()
    counts = world.rows.totals_by_cluster()
    jobs = world.rows.job_totals()
    out = []
    for c in clusters:
        vms = world.rows.vms_on(*(h["name"] for h in c.hosts))
        mine = counts.get(c.id, {})
        opened, kept = jobs.get(c.id, (0, 0))
        out.append(
            {
                "name": c.name,
                "hosts": len(c.hosts),
                "maintenance": sum(bool(h["maintenance"]) for h in c.hosts),
                "not_up": sum(h["state"] != base.HostState.UP for h in c.hosts),
                "vms": len(vms),
                "running": sum(v["state"] == base.PowerState.RUNNING for v in vms),
                "requests": sum(mine.get(op, 0) for op in simfaults.JOB_OPS),
                "open_jobs": opened,
                "finished_jobs": kept,
            }
        )
    return out


def _clear_faults(world: simworld.World, kind: str | None) -> None:
    faults = _everywhere(world).faults
    faults[:] = [f for f in faults if kind is not None and f["type"] != kind]
