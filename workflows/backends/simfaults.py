"""The documents that feed the simulated cluster: scenarios and faults.

A scenario is the `sim show --json` document plus optional VM IDs, `faults` and `speed`. This
module validates scenarios and faults (raising `UsageError` naming the bad key or index),
generates random but seed-deterministic scenarios, and matches and consumes faults as they fire.
Everything here is pure: it works on plain JSON-able dicts.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from engine import errors
from workflows.backends import base

JSON = dict[str, Any]
Range = tuple[float, float]

JOB_OPS = frozenset(
    {
        "enter_maintenance",
        "exit_maintenance",
        "move_vm",
        "start_vm",
        "save_vm",
        "shutdown_vm",
        "reboot_host",
    }
)
CALL_OPS = JOB_OPS | {"inventory", "job", "find_job"}
HOST_JOB_OPS = frozenset({"enter_maintenance", "exit_maintenance", "reboot_host"})

_SIDE_EFFECTS = frozenset({"delete_vm", "move_vm", "set_state"})
_HOST_STATES = frozenset(s.value for s in base.HostState)
_POWER_STATES = frozenset(s.value for s in base.PowerState)
# `operations` and `clock` are what `sim show --json` adds; a scenario may carry them, and they
# are ignored.
_TOP_KEYS = frozenset({"clusters", "vms", "faults", "speed", "operations", "clock"})
# A host's own simulated timings (optional): how long patching and the reboot take there.
TIMING_KEYS = ("patch_seconds", "reboot_seconds")


def _fail(where: str, problem: str) -> errors.UsageError:
    return errors.UsageError(f"{where}: {problem}" if where else problem)


def _get(
    obj: Mapping[str, Any],
    key: str,
    kind: type[Any] | tuple[type[Any], ...],
    where: str,
    default: Any = ...,
) -> Any:
    if key not in obj:
        if default is ...:
            raise _fail(where, f"missing key {key!r}")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in names)
        raise _fail(f"{where}.{key}" if where else key, f"expected {expected}, got {value!r}")
    return value


def _check_keys(obj: Any, allowed: frozenset[str], where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise _fail(where, f"expected a mapping, got {obj!r}")
    _string_keys(obj, where)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}")
    return obj


def _string_keys(obj: Mapping[Any, Any], where: str) -> None:
    odd = [key for key in obj if not isinstance(key, str)]
    if odd:
        raise _fail(
            where,
            f"key {odd[0]!r} is not a string (unquoted in YAML, true, false, on, off, yes "
            "and no are booleans: quote the key)",
        )


def _one_of(value: str, allowed: frozenset[str], where: str) -> str:
    if value not in allowed:
        raise _fail(where, f"{value!r} is not one of {', '.join(sorted(allowed))}")
    return value


# -- faults -------------------------------------------------------------------------------------


def validate_fault(raw: Any, where: str = "fault") -> JSON:
    """A normalized copy of one fault dict (with `times` filled in), or UsageError. The fault
    kinds and their keys are the models of `workflows.backends.faultkinds`."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("type"), str):
        raise _fail(where, f"a fault needs a string 'type', got {raw!r}")
    _string_keys(raw, where)
    from workflows.backends import faultkinds  # pydantic: only when a fault is checked

    try:
        return faultkinds.validate(dict(raw), where)
    except ValueError as exc:
        raise errors.UsageError(str(exc)) from None


def take(faults: list[JSON], kind: str, matches: Callable[[JSON], bool]) -> JSON | None:
    """Fire the first fault of this kind that matches: consume one of its `times`, return it."""
    for index, fault in enumerate(faults):
        if fault["type"] == kind and matches(fault):
            if fault["times"] is not None:
                fault["times"] -= 1
                if fault["times"] <= 0:
                    del faults[index]
            return dict(fault)
    return None


