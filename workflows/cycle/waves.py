"""Node order and waves, pure: which nodes of a cluster may be out at the same time.

A wave of several nodes is allowed only when the nodes outside it (and outside the nodes left
out after a failure) can hold every VM of the wave with the configured headroom; the wave's VMs
are then placed jointly, so two nodes of one wave never count on the same free memory, and no VM
is placed on a node of its own wave. Otherwise the wave shrinks, and says why.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine import errors
from workflows import plan as planning
from workflows.backends.base import Inventory


class Order(enum.StrEnum):
    FEWEST_VMS = "fewest-vms"
    GIVEN = "given"
    NAME = "name"


@dataclass(frozen=True)
class Wave:
    nodes: tuple[str, ...]
    reason: str
    targets: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> vm id -> host

    def to_json(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "reason": self.reason, "targets": self.targets}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Wave:
        return cls(tuple(data["nodes"]), str(data["reason"]), dict(data.get("targets", {})))


def order_nodes(inventory: Inventory, nodes: Sequence[str] | None, order: Order) -> list[str]:
    """The cluster's nodes (or the given ones, by their cluster names) in patching order."""
    names = [h.name for h in inventory.hosts]
    if nodes:
        chosen = []
        for wanted in nodes:
            host = inventory.host(wanted)
            if host is None:
                raise errors.UsageError(
                    f"node {wanted!r} is not in cluster {inventory.cluster!r} "
                    f"(nodes: {', '.join(names)})"
                )
            if host.name not in chosen:
                chosen.append(host.name)
        names = chosen
    if order is Order.GIVEN:
        return names
    if order is Order.NAME:
        return sorted(names, key=str.lower)
    return sorted(names, key=lambda n: (len(inventory.vms_on(n)), n.lower()))


def next_wave(
    inventory: Inventory,
    remaining: Sequence[str],
    *,
    max_parallel: int | None,
    headroom: float,
    policies: planning.Policies,
    away: Collection[str] = (),
) -> Wave:
    """The next wave: the first remaining node, then the next ones in order while the wave is
    below `max_parallel` (None: `auto`, as large as is safe) and its VMs still fit outside it."""
    if not remaining:
        raise ValueError("no node left for a wave")
    limit = len(inventory.hosts) if max_parallel is None else max(max_parallel, 1)
    nodes = [remaining[0]]
    targets = _joint(inventory, nodes, policies, away, headroom=0.0)[0]
    reason = "the last node in the order" if len(remaining) == 1 else "the last nodes in the order"
    for candidate in remaining[1:]:
        if len(nodes) >= limit:
            reason = (
                "--max-parallel 1: one node at a time, as CAU"
                if max_parallel == 1
                else f"--max-parallel {max_parallel}"
            )
            break
        trial = [*nodes, candidate]
        placed, problem = _joint(inventory, trial, policies, away, headroom=headroom)
        if problem:
            reason = f"adding {candidate} would leave {problem}"
            break
        nodes, targets = trial, placed
    count = f"{len(nodes)} node{'s' if len(nodes) > 1 else ''}"
    return Wave(tuple(nodes), f"{count}: {reason}", targets)


def _joint(
    inventory: Inventory,
    nodes: Sequence[str],
    policies: planning.Policies,
    away: Collection[str],
    *,
    headroom: float,
) -> tuple[dict[str, dict[str, str]], str]:
    """Place the VMs of all `nodes` together outside them: the targets per node, or a problem."""
    vms = [(vm, planning.classify(vm, policies)) for node in nodes for vm in inventory.vms_on(node)]
    placed, problems = planning.place(inventory, nodes, vms, away=away, headroom=headroom)
    if problems:
        share = f" with {headroom:.0%} headroom" if headroom else ""
        return {}, f"too little memory outside the wave{share} ({problems[0]})"
    targets: dict[str, dict[str, str]] = {node: {} for node in nodes}
    for vm, _action in vms:
        if vm.id in placed:
            targets[next(n for n in nodes if n.lower() == vm.host.lower())][vm.id] = placed[vm.id]
    return targets, ""


def plan_waves(
    inventory: Inventory,
    order: Sequence[str],
    *,
    max_parallel: int | None,
    headroom: float,
    policies: planning.Policies,
) -> list[Wave]:
    """Every wave from the current placement, for `cycle plan` (a running cycle computes each
    wave again from the cluster as it is when the wave starts)."""
    waves, remaining = [], list(order)
    while remaining:
        wave = next_wave(
            inventory,
            remaining,
            max_parallel=max_parallel,
            headroom=headroom,
            policies=policies,
        )
        waves.append(wave)
        remaining = [n for n in remaining if n not in wave.nodes]
    return waves
