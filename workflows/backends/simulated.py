"""A stateful fake Hyper-V / VMM cluster with VMM-like semantics and fault injection.

The whole world (hosts, VMs, jobs, faults, operation counts) lives in one JSON file, so separate
processes see one cluster. Every public call takes an exclusive `flock` on `<file>.lock`, loads
the file, advances the world (running jobs make progress), applies the call and writes the file
atomically. Jobs run in simulated time: `speed` simulated seconds pass per real second, and with
`speed == 0` every job completes at the first world-advance after it was submitted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from engine import errors
from workflows.backends import base, simfaults

JSON = dict[str, Any]
Clock = Callable[[], float]
T = TypeVar("T")

_REBOOT_SECONDS = 120.0
_KBS = ("KB5031364", "KB5032189", "KB5033118", "KB5034129", "KB5034439", "KB5035857")
_HOST_OPS = simfaults.HOST_JOB_OPS
_OPEN = ("pending", "running")


def _gib(vm: JSON) -> float:
    return float(vm["memory_mb"]) / 1024


def _uses_memory(vm: JSON) -> bool:
    return vm["state"] in (base.PowerState.RUNNING, base.PowerState.PAUSED)


def _finished(job: JSON) -> bool:
    return job["status"] not in (base.JobStatus.NOT_STARTED, base.JobStatus.RUNNING)


def kbs_for(host: str) -> str:
    """The (simulated, deterministic) updates a host installs."""
    rng = random.Random(zlib.crc32(host.lower().encode("utf-8", "surrogatepass")))
    return ",".join(sorted(rng.sample(_KBS, 2)))


# -- the file -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _load(path: Path) -> JSON:
    try:
        with path.open(encoding="utf-8") as f:
            state: JSON = json.load(f)
    except FileNotFoundError:
        raise errors.BackendError(
            f"no simulated cluster at {path}; run `nodepatch sim init`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.BackendError(f"corrupt simulated cluster file {path}: {exc}") from exc
    return state


def _check_file(path: Path) -> None:
    """The file is a simulated cluster's state, or UsageError naming it and what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise errors.UsageError(
            f"no simulated cluster at {path}; create one with `nodepatch sim init --file {path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise errors.UsageError(f"cannot read simulated cluster file {path}: {reason}") from None
    try:
        simfaults.check_state(json.loads(text))
    except json.JSONDecodeError as exc:
        raise errors.UsageError(f"simulated cluster file {path} is not valid JSON: {exc}") from None
    except errors.UsageError as exc:
        raise errors.UsageError(f"simulated cluster file {path}: {exc}") from None


def _save(path: Path, state: JSON) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the world ----------------------------------------------------------------------------------