def take_all(faults: list[JSON], matches: Callable[[JSON], bool]) -> list[JSON]:
    """Fire every fault that matches, in order (used for side effects triggered by an op)."""
    fired = []
    for fault in [f for f in faults if matches(f)]:
        fired.append(dict(fault))
        if fault["times"] is not None:
            fault["times"] -= 1
    faults[:] = [f for f in faults if f["times"] is None or f["times"] > 0]
    return fired


def job_mode(faults: list[JSON], op: str, target: str) -> str:
    """How a just-accepted job will go: normal, fail, hang or never_returns (fires the fault)."""

    def hits(f: JSON) -> bool:
        return bool(f["op"] == op and f.get("target", target).lower() == target.lower())

    def host_hit(f: JSON) -> bool:
        return bool(f["host"].lower() == target.lower())

    if op == "reboot_host" and take(faults, "host_never_returns", host_hit):
        return "never_returns"
    if take(faults, "job_fails", hits):
        return "fail"
    if take(faults, "job_hangs", hits):
        return "hang"
    return "normal"


def fire_call_faults(faults: list[JSON], op: str) -> None:
    """Raise what a backend call of this op meets before it does anything, if anything."""
    if take(faults, "auth_fails", lambda f: True):
        raise errors.AuthenticationFailed("access denied (simulated)", command=op)
    if take(faults, "transient", lambda f: f["op"] in (op, "any")):
        raise errors.TransientBackendError("connection refused (simulated)")


def take_side_effects(faults: list[JSON], op: str) -> list[JSON]:
    """The delete_vm / move_vm / set_state faults that fire because a request of op was accepted."""
    return take_all(faults, lambda f: f["type"] in _SIDE_EFFECTS and f["on"] == op)


def migration_fails(faults: list[JSON], vm_id: str) -> bool:
    """Whether this live migration of the VM fails (fires the fault)."""
    return take(faults, "migration_fails", lambda f: f["vm"] == vm_id) is not None


# -- scenarios ----------------------------------------------------------------------------------


def build_state(scenario: Mapping[str, Any], *, speed: float) -> JSON:
    """Validate a scenario and turn it into a fresh state document."""
    top = _check_keys(scenario, _TOP_KEYS, "scenario")
    clusters = _get(top, "clusters", list, "scenario")
    if not clusters:
        raise _fail("scenario.clusters", "at least one cluster is needed")
    out_clusters, host_names = _validate_clusters(clusters, "scenario.")
    raw_vms = _get(top, "vms", list, "scenario", [])
    vms = [_validate_vm(v, f"scenario.vms[{i}]", host_names) for i, v in enumerate(raw_vms)]
    _check_unique([v["id"] for v in vms], "scenario.vms", "id")
    raw_faults = _get(top, "faults", list, "scenario", [])
    faults = [validate_fault(f, f"scenario.faults[{i}]") for i, f in enumerate(raw_faults)]
    for i, fault in enumerate(faults):
        _resolve_names(fault, f"scenario.faults[{i}]", vms, host_names)
    scenario_speed = _get(top, "speed", (int, float), "scenario", 0.0)
    chosen = float(speed or scenario_speed)
    if not math.isfinite(chosen) or chosen < 0:
        raise _fail("scenario.speed", f"expected a non-negative number, got {chosen!r}")
    return {
        "version": 1,
        "speed": chosen,
        "clusters": out_clusters,
        "vms": vms,
        "faults": faults,
        "jobs": {},
        "counts": {},
    }


def _resolve_names(fault: JSON, where: str, vms: list[JSON], hosts: dict[str, str]) -> None:
    """Point the fault at VMs and hosts of the scenario: a VM by id or unique name (stored as
    its id), a host by name in any case; anything else is refused, naming it."""
    refs: list[str] = [key for key in ("vm", "host", "to") if key in fault]
    if "target" in fault:
        refs.append("target")
    for key in refs:
        is_host = key in ("host", "to") or (key == "target" and fault["op"] in HOST_JOB_OPS)
        if is_host:
            fault[key] = _host_named(fault[key], hosts, f"{where}.{key}")
        else:
            fault[key] = _vm_named(fault[key], vms, f"{where}.{key}")


