"""The rules of the simulated cluster: requests become jobs, jobs advance in simulated time.

A `World` works on the rows one call has loaded (`simrows.Rows`). The first time a call touches a
cluster, the cluster's unfinished jobs are advanced to now; the clusters a call does not touch
are left as they are, and catch up (with the same result) when a later call touches them, since
nothing one cluster's jobs do depends on another cluster. Jobs run in simulated time: `speed`
simulated seconds pass per real second, and with `speed == 0` every job completes at the first
advance after it was submitted.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from engine import errors
from workflows.backends import base, simfaults, simrows, simsteps

JSON = dict[str, Any]

_PATCH_SECONDS = 60.0  # a host's patch time, unless the host or the patcher says otherwise
_REBOOT_SECONDS = 120.0  # a host's reboot time, unless the host has its own
_HOST_OPS = simfaults.HOST_JOB_OPS
_OPEN = ("pending", "running")


class World:
    """The loaded rows of one call plus the rules of the simulated cluster."""

    def __init__(self, rows: simrows.Rows, now: float) -> None:
        self.rows = rows
        self.now = now
        rows.on_load = self.advance

    # lookups ----------------------------------------------------------------------------------

    def host(self, name: str) -> JSON:
        found = self.rows.host(name)
        if found is None:
            raise errors.BackendError(f"unknown host {name!r}", target=name)
        return found

    def find_host(self, name: str) -> JSON | None:
        return self.rows.host(name)

    def cluster_of(self, host: str) -> int:
        return self.rows.cluster_of(host)

    def vm(self, vm_id: str) -> JSON:
        found = self.rows.vm(vm_id)
        if found is None:
            raise errors.BackendError(f"unknown VM id {vm_id!r}", target=vm_id)
        return found

    def find_vm(self, vm_id: str) -> JSON | None:
        return self.rows.vm(vm_id)

    def free_mb(self, host: JSON) -> int:
        used = sum(
            v["memory_mb"] for v in self.rows.vms_on(host["name"]) if simsteps.uses_memory(v)
        )
        return int(host["memory_mb"]) - int(used)

    def arrived(self, vm: JSON, cluster: int) -> None:
        """A VM has just started using memory on its host (a migration or move arriving, a
        start): when the host now holds more running-VM memory than it has, count an
        `overcommit` (never refused: the count is what happened)."""
        host = self.find_host(vm["host"])
        if host is not None and simsteps.uses_memory(vm) and self.free_mb(host) < 0:
            self.count("overcommit", host["name"], cluster=cluster)

    def count(self, op: str, target: str | None = None, *, cluster: int = 0) -> None:
        for key in (op, f"{op}:{target}") if target is not None else (op,):
            self.rows.count(key, cluster)

    # refusals ---------------------------------------------------------------------------------

    def require_up(self, host: JSON) -> None:
        if host["state"] != base.HostState.UP:
            raise errors.BackendError(
                f"host {host['name']} is not responding ({host['state']})", target=host["name"]
            )

    def require_placeable(self, host: JSON, vm: JSON, need_mb: int) -> None:
        self.require_up(host)
        if host["maintenance"]:
            raise errors.BackendError(
                f"host {host['name']} is in maintenance mode", target=host["name"]
            )
        if self.free_mb(host) < need_mb:
            raise errors.BackendError(
                f"host {host['name']} has {self.free_mb(host)} MB free; "
                f"VM {vm['name']} needs {need_mb} MB",
                target=host["name"],
            )

    def fits(self, host: JSON, vm: JSON) -> bool:
        """Whether the VM, in its current power state, can be on the host."""
        if vm["host"] == host["name"] or not simsteps.uses_memory(vm):
            return True
        return self.free_mb(host) >= int(vm["memory_mb"])

    def require_no_job(self, kind: str, target: str) -> None:
        for job in self.rows.open_jobs_on(target):
            if job["kind"] == kind or kind not in _HOST_OPS:
                what = "already has a running job" if job["kind"] == kind else "is locked by job"
                raise errors.BackendError(
                    f"{target} {what} {job['id']} ({job['kind']})", target=target
                )

    # time and jobs ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Move the simulated clock to now (jobs advance when their cluster is loaded)."""
        rows = self.rows
        rows.sim_time += max(0.0, self.now - rows.real_time) * rows.speed
        rows.real_time = self.now

    def advance(self, cluster: simrows.Cluster) -> None:
        for job in self.rows.open_jobs(cluster.id):
            self.run(job)

    def elapsed(self, job: JSON) -> float:
        if self.rows.speed == 0:
            return math.inf
        return float(self.rows.sim_time - job["sim_start"])

    def submit(
        self,
        op: str,
        target: str,
        cluster: int,
        steps: list[JSON],
        noop: str | None = None,
        **extra: Any,
    ) -> str:
        """Record an accepted request as a job; `noop` means it is already done (idempotent)."""
        start = 0.0
        for step in steps:
            step.update(start=start, end=start + step.pop("seconds"), state="pending")
            start = step["end"]
        job: JSON = {
            "id": str(uuid.uuid4()),
            "kind": op,
            "target": target,
            "status": base.JobStatus.RUNNING.value,
            "progress": 0,
            "message": f"{op} {target} submitted",
            "details": {},
            "started_at": self.now,
            "sim_start": self.rows.sim_time,
            "duration": start,
            "mode": simfaults.job_mode(self.rows.faults, op, target),
            "steps": steps,
            "info": [],
            **extra,
        }
        self.rows.add_job(cluster, job)
        self.count(op, target, cluster=cluster)
        if noop is not None and job["mode"] == "normal":
            job.update(steps=[], duration=0.0)
            self.conclude(job, noop)
        self.fire_side_faults(op)
        return str(job["id"])

    def run(self, job: JSON) -> None:
        elapsed = self.elapsed(job)
        if job["mode"] == "hang":
            elapsed = min(elapsed, job["duration"] / 2)
        if job["mode"] == "fail":
            if elapsed >= job["duration"]:
                job["status"] = base.JobStatus.FAILED.value
                job["message"] = f"{job['kind']} on {job['target']} failed (simulated fault)"
                job["progress"] = 100
            return
        for step in job["steps"]:
            if step["state"] == "pending" and elapsed >= step["start"]:
                step["state"] = "running"
                simsteps.begin(self, job, step)
            if step["state"] == "running" and elapsed >= step["end"]:
                step["state"] = "done"
                simsteps.end(self, job, step)
            if step["state"] in _OPEN:
                break
        self.set_progress(job, elapsed)
        if job["mode"] != "hang" and not any(s["state"] in _OPEN for s in job["steps"]):
            self.conclude(job, job.get("done", f"{job['kind']} {job['target']} completed"))

    def set_progress(self, job: JSON, elapsed: float) -> None:
        fraction = 0.0 if job["duration"] <= 0 else min(elapsed / job["duration"], 1.0)
        cap = 90 if job["mode"] == "never_returns" else 99
        job["progress"] = min(int(fraction * 100), cap)

    def conclude(self, job: JSON, done_message: str) -> None:
        failures = [s["reason"] for s in job["steps"] if s["state"] == "failed"]
        job["progress"] = 100
        if failures:
            job.update(status=base.JobStatus.FAILED.value, message="; ".join(failures))
        elif job["info"]:
            job.update(
                status=base.JobStatus.SUCCEED_WITH_INFO.value,
                message=f"{done_message}; {'; '.join(job['info'])}",
            )
        else:
            job.update(status=base.JobStatus.COMPLETED.value, message=done_message)

    # faults -----------------------------------------------------------------------------------

    def fire_side_faults(self, op: str) -> None:
        """Someone else acts on a VM because a request of op `on` was accepted."""
        for f in simfaults.take_side_effects(self.rows.faults, op):
            if self.find_vm(f["vm"]) is None:
                continue
            if f["type"] == "delete_vm":
                self.admin_delete(f["vm"])
            elif f["type"] == "move_vm" and self.find_host(f["to"]):
                self.admin_move(f["vm"], f["to"])
            elif f["type"] == "set_state":
                self.admin_set_state(f["vm"], base.PowerState(f["state"]))

    # someone else -----------------------------------------------------------------------------

    def admin_move(self, vm_id: str, host: str) -> None:
        vm, target = self.vm(vm_id), self.host(host)
        cluster = self.cluster_of(vm["host"])
        vm["host"] = target["name"]
        self.count("admin_move", vm_id, cluster=cluster)
        self.arrived(vm, cluster)

    def admin_delete(self, vm_id: str) -> None:
        cluster = self.cluster_of(self.vm(vm_id)["host"])
        self.rows.delete_vm(vm_id)
        self.count("admin_delete", vm_id, cluster=cluster)

    def admin_set_state(self, vm_id: str, state: base.PowerState) -> None:
        vm = self.vm(vm_id)
        was_using = simsteps.uses_memory(vm)
        vm["state"] = base.PowerState(state).value
        self.count("admin_set_state", vm_id, cluster=self.cluster_of(vm["host"]))
        if not was_using:
            self.arrived(vm, self.cluster_of(vm["host"]))

    # requests ---------------------------------------------------------------------------------

    def enter_maintenance(self, name: str) -> str:
        host = self.host(name)
        self.require_up(host)
        self.require_no_job("enter_maintenance", host["name"])
        cluster = self.cluster_of(host["name"])
        if host["maintenance"]:
            job_id = self.submit(
                "enter_maintenance",
                host["name"],
                cluster,
                [],
                noop=f"host {host['name']} is already in maintenance mode",
            )
        else:
            steps = [
                self.drain_step(vm)
                for vm in self.rows.vms_on(host["name"])
                if simsteps.uses_memory(vm)
            ]
            steps.append({"action": "maintenance", "seconds": 2.0})
            done = f"host {host['name']} is in maintenance mode"
            job_id = self.submit("enter_maintenance", host["name"], cluster, steps, done=done)
        self.rows.reboots[host["name"].lower()] = None  # a new maintenance window
        return job_id

    @staticmethod
    def drain_step(vm: JSON) -> JSON:
        if vm["ha"]:
            return {"action": "migrate", "vm": vm["id"], "seconds": 2 + 2 * simsteps.gib(vm)}
        return {"action": "drain_save", "vm": vm["id"], "seconds": 3 + simsteps.gib(vm)}

    def exit_maintenance(self, name: str) -> str:
        host = self.host(name)
        self.require_up(host)
        self.require_no_job("exit_maintenance", host["name"])
        noop = None if host["maintenance"] else f"host {host['name']} is not in maintenance mode"
        steps = [{"action": "exit", "seconds": 5.0}]
        done = f"host {host['name']} left maintenance mode"
        cluster = self.cluster_of(host["name"])
        return self.submit("exit_maintenance", host["name"], cluster, steps, noop=noop, done=done)

    def reboot_host(self, name: str, patch_seconds: float | None) -> str:
        """Patch then reboot a host in maintenance: `patch_seconds` when given, else the host's
        own patch time (else 60 s), then the host's own reboot time (else 120 s)."""
        host = self.host(name)
        self.require_up(host)
        if not host["maintenance"]:
            raise errors.BackendError(
                f"host {host['name']} must be in maintenance mode to reboot", target=host["name"]
            )
        self.require_no_job("reboot_host", host["name"])
        if patch_seconds is None:
            patch_seconds = _own(host, "patch_seconds", _PATCH_SECONDS)
        steps = [
            {"action": "patch", "seconds": max(0.0, patch_seconds)},
            {"action": "boot", "seconds": _own(host, "reboot_seconds", _REBOOT_SECONDS)},
        ]
        done = f"host {host['name']} patched and back up"
        cluster = self.cluster_of(host["name"])
        details = {"host": host["name"], "kbs": simsteps.kbs_for(host["name"]), "reboot": "true"}
        job_id = self.submit(
            "reboot_host", host["name"], cluster, steps, done=done, details=details
        )
        self.rows.reboots[host["name"].lower()] = job_id  # the evidence of this window's patch
        return job_id

    def vm_for_request(self, op: str, vm_id: str) -> JSON:
        vm = self.vm(vm_id)
        self.require_up(self.host(vm["host"]))
        self.require_no_job(op, vm_id)
        return vm

    def move_vm(self, vm_id: str, name: str) -> str:
        vm = self.vm_for_request("move_vm", vm_id)
        target = self.host(name)
        cluster = self.cluster_of(vm["host"])
        if self.cluster_of(target["name"]) != cluster:
            raise errors.BackendError(
                f"host {target['name']} is not in the cluster of VM {vm['name']}", target=vm_id
            )
        moving_memory = simsteps.uses_memory(vm) and vm["host"] != target["name"]
        self.require_placeable(target, vm, vm["memory_mb"] if moving_memory else 0)
        noop = (
            f"VM {vm['name']} is already on {target['name']}"
            if vm["host"] == target["name"]
            else None
        )
        if not simsteps.uses_memory(vm):
            seconds = 5.0
        else:
            seconds = 2 + 2 * simsteps.gib(vm) if vm["ha"] else 10 + 10 * simsteps.gib(vm)
        steps = [{"action": "move", "vm": vm_id, "to": target["name"], "seconds": seconds}]
        done = f"VM {vm['name']} moved to {target['name']}"
        return self.submit("move_vm", vm_id, cluster, steps, noop=noop, done=done)

    def start_vm(self, vm_id: str) -> str:
        vm = self.vm_for_request("start_vm", vm_id)
        host = self.host(vm["host"])
        if vm["state"] == base.PowerState.RUNNING:
            noop = f"VM {vm['name']} is already running"
            return self.submit("start_vm", vm_id, self.cluster_of(host["name"]), [], noop=noop)
        self.require_placeable(host, vm, 0 if simsteps.uses_memory(vm) else vm["memory_mb"])
        seconds = {"PowerOff": 8.0, "Saved": 3 + simsteps.gib(vm), "Paused": 1.0}[vm["state"]]
        return self.power(vm, "start_vm", base.PowerState.RUNNING, seconds)

    def save_vm(self, vm_id: str) -> str:
        vm = self.vm_for_request("save_vm", vm_id)
        if vm["state"] == base.PowerState.POWER_OFF:
            raise errors.BackendError(
                f"VM {vm['name']} is powered off and cannot be saved", target=vm_id
            )
        return self.power(vm, "save_vm", base.PowerState.SAVED, 3 + simsteps.gib(vm))

    def shutdown_vm(self, vm_id: str) -> str:
        vm = self.vm_for_request("shutdown_vm", vm_id)
        if vm["state"] in (base.PowerState.SAVED, base.PowerState.PAUSED):
            raise errors.BackendError(
                f"VM {vm['name']} is {vm['state']}; its guest cannot shut down", target=vm_id
            )
        return self.power(vm, "shutdown_vm", base.PowerState.POWER_OFF, 10.0)

    def power(self, vm: JSON, op: str, state: base.PowerState, seconds: float) -> str:
        noop = f"VM {vm['name']} is already {state.value}" if vm["state"] == state else None
        steps = [{"action": "power", "vm": vm["id"], "to": state.value, "seconds": seconds}]
        done = f"VM {vm['name']} is {state.value}"
        cluster = self.cluster_of(vm["host"])
        return self.submit(op, vm["id"], cluster, steps, noop=noop, done=done)


def _own(host: JSON, key: str, default: float) -> float:
    value = host.get(key)
    return default if value is None else float(value)
