"""Preflight planning: the three rules, cluster health and capacity, decided before any move."""

from __future__ import annotations

import pytest

from engine import errors
from workflows import plan as p
from workflows.backends.base import Host, HostState, Inventory, PowerState, Vm

GB = 1024


def inv(*vms: Vm, hosts: tuple[Host, ...] | None = None) -> Inventory:
    hosts = hosts or tuple(Host(f"hv{i}", "c1", 16 * GB) for i in (1, 2, 3))
    return Inventory("c1", hosts, vms)


def vm(
    vm_id: str,
    host: str = "hv1",
    *,
    ha: bool = True,
    state: PowerState = PowerState.RUNNING,
    memory: int = 2 * GB,
) -> Vm:
    return Vm(vm_id, vm_id, host, ha, state, memory)


@pytest.mark.parametrize(
    ("ha", "state", "policies", "action"),
    [
        (True, PowerState.RUNNING, p.Policies(), p.Action.LIVE_MIGRATE),
        (True, PowerState.PAUSED, p.Policies(), p.Action.LIVE_MIGRATE),
        (True, PowerState.POWER_OFF, p.Policies(), p.Action.LEAVE),
        (
            True,
            PowerState.SAVED,
            p.Policies(stopped_ha=p.StoppedHaPolicy.EVACUATE),
            p.Action.EVACUATE,
        ),
        (False, PowerState.RUNNING, p.Policies(), p.Action.BLOCKED),
        (False, PowerState.RUNNING, p.Policies(p.NonHaPolicy.SAVE), p.Action.SAVE),
        (False, PowerState.RUNNING, p.Policies(p.NonHaPolicy.SHUTDOWN), p.Action.SHUTDOWN),
        (False, PowerState.RUNNING, p.Policies(p.NonHaPolicy.MIGRATE), p.Action.MIGRATE),
        (False, PowerState.POWER_OFF, p.Policies(p.NonHaPolicy.MIGRATE), p.Action.LEAVE),
    ],
)
def test_classification(
    ha: bool, state: PowerState, policies: p.Policies, action: p.Action
) -> None:
    """Each (HA, power state, policy) gets its documented action."""
    assert p.classify(vm("x", ha=ha, state=state), policies) is action


def test_plan_covers_only_the_nodes_own_vms_by_id() -> None:
    """The snapshot holds the node's VMs (two may share a name), nothing of other nodes."""
    plan = p.make_plan(
        inv(
            Vm("id-1", "web", "hv1", True, PowerState.RUNNING, GB),
            Vm("id-2", "web", "hv1", True, PowerState.RUNNING, GB),
            vm("elsewhere", "hv2"),
        ),
        "HV1",
        p.Policies(),
    )
    assert plan.ok
    assert [v.id for v in plan.vms] == ["id-1", "id-2"]
    assert plan.node == "hv1"


def test_blocked_vms_are_all_named() -> None:
    """Under `block`, every running non-HA VM is named in one refusal."""
    plan = p.make_plan(inv(vm("n1", ha=False), vm("n2", ha=False), vm("h1")), "hv1", p.Policies())
    assert not plan.ok
    assert "(n1)" in plan.problems[0] and "(n2)" in plan.problems[0]


def test_other_node_in_maintenance_or_down_refuses() -> None:
    """Another node in maintenance, or down, refuses the plan naming it."""
    hosts = (
        Host("hv1", "c1", 16 * GB),
        Host("hv2", "c1", 16 * GB, maintenance=True),
        Host("hv3", "c1", 16 * GB, state=HostState.DOWN),
    )
    plan = p.make_plan(inv(vm("a"), hosts=hosts), "hv1", p.Policies())
    assert any("hv2 is already in maintenance" in x for x in plan.problems)
    assert any("hv3 is down" in x for x in plan.problems)


def test_capacity_refusal_names_the_vm_that_fits_nowhere() -> None:
    """If the remaining nodes lack memory for a VM, the plan refuses naming it."""
    hosts = (Host("hv1", "c1", 64 * GB), Host("hv2", "c1", 8 * GB))
    plan = p.make_plan(
        inv(vm("big", memory=12 * GB), vm("small", memory=2 * GB), hosts=hosts), "hv1", p.Policies()
    )
    assert plan.problems == ("not enough memory on the remaining nodes for 'big' (big) (12288 MB)",)
    assert {v.id: v.target for v in plan.vms} == {"big": None, "small": "hv2"}


def test_stopped_vms_need_no_memory_to_evacuate() -> None:
    """Evacuating powered-off VMs does not consume target memory."""
    hosts = (Host("hv1", "c1", 64 * GB), Host("hv2", "c1", 1 * GB))
    plan = p.make_plan(
        inv(vm("off", state=PowerState.POWER_OFF, memory=32 * GB), hosts=hosts),
        "hv1",
        p.Policies(stopped_ha=p.StoppedHaPolicy.EVACUATE),
    )
    assert plan.ok and plan.vms[0].target == "hv2"


def test_lock_holder_refuses() -> None:
    """A cluster held by another run refuses, naming that run."""
    plan = p.make_plan(inv(vm("a")), "hv1", p.Policies(), lock_holder="run-42")
    assert "run-42" in plan.problems[0]


def test_unknown_node_is_an_input_error() -> None:
    """A node not in the cluster is a usage error listing the nodes."""
    with pytest.raises(errors.UsageError, match="hv1, hv2, hv3"):
        p.make_plan(inv(), "hv9", p.Policies())


def test_plan_json_round_trip() -> None:
    """The published snapshot reads back into the same plan."""
    plan = p.make_plan(inv(vm("a"), vm("b", ha=False)), "hv1", p.Policies(p.NonHaPolicy.SAVE))
    assert p.Plan.from_json(plan.to_json()) == plan


def test_readme_state_diagram_is_the_machine() -> None:
    """The README's mermaid diagram is exactly what the workflow declares."""
    from pathlib import Path

    from engine.machine import StateMachine
    from workflows.node_patch import NodePatch

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    diagram = readme.split("```mermaid\n", 1)[1].split("\n```", 1)[0]
    workflow = NodePatch(None, None).workflow()  # type: ignore[arg-type]
    assert diagram == StateMachine(workflow).mermaid()