class _World:
    """One loaded state document plus the rules of the simulated cluster."""

    def __init__(self, state: JSON, now: float) -> None:
        self.state = state
        self.now = now

    # lookups ----------------------------------------------------------------------------------

    def hosts(self) -> Iterator[tuple[str, JSON]]:
        for cluster in self.state["clusters"]:
            for host in cluster["hosts"]:
                yield cluster["name"], host

    def host(self, name: str) -> JSON:
        found = self.find_host(name)
        if found is None:
            raise errors.BackendError(f"unknown host {name!r}", target=name)
        return found

    def find_host(self, name: str) -> JSON | None:
        return next((h for _, h in self.hosts() if h["name"].lower() == name.lower()), None)

    def cluster_of(self, host: str) -> str:
        return next(c for c, h in self.hosts() if h["name"].lower() == host.lower())

    def vm(self, vm_id: str) -> JSON:
        found = self.find_vm(vm_id)
        if found is None:
            raise errors.BackendError(f"unknown VM id {vm_id!r}", target=vm_id)
        return found

    def find_vm(self, vm_id: str) -> JSON | None:
        return next((v for v in self.state["vms"] if v["id"] == vm_id), None)

    def free_mb(self, host: JSON) -> int:
        used = sum(
            v["memory_mb"]
            for v in self.state["vms"]
            if v["host"] == host["name"] and _uses_memory(v)
        )
        return int(host["memory_mb"]) - int(used)

    def open_jobs(self) -> Iterator[JSON]:
        return (j for j in self.state["jobs"].values() if not _finished(j))

    def count(self, op: str, target: str | None = None) -> None:
        counts = self.state["counts"]
        for key in (op, f"{op}:{target}") if target is not None else (op,):
            counts[key] = counts.get(key, 0) + 1

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
        if vm["host"] == host["name"] or not _uses_memory(vm):
            return True
        return self.free_mb(host) >= int(vm["memory_mb"])

    def require_no_job(self, kind: str, target: str) -> None:
        for job in self.open_jobs():
            if job["target"] == target and (job["kind"] == kind or kind not in _HOST_OPS):
                what = "already has a running job" if job["kind"] == kind else "is locked by job"
                raise errors.BackendError(
                    f"{target} {what} {job['id']} ({job['kind']})", target=target
                )

    # time and jobs ----------------------------------------------------------------------------

    def advance(self) -> None:
        last = float(self.state.get("real_time", self.now))
        self.state["sim_time"] = (
            self.state.get("sim_time", 0.0) + max(0.0, self.now - last) * self.state["speed"]
        )
        self.state["real_time"] = self.now
        for job in list(self.open_jobs()):
            self.run(job)

    def elapsed(self, job: JSON) -> float:
        if self.state["speed"] == 0:
            return math.inf
        return float(self.state["sim_time"] - job["sim_start"])

    def submit(
        self, op: str, target: str, steps: list[JSON], noop: str | None = None, **extra: Any
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
            "sim_start": self.state.get("sim_time", 0.0),
            "duration": start,
            "mode": simfaults.job_mode(self.state["faults"], op, target),
            "steps": steps,
            "info": [],
            **extra,
        }
        self.state["jobs"][job["id"]] = job
        self.count(op, target)
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
                _BEGIN.get(step["action"], _nothing)(self, job, step)
            if step["state"] == "running" and elapsed >= step["end"]:
                step["state"] = "done"
                _END[step["action"]](self, job, step)
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
        for f in simfaults.take_side_effects(self.state["faults"], op):
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
        vm["host"] = target["name"]
        self.count("admin_move", vm_id)

    def admin_delete(self, vm_id: str) -> None:
        self.state["vms"].remove(self.vm(vm_id))
        self.count("admin_delete", vm_id)

    def admin_set_state(self, vm_id: str, state: base.PowerState) -> None:
        self.vm(vm_id)["state"] = base.PowerState(state).value
        self.count("admin_set_state", vm_id)

    # requests ---------------------------------------------------------------------------------

    def enter_maintenance(self, name: str) -> str:
        host = self.host(name)
        self.require_up(host)
        self.require_no_job("enter_maintenance", host["name"])
        if host["maintenance"]:
            return self.submit(
                "enter_maintenance",
                host["name"],
                [],
                noop=f"host {host['name']} is already in maintenance mode",
            )
        steps = [
            self.drain_step(vm)
            for vm in self.state["vms"]
            if vm["host"] == host["name"] and _uses_memory(vm)
        ]
        steps.append({"action": "maintenance", "seconds": 2.0})
        done = f"host {host['name']} is in maintenance mode"
        return self.submit("enter_maintenance", host["name"], steps, done=done)

    @staticmethod
    def drain_step(vm: JSON) -> JSON:
        if vm["ha"]:
            return {"action": "migrate", "vm": vm["id"], "seconds": 2 + 2 * _gib(vm)}
        return {"action": "drain_save", "vm": vm["id"], "seconds": 3 + _gib(vm)}

    def exit_maintenance(self, name: str) -> str:
        host = self.host(name)
        self.require_up(host)
        self.require_no_job("exit_maintenance", host["name"])
        noop = None if host["maintenance"] else f"host {host['name']} is not in maintenance mode"
        steps = [{"action": "exit", "seconds": 5.0}]
        done = f"host {host['name']} left maintenance mode"
        return self.submit("exit_maintenance", host["name"], steps, noop=noop, done=done)

    def reboot_host(self, name: str, patch_seconds: float) -> str:
        host = self.host(name)
        self.require_up(host)
        if not host["maintenance"]:
            raise errors.BackendError(
                f"host {host['name']} must be in maintenance mode to reboot", target=host["name"]
            )
        self.require_no_job("reboot_host", host["name"])
        steps = [
            {"action": "patch", "seconds": max(0.0, patch_seconds)},
            {"action": "boot", "seconds": _REBOOT_SECONDS},
        ]
        job_id = self.submit(
            "reboot_host", host["name"], steps, done=f"host {host['name']} patched and back up"
        )
        self.state["jobs"][job_id]["details"] = {
            "host": host["name"],
            "kbs": kbs_for(host["name"]),
            "reboot": "true",
        }
        return job_id

    def vm_for_request(self, op: str, vm_id: str) -> JSON:
        vm = self.vm(vm_id)
        self.require_up(self.host(vm["host"]))
        self.require_no_job(op, vm_id)
        return vm

    def move_vm(self, vm_id: str, name: str) -> str:
        vm = self.vm_for_request("move_vm", vm_id)
        target = self.host(name)
        if self.cluster_of(target["name"]) != self.cluster_of(vm["host"]):
            raise errors.BackendError(
                f"host {target['name']} is not in the cluster of VM {vm['name']}", target=vm_id
            )
        moving_memory = _uses_memory(vm) and vm["host"] != target["name"]
        self.require_placeable(target, vm, vm["memory_mb"] if moving_memory else 0)
        noop = (
            f"VM {vm['name']} is already on {target['name']}"
            if vm["host"] == target["name"]
            else None
        )
        if not _uses_memory(vm):
            seconds = 5.0
        else:
            seconds = 2 + 2 * _gib(vm) if vm["ha"] else 10 + 10 * _gib(vm)
        steps = [{"action": "move", "vm": vm_id, "to": target["name"], "seconds": seconds}]
        return self.submit(
            "move_vm", vm_id, steps, noop=noop, done=f"VM {vm['name']} moved to {target['name']}"
        )

    def start_vm(self, vm_id: str) -> str:
        vm = self.vm_for_request("start_vm", vm_id)
        host = self.host(vm["host"])
        if vm["state"] == base.PowerState.RUNNING:
            return self.submit("start_vm", vm_id, [], noop=f"VM {vm['name']} is already running")
        self.require_placeable(host, vm, 0 if _uses_memory(vm) else vm["memory_mb"])
        seconds = {"PowerOff": 8.0, "Saved": 3 + _gib(vm), "Paused": 1.0}[vm["state"]]
        return self.power(vm, "start_vm", base.PowerState.RUNNING, seconds)

    def save_vm(self, vm_id: str) -> str:
        vm = self.vm_for_request("save_vm", vm_id)
        if vm["state"] == base.PowerState.POWER_OFF:
            raise errors.BackendError(
                f"VM {vm['name']} is powered off and cannot be saved", target=vm_id
            )
        return self.power(vm, "save_vm", base.PowerState.SAVED, 3 + _gib(vm))

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
        return self.submit(op, vm["id"], steps, noop=noop, done=f"VM {vm['name']} is {state.value}")


