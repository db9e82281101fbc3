"""The steps of the simulated cluster's jobs: what happens when a step begins and when it ends."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workflows.backends import base, simfaults

if TYPE_CHECKING:
    from workflows.backends.simworld import World

JSON = dict[str, Any]
Step = Callable[["World", JSON, JSON], None]

_KBS = ("KB5031364", "KB5032189", "KB5033118", "KB5034129", "KB5034439", "KB5035857")


def kbs_for(host: str) -> str:
    """The (simulated, deterministic) updates a host installs."""
    rng = random.Random(zlib.crc32(host.lower().encode("utf-8", "surrogatepass")))
    return ",".join(sorted(rng.sample(_KBS, 2)))


def uses_memory(vm: JSON) -> bool:
    return vm["state"] in (base.PowerState.RUNNING, base.PowerState.PAUSED)


def gib(vm: JSON) -> float:
    return float(vm["memory_mb"]) / 1024


def begin(world: World, job: JSON, step: JSON) -> None:
    _BEGIN.get(step["action"], _nothing)(world, job, step)


def end(world: World, job: JSON, step: JSON) -> None:
    _END[step["action"]](world, job, step)


def _nothing(world: World, job: JSON, step: JSON) -> None:
    """A step with no visible start."""


def _fail_step(step: JSON, reason: str) -> None:
    step.update(state="failed", reason=reason)


def _vm_label(world: World, vm_id: str) -> str:
    vm = world.find_vm(vm_id)
    return f"{vm['name']} ({vm_id})" if vm else vm_id


def _drain_target(world: World, job: JSON, vm: JSON) -> JSON | None:
    """The Up, placeable host of the same cluster with the most free memory that fits the VM."""
    cluster = world.rows.clusters[world.cluster_of(job["target"])]
    draining = {
        j["target"] for j in world.rows.open_jobs(cluster.id) if j["kind"] == "enter_maintenance"
    }
    candidates = [
        h
        for h in cluster.hosts
        if h["name"] not in draining
        and h["state"] == base.HostState.UP
        and not h["maintenance"]
        and world.free_mb(h) >= vm["memory_mb"]
    ]
    return max(candidates, key=world.free_mb, default=None)


def _begin_migrate(world: World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    if vm is None or vm["host"] != job["target"] or not uses_memory(vm):
        step["state"] = "skipped"
        return
    target = _drain_target(world, job, vm)
    if target is None:
        _fail_step(
            step, f"no host has {vm['memory_mb']} MB free for VM {_vm_label(world, vm['id'])}"
        )
        return
    step["to"] = target["name"]
    job["message"] = f"migrating {vm['name']} to {target['name']}"


def _end_migrate(world: World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    if vm is None or vm["host"] != job["target"]:
        step["state"] = "skipped"
        return
    target = world.find_host(step["to"])
    if (
        target is None
        or target["state"] != base.HostState.UP
        or target["maintenance"]
        or not world.fits(target, vm)
    ):
        target = _drain_target(world, job, vm)
    if simfaults.migration_fails(world.rows.faults, vm["id"]) or target is None:
        _fail_step(step, f"live migration of VM {_vm_label(world, vm['id'])} failed")
        return
    vm["host"] = target["name"]
    cluster = world.rows.job_cluster[job["id"]]
    world.count("live_migrate", vm["id"], cluster=cluster)
    world.arrived(vm, cluster)


def _begin_drain_save(world: World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    job["message"] = f"saving non-HA VM {vm['name'] if vm else step['vm']}"


def _end_drain_save(world: World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    if vm is None or vm["host"] != job["target"] or not uses_memory(vm):
        step["state"] = "skipped"
        return
    vm["state"] = base.PowerState.SAVED.value
    saved = job["details"].get("saved_vms")
    job["details"]["saved_vms"] = f"{saved},{vm['id']}" if saved else vm["id"]
    job["info"].append(f"non-HA VM {vm['name']} was saved")


def _end_maintenance(world: World, job: JSON, step: JSON) -> None:
    if not any(s["state"] == "failed" for s in job["steps"]):
        world.host(job["target"])["maintenance"] = True
        job["message"] = f"host {job['target']} entered maintenance mode"


def _end_exit(world: World, job: JSON, step: JSON) -> None:
    world.host(job["target"])["maintenance"] = False


def _begin_move(world: World, job: JSON, step: JSON) -> None:
    job["message"] = f"migrating {_vm_label(world, step['vm'])} to {step['to']}"


def _end_move(world: World, job: JSON, step: JSON) -> None:
    vm, target = world.find_vm(step["vm"]), world.find_host(step["to"])
    if vm is None or target is None:
        _fail_step(step, f"VM {step['vm']} or host {step['to']} no longer exists")
    elif simfaults.migration_fails(world.rows.faults, vm["id"]):
        _fail_step(step, f"live migration of VM {_vm_label(world, vm['id'])} failed")
    elif target["state"] != base.HostState.UP or target["maintenance"]:
        _fail_step(
            step, f"host {target['name']} can no longer take VM {_vm_label(world, vm['id'])}"
        )
    else:  # memory was checked when the move was asked for; short now, it is an overcommit
        vm["host"] = target["name"]
        world.arrived(vm, world.rows.job_cluster[job["id"]])


def _end_power(world: World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    if vm is None:
        _fail_step(step, f"VM {step['vm']} no longer exists")
        return
    was_using = uses_memory(vm)
    vm["state"] = step["to"]
    if not was_using:
        world.arrived(vm, world.rows.job_cluster[job["id"]])


def _begin_patch(world: World, job: JSON, step: JSON) -> None:
    job["message"] = f"installing {kbs_for(job['target'])} on {job['target']}"


def _end_patch(world: World, job: JSON, step: JSON) -> None:
    host = world.host(job["target"])
    host["state"] = base.HostState.REBOOTING.value
    for vm in world.rows.vms_on(host["name"]):
        if uses_memory(vm):
            vm["state"] = base.PowerState.SAVED.value
            job["info"].append(f"VM {vm['name']} was saved by the reboot")
    job["message"] = f"rebooting {host['name']}"


def _end_boot(world: World, job: JSON, step: JSON) -> None:
    host = world.host(job["target"])
    if job["mode"] == "never_returns":
        step["state"] = "running"
        job["message"] = f"waiting for {host['name']} to respond after reboot"
        return
    host["state"] = base.HostState.UP.value


_BEGIN: dict[str, Step] = {
    "migrate": _begin_migrate,
    "drain_save": _begin_drain_save,
    "move": _begin_move,
    "patch": _begin_patch,
}
_END: dict[str, Step] = {
    "migrate": _end_migrate,
    "drain_save": _end_drain_save,
    "maintenance": _end_maintenance,
    "exit": _end_exit,
    "move": _end_move,
    "power": _end_power,
    "patch": _end_patch,
    "boot": _end_boot,
}