def _host_named(name: str, hosts: dict[str, str], where: str) -> str:
    if name.lower() not in hosts:
        known = ", ".join(hosts.values())
        raise _fail(where, f"no host {name!r} in the scenario (hosts: {known})")
    return hosts[name.lower()]


def _vm_named(ref: str, vms: list[JSON], where: str) -> str:
    if any(vm["id"] == ref for vm in vms):
        return ref
    named = [vm["id"] for vm in vms if vm["name"] == ref]
    if len(named) > 1:
        raise _fail(where, f"several VMs are named {ref!r}; give the VM's id")
    if not named:
        raise _fail(where, f"no VM with id or name {ref!r} in the scenario")
    return str(named[0])


def _check_unique(values: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value.lower() in seen:
            raise _fail(f"{where}[{index}].{what}", f"duplicate {what} {value!r}")
        seen.add(value.lower())


def _validate_clusters(clusters: list[Any], prefix: str) -> tuple[list[JSON], dict[str, str]]:
    out: list[JSON] = []
    for ci, raw in enumerate(clusters):
        where = f"{prefix}clusters[{ci}]"
        obj = _check_keys(raw, frozenset({"name", "hosts"}), where)
        raw_hosts = _get(obj, "hosts", list, where)
        hosts = [_validate_host(h, f"{where}.hosts[{hi}]") for hi, h in enumerate(raw_hosts)]
        out.append({"name": _get(obj, "name", str, where), "hosts": hosts})
    _check_unique([c["name"] for c in out], f"{prefix}clusters", "name")
    all_hosts = [h["name"] for c in out for h in c["hosts"]]
    _check_unique(all_hosts, f"{prefix}hosts", "name")
    return out, {name.lower(): name for name in all_hosts}


def _validate_host(raw: Any, where: str) -> JSON:
    keys = frozenset({"name", "memory_mb", "maintenance", "state", *TIMING_KEYS})
    obj = _check_keys(raw, keys, where)
    name = _get(obj, "name", str, where)
    if not name:
        raise _fail(f"{where}.name", "a host needs a name")
    memory = _get(obj, "memory_mb", int, where)
    if memory <= 0:
        raise _fail(f"{where}.memory_mb", f"expected a positive integer, got {memory}")
    state = _one_of(_get(obj, "state", str, where, "Up"), _HOST_STATES, f"{where}.state")
    maintenance = _get(obj, "maintenance", bool, where, False)
    host: JSON = {"name": name, "memory_mb": memory, "maintenance": maintenance, "state": state}
    for key in TIMING_KEYS:
        value = _get(obj, key, (int, float), where, None)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise _fail(f"{where}.{key}", f"expected a non-negative number, got {value!r}")
        if value is not None:
            host[key] = float(value)
    return host


def _validate_vm(raw: Any, where: str, hosts: dict[str, str]) -> JSON:
    keys = frozenset({"id", "name", "host", "ha", "state", "memory_mb"})
    obj = _check_keys(raw, keys, where)
    host = _get(obj, "host", str, where)
    if host.lower() not in hosts:
        raise _fail(f"{where}.host", f"unknown host {host!r}")
    memory = _get(obj, "memory_mb", int, where)
    if memory <= 0:
        raise _fail(f"{where}.memory_mb", f"expected a positive integer, got {memory}")
    state = _one_of(_get(obj, "state", str, where, "Running"), _POWER_STATES, f"{where}.state")
    vm_id = _get(obj, "id", str, where, None) or str(uuid.uuid4())
    return {
        "id": vm_id,
        "name": _get(obj, "name", str, where),
        "host": hosts[host.lower()],
        "ha": _get(obj, "ha", bool, where, True),
        "state": state,
        "memory_mb": memory,
    }


def generate(
    *,
    hosts: int,
    vms: int,
    non_ha: int,
    stopped_ha: int,
    seed: int,
    cluster: str,
    prefix: str = "",
    patch_seconds: Range | None = None,
    reboot_seconds: Range | None = None,
) -> JSON:
    """A random scenario, deterministic by seed, in which the cluster can lose any one node.
    Hosts are named `{prefix}hv01`.., VMs `{prefix}vm001`.. With `patch_seconds` or
    `reboot_seconds` (low, high), each host gets its own time drawn from that range, also
    deterministic by seed (the rest of the scenario is the same as without them)."""
    if hosts < 1 or vms < 0 or non_ha < 0 or stopped_ha < 0 or non_ha + stopped_ha > vms:
        raise errors.UsageError(
            "generate needs hosts >= 1 and 0 <= non_ha + stopped_ha <= vms "
            f"(got hosts={hosts}, vms={vms}, non_ha={non_ha}, stopped_ha={stopped_ha})"
        )
    rng = random.Random(seed)
    host_names = [f"{prefix}hv{i + 1:02d}" for i in range(hosts)]
    kinds = ["non_ha"] * non_ha + ["stopped"] * stopped_ha + ["ha"] * (vms - non_ha - stopped_ha)
    rng.shuffle(kinds)
    placement = [host_names[i % hosts] for i in range(vms)]
    rng.shuffle(placement)
    kinds = _specials_first_on(host_names[0], kinds, placement)
    out_vms = [
        {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "name": f"{prefix}vm{i + 1:03d}",
            "host": placement[i],
            "ha": kinds[i] != "non_ha",
            "state": "PowerOff" if kinds[i] == "stopped" else "Running",
            "memory_mb": rng.choice((1024, 2048, 4096, 8192)),
        }
        for i in range(vms)
    ]
    memory = _host_memory(out_vms, host_names)
    made: list[JSON] = [{"name": h, "memory_mb": memory} for h in host_names]
    timings = random.Random(f"timings:{seed}:{prefix}")  # apart, so the VMs stay as they were
    for key, span in (("patch_seconds", patch_seconds), ("reboot_seconds", reboot_seconds)):
        if span is not None:
            low, high = check_range(span, key)
            for host in made:
                host[key] = float(round(timings.uniform(low, high)))
    return {"clusters": [{"name": cluster, "hosts": made}], "vms": out_vms}


def check_range(span: Range, what: str) -> Range:
    """A (low, high) range of seconds: finite, non-negative, low <= high."""
    low, high = float(span[0]), float(span[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or low > high:
        raise errors.UsageError(
            f"{what}: expected 0 <= low <= high seconds, got {span[0]!r}-{span[1]!r}"
        )
    return low, high


def generate_fleet(
    *,
    clusters: int,
    hosts: int,
    vms: int,
    non_ha: int,
    stopped_ha: int,
    seed: int,
    patch_seconds: Range | None = None,
    reboot_seconds: Range | None = None,
) -> JSON:
    """`clusters` random clusters cluster1..clusterK, each as `generate` makes one (the counts
    are per cluster), with hosts ck-hv01.. and VMs ck-vm001.. so that names are unique."""
    if clusters < 1:
        raise errors.UsageError(f"generate needs clusters >= 1 (got clusters={clusters})")
    fleet: JSON = {"clusters": [], "vms": []}
    for k in range(1, clusters + 1):
        one = generate(
            hosts=hosts,
            vms=vms,
            non_ha=non_ha,
            stopped_ha=stopped_ha,
            seed=seed * 1_000_003 + k - 1,
            cluster=f"cluster{k}",
            prefix=f"c{k}-",
            patch_seconds=patch_seconds,
            reboot_seconds=reboot_seconds,
        )
        fleet["clusters"] += one["clusters"]
        fleet["vms"] += one["vms"]
    return fleet


def _specials_first_on(host: str, kinds: list[str], placement: list[str]) -> list[str]:
    """The same kinds, the non-HA and stopped ones moved to the VMs placed on host first (then
    elsewhere), so that patching the first host shows what the policies do."""
    specials = [kind for kind in kinds if kind != "ha"]
    slots = [i for i, h in enumerate(placement) if h == host]
    slots += [i for i, h in enumerate(placement) if h != host]
    out = ["ha"] * len(kinds)
    for slot, kind in zip(slots, specials, strict=False):
        out[slot] = kind
    return out


def _host_memory(vms: list[JSON], hosts: list[str]) -> int:
    """Host size such that greedy most-free placement fits everything on N-1 hosts."""
    running = [v["memory_mb"] for v in vms if v["state"] == "Running"]
    loads = [
        sum(v["memory_mb"] for v in vms if v["host"] == h and v["state"] == "Running")
        for h in hosts
    ]
    survivors = max(len(hosts) - 1, 1)
    needed = max(
        max(loads, default=0), math.ceil(sum(running) / survivors) + max(running, default=0)
    )
    step = 8192
    return int(max(step, math.ceil(needed / step) * step))


# -- the state document (what `build_state` makes; an earlier nodepatch's cluster file) ----------

_STATE_KEYS = frozenset({"version", "speed", "clusters", "vms", "faults", "jobs", "counts"})
_CLOCK_KEYS = frozenset({"sim_time", "real_time"})
_HOST_KEYS = frozenset({"name", "memory_mb", "maintenance", "state"})
_VM_KEYS = frozenset({"id", "name", "host", "ha", "state", "memory_mb"})
_JOB_KEYS = frozenset(
    {"id", "kind", "target", "status", "progress", "message", "details", "steps", "info"}
    | {"started_at", "sim_start", "duration", "mode"}
)


def check_state(state: Any) -> None:
    """Raise UsageError naming the first thing wrong with a state document (what `build_state`
    makes, and what an earlier nodepatch wrote as the cluster file), so that a JSON cluster file
    is refused naming what is wrong with it."""
    if not isinstance(state, dict):
        raise _fail("", f"expected a JSON object, got {type(state).__name__}")
    missing = sorted(_STATE_KEYS - set(state))
    if missing:
        hint = (
            " (a scenario? make a cluster file of it: `nodepatch sim init --file F --from S`)"
            if "clusters" in state
            else ""
        )
        raise _fail("", f"missing key {missing[0]!r}{hint}")
    top = _check_keys(state, _STATE_KEYS | _CLOCK_KEYS, "")
    _, hosts = _validate_clusters(_get(top, "clusters", list, ""), "")
    for ci, cluster in enumerate(top["clusters"]):
        for hi, host in enumerate(cluster["hosts"]):
            _require(host, _HOST_KEYS, f"clusters[{ci}].hosts[{hi}]")
    for i, vm in enumerate(_get(top, "vms", list, "")):
        _validate_vm(vm, f"vms[{i}]", hosts)
        _require(vm, _VM_KEYS, f"vms[{i}]")
    for i, fault in enumerate(_get(top, "faults", list, "")):
        validate_fault(fault, f"faults[{i}]")
        _require(fault, frozenset({"times"}), f"faults[{i}]")
    for job_id, job in _get(top, "jobs", dict, "").items():
        if not isinstance(job, Mapping):
            raise _fail(f"jobs.{job_id}", f"expected a mapping, got {job!r}")
        _require(job, _JOB_KEYS, f"jobs.{job_id}")
    for key in ("speed", *(_CLOCK_KEYS & set(top))):
        _get(top, key, (int, float), "")
    _get(top, "counts", dict, "")


def _require(obj: Mapping[str, Any], keys: frozenset[str], where: str) -> None:
    missing = sorted(keys - set(obj))
    if missing:
        raise _fail(where, f"missing key {missing[0]!r}")