# -- job steps: what happens when a step begins and when it ends --------------------------------

Step = Callable[[_World, JSON, JSON], None]


def _nothing(world: _World, job: JSON, step: JSON) -> None:
    """A step with no visible start."""


def _fail_step(step: JSON, reason: str) -> None:
    step.update(state="failed", reason=reason)


def _vm_label(world: _World, vm_id: str) -> str:
    vm = world.find_vm(vm_id)
    return f"{vm['name']} ({vm_id})" if vm else vm_id


def _drain_target(world: _World, job: JSON, vm: JSON) -> JSON | None:
    """The Up, placeable host of the same cluster with the most free memory that fits the VM."""
    draining = {j["target"] for j in world.open_jobs() if j["kind"] == "enter_maintenance"}
    cluster = world.cluster_of(job["target"])
    candidates = [
        h
        for c, h in world.hosts()
        if c == cluster
        and h["name"] not in draining
        and h["state"] == base.HostState.UP
        and not h["maintenance"]
        and world.free_mb(h) >= vm["memory_mb"]
    ]
    return max(candidates, key=world.free_mb, default=None)


def _begin_migrate(world: _World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    if vm is None or vm["host"] != job["target"] or not _uses_memory(vm):
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


def _end_migrate(world: _World, job: JSON, step: JSON) -> None:
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
    if simfaults.migration_fails(world.state["faults"], vm["id"]) or target is None:
        _fail_step(step, f"live migration of VM {_vm_label(world, vm['id'])} failed")
        return
    vm["host"] = target["name"]
    world.count("live_migrate", vm["id"])


def _begin_drain_save(world: _World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    job["message"] = f"saving non-HA VM {vm['name'] if vm else step['vm']}"


def _end_drain_save(world: _World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    if vm is None or vm["host"] != job["target"] or not _uses_memory(vm):
        step["state"] = "skipped"
        return
    vm["state"] = base.PowerState.SAVED.value
    saved = job["details"].get("saved_vms")
    job["details"]["saved_vms"] = f"{saved},{vm['id']}" if saved else vm["id"]
    job["info"].append(f"non-HA VM {vm['name']} was saved")


def _end_maintenance(world: _World, job: JSON, step: JSON) -> None:
    if not any(s["state"] == "failed" for s in job["steps"]):
        world.host(job["target"])["maintenance"] = True
        job["message"] = f"host {job['target']} entered maintenance mode"


def _end_exit(world: _World, job: JSON, step: JSON) -> None:
    world.host(job["target"])["maintenance"] = False


def _begin_move(world: _World, job: JSON, step: JSON) -> None:
    job["message"] = f"migrating {_vm_label(world, step['vm'])} to {step['to']}"


def _end_move(world: _World, job: JSON, step: JSON) -> None:
    vm, target = world.find_vm(step["vm"]), world.find_host(step["to"])
    if vm is None or target is None:
        _fail_step(step, f"VM {step['vm']} or host {step['to']} no longer exists")
    elif simfaults.migration_fails(world.state["faults"], vm["id"]):
        _fail_step(step, f"live migration of VM {_vm_label(world, vm['id'])} failed")
    elif (
        target["state"] != base.HostState.UP or target["maintenance"] or not world.fits(target, vm)
    ):
        _fail_step(
            step, f"host {target['name']} can no longer take VM {_vm_label(world, vm['id'])}"
        )
    else:
        vm["host"] = target["name"]


def _end_power(world: _World, job: JSON, step: JSON) -> None:
    vm = world.find_vm(step["vm"])
    if vm is None:
        _fail_step(step, f"VM {step['vm']} no longer exists")
        return
    vm["state"] = step["to"]


def _begin_patch(world: _World, job: JSON, step: JSON) -> None:
    job["message"] = f"installing {kbs_for(job['target'])} on {job['target']}"


def _end_patch(world: _World, job: JSON, step: JSON) -> None:
    host = world.host(job["target"])
    host["state"] = base.HostState.REBOOTING.value
    for vm in world.state["vms"]:
        if vm["host"] == host["name"] and _uses_memory(vm):
            vm["state"] = base.PowerState.SAVED.value
            job["info"].append(f"VM {vm['name']} was saved by the reboot")
    job["message"] = f"rebooting {host['name']}"


def _end_boot(world: _World, job: JSON, step: JSON) -> None:
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


# -- the public class ---------------------------------------------------------------------------


class SimulatedCluster:
    """A fake VMM cluster in a JSON file; implements `base.ClusterBackend` structurally."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        _check_file(self.path)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        scenario: Mapping[str, Any],
        *,
        speed: float = 0.0,
        clock: Clock = time.time,
    ) -> SimulatedCluster:
        """A new cluster from a scenario (replacing any file at path). `speed` wins when nonzero."""
        state = simfaults.build_state(scenario, speed=speed)
        state.update(sim_time=0.0, real_time=clock())
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target):
            _save(target, state)
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
        clock: Clock = time.time,
    ) -> SimulatedCluster:
        """A random cluster, deterministic by seed, that can lose one node (N-1 fits)."""
        scenario = simfaults.generate(
            hosts=hosts, vms=vms, non_ha=non_ha, stopped_ha=stopped_ha, seed=seed, cluster=cluster
        )
        return cls.create(path, scenario, speed=speed, clock=clock)

    def _call(self, op: str | None, action: Callable[[_World], T], *, guarded: bool = True) -> T:
        """Lock, load, (fire call faults,) advance, act, save. Refusals are saved too."""
        with _locked(self.path):
            world = _World(_load(self.path), self._clock())
            try:
                if op is not None and guarded:
                    simfaults.fire_call_faults(world.state["faults"], op)
            except (errors.BackendError, errors.TransientBackendError):
                _save(self.path, world.state)
                raise
            world.advance()
            try:
                result = action(world)
            except errors.BackendError:
                if op is not None:
                    world.count(f"rejected:{op}")
                _save(self.path, world.state)
                raise
            _save(self.path, world.state)
            return result

    # ClusterBackend ----------------------------------------------------------------------------

    def inventory(self, cluster: str) -> base.Inventory:
        return self._call("inventory", lambda w: _inventory(w, cluster))

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

    def reboot_in_maintenance(self, host: str) -> str | None:
        """The reboot job that ran on host during its current maintenance window, if any: the
        evidence that a patch already happened there."""
        return self._call("find_job", lambda w: _reboot_in_maintenance(w, host))

    def close(self) -> None:
        """Nothing to release: every call opens and closes the file."""

    # simulator only ----------------------------------------------------------------------------

    def reboot_host(self, host: str, *, patch_seconds: float = 60.0) -> str:
        return self._call("reboot_host", lambda w: w.reboot_host(host, patch_seconds))

    def snapshot(self) -> dict[str, Any]:
        return self._call(None, _snapshot)

    def counts(self) -> dict[str, int]:
        return self._call(None, lambda w: dict(w.state["counts"]))

    def inject(self, fault: Mapping[str, Any]) -> None:
        checked = simfaults.validate_fault(fault)
        self._call(None, lambda w: w.state["faults"].append(checked))

    def faults(self) -> list[dict[str, Any]]:
        """The faults that have not fired (or not used up their `times`) yet."""
        return self._call(None, lambda w: [dict(f) for f in w.state["faults"]])

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
        self._call(None, lambda w: w.state.update(speed=float(speed)))


def _inventory(world: _World, cluster: str) -> base.Inventory:
    found = next((c for c in world.state["clusters"] if c["name"].lower() == cluster.lower()), None)
    if found is None:
        known = ", ".join(c["name"] for c in world.state["clusters"])
        raise errors.NotFound(f"unknown cluster {cluster!r} (clusters: {known})", target=cluster)
    world.count("inventory")
    hosts = tuple(_host(found["name"], h) for h in found["hosts"])
    names = {h.name for h in hosts}
    vms = tuple(
        base.Vm(v["id"], v["name"], v["host"], v["ha"], base.PowerState(v["state"]), v["memory_mb"])
        for v in world.state["vms"]
        if v["host"] in names
    )
    return base.Inventory(cluster=found["name"], hosts=hosts, vms=vms)


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


def _job(world: _World, job_id: str) -> base.Job:
    job = world.state["jobs"].get(job_id)
    if job is None:
        raise errors.BackendError(f"unknown job {job_id!r}", target=job_id)
    world.count("job")
    status = base.JobStatus(job["status"])
    return base.Job(job_id, status, job["progress"], job["message"], dict(job["details"]))


def _find_job(world: _World, kind: str, target: str) -> str | None:
    world.count("find_job")
    if kind in _HOST_OPS:
        host = world.find_host(target)
        target = host["name"] if host else target
    return next(
        (j["id"] for j in world.open_jobs() if j["kind"] == kind and j["target"] == target), None
    )


def _reboot_in_maintenance(world: _World, name: str) -> str | None:
    host = world.find_host(name)
    if host is None or not host["maintenance"]:
        return None
    found: str | None = None
    for job in world.state["jobs"].values():  # in submission order
        if job["target"] != host["name"]:
            continue
        if job["kind"] == "enter_maintenance":
            found = None
        elif job["kind"] == "reboot_host":
            found = job["id"]
    return found


def _snapshot(world: _World) -> JSON:
    clusters = [
        {"name": c["name"], "hosts": [dict(h) for h in c["hosts"]]} for c in world.state["clusters"]
    ]
    return {"clusters": clusters, "vms": [dict(v) for v in world.state["vms"]]}


def _clear_faults(world: _World, kind: str | None) -> None:
    world.state["faults"] = [
        f for f in world.state["faults"] if kind is not None and f["type"] != kind
    ]
