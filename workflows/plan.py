"""Preflight planning, pure: classify every VM on the node and check the cluster can take them.

Rules from the field (the original write-up): running non-HA VMs are saved by maintenance mode
(rule 1), HA VMs that are off or saved are not moved (rule 2), and nothing moves back by itself
(rule 3). The plan decides an action per VM, identified by ID, before anything is touched.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from engine import errors
from workflows.backends.base import HostState, Inventory, PowerState, Vm


class NonHaPolicy(enum.StrEnum):
    BLOCK = "block"
    SAVE = "save"
    SHUTDOWN = "shutdown"
    MIGRATE = "migrate"


class StoppedHaPolicy(enum.StrEnum):
    LEAVE = "leave"
    EVACUATE = "evacuate"


class Action(enum.StrEnum):
    LIVE_MIGRATE = "live-migrate"  # moved by the drain itself
    SAVE = "save"  # saved before the drain, resumed after
    SHUTDOWN = "shutdown"  # guest shutdown before the drain, started after
    MIGRATE = "migrate"  # non-HA, moved before the drain, moved back after
    EVACUATE = "evacuate"  # HA but not running, moved before the drain, moved back after
    LEAVE = "leave"  # not running, stays on the node
    BLOCKED = "blocked"  # the policy forbids patching while this VM runs here

    @property
    def moves_before_drain(self) -> bool:
        return self in (Action.MIGRATE, Action.EVACUATE)

    @property
    def moves(self) -> bool:
        return self in (Action.LIVE_MIGRATE, Action.MIGRATE, Action.EVACUATE)


@dataclass(frozen=True)
class Policies:
    non_ha: NonHaPolicy = NonHaPolicy.BLOCK
    stopped_ha: StoppedHaPolicy = StoppedHaPolicy.LEAVE


@dataclass(frozen=True)
class PlannedVm:
    id: str
    name: str
    ha: bool
    state: str
    host: str
    memory_mb: int
    action: str
    target: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlannedVm:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    cluster: str
    node: str
    vms: tuple[PlannedVm, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "node": self.node,
            "vms": [vm.to_json() for vm in self.vms],
            "problems": list(self.problems),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            cluster=data["cluster"],
            node=data["node"],
            vms=tuple(PlannedVm.from_json(v) for v in data["vms"]),
            problems=tuple(data.get("problems", ())),
        )


def classify(vm: Vm, policies: Policies) -> Action:
    running = vm.state is PowerState.RUNNING or vm.state is PowerState.PAUSED
    if vm.ha:
        if running:
            return Action.LIVE_MIGRATE
        return Action.EVACUATE if policies.stopped_ha is StoppedHaPolicy.EVACUATE else Action.LEAVE
    if not running:
        return Action.LEAVE
    return {
        NonHaPolicy.BLOCK: Action.BLOCKED,
        NonHaPolicy.SAVE: Action.SAVE,
        NonHaPolicy.SHUTDOWN: Action.SHUTDOWN,
        NonHaPolicy.MIGRATE: Action.MIGRATE,
    }[policies.non_ha]


def make_plan(
    inventory: Inventory,
    node: str,
    policies: Policies,
    *,
    lock_holder: str | None = None,
    away: Collection[str] = (),
    targets: Mapping[str, str] | None = None,
) -> Plan:
    """The per-VM plan for draining node, and every reason not to start now.

    In a cluster cycle, `away` names the other nodes of the node's wave (out at the same time:
    their maintenance is expected, and nothing is placed on them) and `targets` the placement
    the cycle computed for the whole wave, used for the VMs it names."""
    host = inventory.host(node)
    if host is None:
        known = ", ".join(h.name for h in inventory.hosts)
        raise errors.UsageError(
            f"node {node!r} is not in cluster {inventory.cluster!r} (nodes: {known})"
        )
    problems: list[str] = []
    if lock_holder:
        problems.append(
            f"cluster {inventory.cluster} is held by nodepatch run {lock_holder}: wait for it "
            f"to end, or `nodepatch abort {lock_holder}`"
        )
    away = {a.lower() for a in away}
    problems += _cluster_problems(inventory, host.name, away)
    planned = [(vm, classify(vm, policies)) for vm in inventory.vms_on(host.name)]
    blocked = [vm for vm, action in planned if action is Action.BLOCKED]
    if blocked:
        problems.append(
            "running non-HA VMs would be saved by maintenance mode (policy non_ha=block): "
            + ", ".join(_label(vm) for vm in blocked)
            + "; say what to do with them: --non-ha save|shutdown|migrate"
        )
    given = dict(targets or {})
    own = [(vm, a) for vm, a in planned if vm.id not in given]
    placed, capacity = place(inventory, host.name, own, away=away)
    placed.update(given)
    problems += capacity
    vms = tuple(
        PlannedVm(
            vm.id,
            vm.name,
            vm.ha,
            str(vm.state),
            vm.host,
            vm.memory_mb,
            str(action),
            placed.get(vm.id) if action.moves else None,
        )
        for vm, action in planned
    )
    return Plan(inventory.cluster, host.name, vms, tuple(problems))


def _cluster_problems(inventory: Inventory, node: str, away: Collection[str] = ()) -> list[str]:
    problems = []
    for other in inventory.hosts:
        if other.name.lower() in away and other.state is not HostState.DOWN:
            continue  # out with this node in the same wave: expected
        if other.state is not HostState.UP:
            problems.append(f"node {other.name} is {other.state.value.lower()}")
        elif other.maintenance and other.name != node:
            problems.append(f"node {other.name} is already in maintenance mode")
        elif other.maintenance:
            problems.append(f"node {node} is already in maintenance mode (not by this run)")
    return problems


def place(
    inventory: Inventory,
    node: str | Collection[str],
    planned: Iterable[tuple[Vm, Action]],
    *,
    away: Collection[str] = (),
    headroom: float = 0.0,
) -> tuple[dict[str, str], list[str]]:
    """Greedy placement of the VMs of `node` (or of several nodes going out together) on the
    other nodes, largest first, each on the node with the most free memory, keeping `headroom`
    (a fraction of each node's memory) free. Returns the targets and the VMs that fit nowhere."""
    out = {node.lower()} if isinstance(node, str) else {n.lower() for n in node}
    out |= {a.lower() for a in away}
    free = {
        h.name: inventory.free_memory_mb(h.name) - int(h.memory_mb * headroom)
        for h in inventory.hosts
        if h.name.lower() not in out and h.state is HostState.UP and not h.maintenance
    }
    targets: dict[str, str] = {}
    problems: list[str] = []
    moving = [
        (vm, a) for vm, a in planned if a in (Action.LIVE_MIGRATE, Action.MIGRATE, Action.EVACUATE)
    ]
    for vm, action in sorted(moving, key=lambda p: -p[0].memory_mb):
        needs = vm.memory_mb if action is not Action.EVACUATE else 0
        fits = [h for h, mb in free.items() if mb >= needs]
        if not fits:
            problems.append(
                f"not enough memory on the remaining nodes for {_label(vm)} ({vm.memory_mb} MB)"
            )
            continue
        best = max(fits, key=lambda h: free[h])
        free[best] -= needs
        targets[vm.id] = best
    return targets, problems


def fits(inventory: Inventory, host: str, vm: Vm, action: Action) -> bool:
    """Whether `host` can take the VM now: up, not in maintenance, enough free memory."""
    found = inventory.host(host)
    if found is None or found.state is not HostState.UP or found.maintenance:
        return False
    needs = vm.memory_mb if action is not Action.EVACUATE else 0
    return inventory.free_memory_mb(found.name) >= needs


def _label(vm: Vm) -> str:
    return f"{vm.name!r} ({vm.id})"
