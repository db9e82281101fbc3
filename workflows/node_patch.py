"""The node-patch workflow: Preflight → Draining → Patching → Enabling → Rebalancing → Done.

Written against the ClusterBackend Protocol; every step re-reads the real cluster state first, so
running it again (after a crash, a retry or an abort) does only what is still missing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine import errors
from engine.context import JobOutcome, JobSpec, StepContext
from engine.model import Run
from engine.workflow import Advance, StepResult, Transition, Wait, Workflow
from workflows import plan as planning
from workflows.backends.base import ClusterBackend, Host, Inventory, PowerState
from workflows.patchers.base import Patcher

PREFLIGHT, DRAINING, PATCHING = "Preflight", "Draining", "Patching"
ENABLING, REBALANCING = "Enabling", "Rebalancing"
DONE, FAILED, ABORTED = "Done", "Failed", "Aborted"
REFUSED, ABANDONED = "Refused", "Abandoned"
STATES = (
    PREFLIGHT,
    DRAINING,
    PATCHING,
    ENABLING,
    REBALANCING,
    DONE,
    FAILED,
    ABORTED,
    REFUSED,
    ABANDONED,
)
FINAL = frozenset({DONE, ABORTED, REFUSED, ABANDONED})
NODE_PATCH = "node_patch"
PATCHED = "patched"
EXTERNAL = "external"

TRANSITIONS = (
    Transition("drain", PREFLIGHT, DRAINING),
    Transition("refuse", PREFLIGHT, REFUSED),
    Transition("patch", DRAINING, PATCHING),
    Transition("patched", PATCHING, ENABLING),
    Transition("enabled", ENABLING, REBALANCING),
    Transition("finish", REBALANCING, DONE),
    Transition("finish_aborted", REBALANCING, ABORTED),
    Transition("abort_unstarted", PREFLIGHT, ABORTED),
    Transition("abort_unstarted", FAILED, ABORTED),
    Transition("abort", DRAINING, ENABLING),
    Transition("abort", PATCHING, ENABLING),
    Transition("abort", FAILED, ENABLING),
    Transition("abort", ENABLING, ENABLING),
    Transition("abort", REBALANCING, REBALANCING),
)


def cluster_lock(cluster: str) -> str:
    return f"cluster:{cluster.lower()}"


def subject(cluster: str, node: str) -> str:
    return f"{cluster}/{node}"


def on_abort(run: Run) -> str | None:
    untouched = run.state == PREFLIGHT or (run.state == FAILED and run.failed_from == PREFLIGHT)
    return "abort_unstarted" if untouched else "abort"


@dataclass(frozen=True)
class Params:
    """What a run was started with; recorded in the run so a resume does the same thing."""

    cluster: str
    node: str
    policies: planning.Policies
    patcher: str
    concurrency: int
    # In a cluster cycle: the other nodes out at the same time (its wave, nodes left out after
    # a failure), and the cycle's placement of this node's VMs. Then every VM that moves is
    # moved by the run itself, to its planned target, before the drain (maintenance mode's own
    # placement could pick a node of the wave).
    away: tuple[str, ...] = ()
    targets: Mapping[str, str] = field(default_factory=dict)

    def moves_first(self, action: planning.Action) -> bool:
        """Whether the run moves a VM with this action itself, before entering maintenance."""
        return action.moves_before_drain or (
            bool(self.away) and action is planning.Action.LIVE_MIGRATE
        )

    @classmethod
    def from_run(cls, run: Run) -> Params:
        p = run.params
        return cls(
            cluster=p["cluster"],
            node=p["node"],
            policies=planning.Policies(
                planning.NonHaPolicy(p["non_ha"]), planning.StoppedHaPolicy(p["stopped_ha"])
            ),
            patcher=p["patcher"],
            concurrency=int(p["concurrency"]),
            away=tuple(p.get("away", ())),
            targets=dict(p.get("targets", {})),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cluster": self.cluster,
            "node": self.node,
            "non_ha": str(self.policies.non_ha),
            "stopped_ha": str(self.policies.stopped_ha),
            "patcher": self.patcher,
            "concurrency": self.concurrency,
        }
        if self.away:
            out["away"] = list(self.away)
        if self.targets:
            out["targets"] = dict(self.targets)
        return out


class NodePatch:
    """The steps, bound to a backend and a way to build the run's patcher."""

    def __init__(self, backend: ClusterBackend, patcher: Callable[[str, str], Patcher]) -> None:
        self.backend = backend
        self.patcher = patcher

    def workflow(self) -> Workflow:
        return Workflow(
            name=NODE_PATCH,
            version=1,
            states=STATES,
            initial=PREFLIGHT,
            failed=FAILED,
            final=FINAL,
            transitions=TRANSITIONS,
            steps={
                PREFLIGHT: self.preflight,
                DRAINING: self.drain,
                PATCHING: self.patch,
                ENABLING: self.enable,
                REBALANCING: self.rebalance,
            },
            signals=frozenset({PATCHED}),
            on_abort=on_abort,
            abandoned=ABANDONED,
        )

    # ---- Preflight ---------------------------------------------------------------------

    def preflight(self, ctx: StepContext) -> StepResult:
        p = Params.from_run(ctx.run)
        lock = cluster_lock(p.cluster)
        holder = ctx.lock_holder(lock)
        inventory = self.backend.inventory(p.cluster)
        result = planning.make_plan(
            inventory,
            p.node,
            p.policies,
            lock_holder=holder,
            away=p.away,
            targets=p.targets,
        )
        snapshot = result.to_json()
        ctx.progress(f"preflight: {len(result.vms)} VM(s) on {result.node}")
        if not result.ok:  # nothing was touched: the run ends, and blocks nothing
            reason = {"reason": "; ".join(result.problems)}
            return Advance("refuse", publish={"snapshot": snapshot}, details=reason, error=reason)
        return Advance("drain", publish={"snapshot": snapshot}, acquire=(lock,), if_held="refuse")

    # ---- Draining ----------------------------------------------------------------------

    def drain(self, ctx: StepContext) -> StepResult:
        p = Params.from_run(ctx.run)
        snapshot = planning.Plan.from_json(ctx.published["snapshot"])
        try:
            inventory = self._drain(ctx, p, snapshot)
        except errors.AuthenticationFailed:
            raise  # one refusal is enough; the journal still tells what the run did
        except errors.StepFailed as exc:
            # Publish where the run's own moves left the VMs, with the failure, so compensation
            # and the report know them (after a crash, `_moved_by_run` reads the journal).
            inventory = self.backend.inventory(p.cluster)
            placement = _placement(inventory, snapshot, p.node, _moved_by_run(ctx, snapshot))
            return Advance("fail", publish={"drained": placement}, details={"reason": str(exc)})
        placement = _placement(inventory, snapshot, p.node, _moved_by_run(ctx, snapshot))
        return Advance("patch", publish={"drained": placement})

    def _drain(self, ctx: StepContext, p: Params, snapshot: planning.Plan) -> Inventory:
        self._pre_drain_actions(ctx, p, snapshot)
        self._enter_maintenance(ctx, p)
        inventory = self.backend.inventory(p.cluster)
        host = inventory.host(p.node)
        if host is None or not host.maintenance:
            raise errors.StepFailed(f"{p.node} is not in maintenance mode after the drain")
        left = [vm for vm in inventory.vms_on(p.node) if vm.state is PowerState.RUNNING]
        if left:
            names = ", ".join(f"{vm.name!r} ({vm.id})" for vm in left)
            raise errors.StepFailed(f"VMs still running on {p.node} after the drain: {names}")
        return inventory

    def _pre_drain_actions(self, ctx: StepContext, p: Params, snapshot: planning.Plan) -> None:
        inventory = self.backend.inventory(p.cluster)
        specs: list[JobSpec] = []
        power = {
            planning.Action.SAVE: self.backend.save_vm,
            planning.Action.SHUTDOWN: self.backend.shutdown_vm,
        }
        for planned in snapshot.vms:
            vm = inventory.vm(planned.id)
            action = planning.Action(planned.action)
            if vm is None or not (action in power or p.moves_first(action)):
                continue
            kind = "move_vm" if p.moves_first(action) else f"{action}_vm"
            if ctx.in_flight(f"{kind}:{vm.id}"):  # re-attach, whatever the VM looks like now
                specs.append(self._reattach_spec(kind, vm.id, planned.name))
            elif vm.host.lower() != p.node.lower():
                continue
            elif action in power and vm.state is PowerState.RUNNING:
                specs.append(self._spec(kind, vm.id, power[action], planned.name))
            elif p.moves_first(action):
                target = _target(inventory, p.node, planned, p.away)
                specs.append(self._move_spec(vm.id, target, planned.name))
        self._all_ok(ctx, specs, p.concurrency, "before the drain")

    def _enter_maintenance(self, ctx: StepContext, p: Params) -> None:
        inventory = self.backend.inventory(p.cluster)
        host = inventory.host(p.node)
        if host is not None and host.maintenance and not ctx.in_flight("enter_maintenance"):
            return
        outcome = self._host_job(ctx, "enter_maintenance", p.node, "draining")
        if outcome.ok:
            return
        # The drain failed (typically one VM would not migrate). Move the running HA VMs
        # still on the node one by one, then try maintenance once more.
        ctx.progress(f"drain failed: {outcome.message}; moving the remaining VMs one by one")
        inventory = self.backend.inventory(p.cluster)
        stuck = [vm for vm in inventory.vms_on(p.node) if vm.ha and vm.uses_memory]
        specs = []
        for vm in stuck:
            planned = planning.PlannedVm(
                vm.id,
                vm.name,
                vm.ha,
                str(vm.state),
                vm.host,
                vm.memory_mb,
                str(planning.Action.LIVE_MIGRATE),
            )
            specs.append(
                self._move_spec(vm.id, _target(inventory, p.node, planned, p.away), vm.name)
            )
        outcomes = ctx.run_jobs(specs, poll=self.backend.job, concurrency=1)
        failed = [o.message for o in outcomes.values() if not o.ok]
        if failed:
            other = [m for m in failed if m not in outcome.message]
            raise errors.StepFailed(
                f"could not drain {p.node}: {outcome.message}; moving its VMs one by one "
                + (f"failed too: {'; '.join(other)}" if other else "met the same error")
            )
        second = self._host_job(ctx, "enter_maintenance", p.node, "draining", again=True)
        if not second.ok:
            raise errors.StepFailed(f"could not put {p.node} in maintenance: {second.message}")

    # ---- Patching ----------------------------------------------------------------------

    def patch(self, ctx: StepContext) -> StepResult:
        p = Params.from_run(ctx.run)
        if p.patcher == EXTERNAL:
            if ctx.signal_pending(PATCHED):
                return Advance(
                    "patched", consume=(PATCHED,), publish={"patch": {"patcher": EXTERNAL}}
                )
            return Wait(
                PATCHED,
                f"patch {p.node}, then run `nodepatch signal {ctx.run.id} "
                f"{PATCHED}` and `nodepatch resume {ctx.run.id}`",
            )
        patcher = self.patcher(p.patcher, p.cluster)
        outcome = ctx.run_job(
            "patch",
            submit=lambda: patcher.begin(p.node),
            poll=patcher.poll,
            find=lambda: patcher.find(p.node),
            label=f"patching {p.node}",
        )
        if not outcome.ok:
            raise errors.StepFailed(
                f"patching {p.node} failed: {outcome.message}; the node stays in maintenance"
            )
        return Advance("patched", publish={"patch": {"patcher": p.patcher, **outcome.details}})

    # ---- Enabling ----------------------------------------------------------------------

    def enable(self, ctx: StepContext) -> StepResult:
        p = Params.from_run(ctx.run)
        host = self._wait_responding(ctx, p)
        if host.maintenance or ctx.in_flight("exit_maintenance"):
            outcome = self._host_job(ctx, "exit_maintenance", p.node, "enabling")
            if not outcome.ok:
                raise errors.StepFailed(
                    f"could not take {p.node} out of maintenance: {outcome.message}"
                )
        after = self.backend.inventory(p.cluster).host(p.node)
        if after is None or after.maintenance or not after.available_for_placement:
            raise errors.StepFailed(f"{p.node} is not available for placement after enabling")
        return Advance("enabled")

    def _wait_responding(self, ctx: StepContext, p: Params) -> Host:
        said = False
        while True:
            host = self.backend.inventory(p.cluster).host(p.node)
            if host is None:
                raise errors.StepFailed(f"{p.node} is no longer in cluster {p.cluster}")
            if host.responding:
                return host
            if not said:
                ctx.progress(f"waiting for {p.node} to respond ({host.state})")
                said = True
            ctx.wait(on=f"waiting for {p.node} to respond; it is {host.state}")

    # ---- Rebalancing -------------------------------------------------------------------

    def rebalance(self, ctx: StepContext) -> StepResult:
        p = Params.from_run(ctx.run)
        snapshot = planning.Plan.from_json(ctx.published["snapshot"])
        drained: Mapping[str, Any] = ctx.published.get("drained", {})
        ours = _moved_by_run(ctx, snapshot)
        inventory = self.backend.inventory(p.cluster)
        report: dict[str, dict[str, Any]] = {}
        specs: list[JobSpec] = []
        free = inventory.free_memory_mb(p.node)
        for planned in snapshot.vms:
            vm = inventory.vm(planned.id)
            entry = report[planned.id] = _report_entry(planned, vm, drained, ours)
            job = f"move_vm:{planned.id}"
            if vm is not None and ctx.in_flight(job):
                specs.append(self._reattach_spec("move_vm", vm.id, planned.name))
                arriving = vm.uses_memory and vm.host.lower() != p.node.lower()
                free -= vm.memory_mb if arriving else 0  # once home, `free` already counts it
                continue
            if vm is None or vm.host.lower() == p.node.lower():
                continue
            left_on = drained.get(planned.id, {}).get("host")
            if left_on is None and planned.id not in ours:
                entry["outcome"] = f"skipped: moved by someone else to {vm.host}"
                continue
            if left_on is not None and vm.host.lower() != str(left_on).lower():
                entry["outcome"] = (
                    f"skipped: moved by someone else to {vm.host} (the run left it on {left_on})"
                )
                continue
            needs = vm.memory_mb if vm.uses_memory else 0
            if needs > free:
                entry["outcome"] = (
                    f"skipped: not enough memory on {p.node} ({free} MB free, {needs} MB needed)"
                )
                continue
            free -= needs
            specs.append(self._move_spec(vm.id, p.node, planned.name))
        failures = self._run(ctx, specs, p.concurrency, report, "move back")
        failures += self._restore_power(ctx, p, snapshot, report)
        publish = {"rebalance": list(report.values())}
        if failures:
            return Advance("fail", publish=publish, details={"reason": "; ".join(failures)})
        trigger = "finish_aborted" if "aborted" in ctx.published else "finish"
        return Advance(trigger, publish=publish, release=(cluster_lock(p.cluster),))

    def _restore_power(
        self,
        ctx: StepContext,
        p: Params,
        snapshot: planning.Plan,
        report: dict[str, dict[str, Any]],
    ) -> list[str]:
        """Start again the VMs this run saved or shut down, wherever they are now (a VM someone
        else moved is not moved back, but its users are not left cut off by this run); note
        changes made by others."""
        inventory = self.backend.inventory(p.cluster)
        specs = []
        ours = {planning.Action.SAVE, planning.Action.SHUTDOWN}
        for planned in snapshot.vms:
            vm = inventory.vm(planned.id)
            entry = report[planned.id]
            job = f"start_vm:{planned.id}"
            powered_by_us = planning.Action(planned.action) in ours
            if vm is None or (entry["outcome"].startswith("skipped") and not powered_by_us):
                continue
            if ctx.in_flight(job):
                specs.append(self._reattach_spec("start_vm", vm.id, planned.name))
            elif vm.state is PowerState.RUNNING and ctx.job_status(job) == "succeeded":
                _note(entry, "started")
            elif str(vm.state) == planned.state:
                continue
            elif powered_by_us and planned.state == PowerState.RUNNING:
                specs.append(self._spec("start_vm", vm.id, self.backend.start_vm, planned.name))
            else:
                _note(
                    entry,
                    f"power state changed by someone else ({planned.state} -> "
                    f"{vm.state}), left as is",
                )
        return self._run(ctx, specs, p.concurrency, report, "start")

    # ---- helpers -----------------------------------------------------------------------

    def _host_job(
        self, ctx: StepContext, kind: str, node: str, label: str, *, again: bool = False
    ) -> JobOutcome:
        """Enter or exit maintenance as a journaled job (`again`: a second, separate try)."""
        call = {
            "enter_maintenance": self.backend.enter_maintenance,
            "exit_maintenance": self.backend.exit_maintenance,
        }[kind]
        return ctx.run_job(
            f"{kind}_again" if again else kind,
            submit=lambda: call(node),
            poll=self.backend.job,
            find=lambda: self.backend.find_job(kind, node),
            label=f"{label} {node}",
        )

    def _spec(self, kind: str, vm_id: str, call: Callable[[str], str], name: str) -> JobSpec:
        return JobSpec(
            name=f"{kind}:{vm_id}",
            submit=lambda: call(vm_id),
            find=lambda: self.backend.find_job(kind, vm_id),
            label=f"{kind.replace('_vm', '')} {name}",
        )

    def _reattach_spec(self, kind: str, vm_id: str, name: str) -> JobSpec:
        """A job already journaled as started: run_jobs polls it and never calls submit."""

        def unreachable() -> str:
            raise errors.StepFailed(f"{kind} of {name!r} was journaled but cannot be re-attached")

        return JobSpec(
            name=f"{kind}:{vm_id}",
            submit=unreachable,
            find=lambda: self.backend.find_job(kind, vm_id),
            label=f"{kind} {name}",
        )

    def _move_spec(self, vm_id: str, host: str, name: str) -> JobSpec:
        return JobSpec(
            name=f"move_vm:{vm_id}",
            submit=lambda: self.backend.move_vm(vm_id, host),
            find=lambda: self.backend.find_job("move_vm", vm_id),
            label=f"move {name} to {host}",
        )

    def _all_ok(self, ctx: StepContext, specs: list[JobSpec], concurrency: int, when: str) -> None:
        outcomes = ctx.run_jobs(specs, poll=self.backend.job, concurrency=concurrency)
        failed = [f"{s.label or s.name}: {outcomes[s.name].message}" for s in specs]
        failed = [f for s, f in zip(specs, failed, strict=True) if not outcomes[s.name].ok]
        if failed:
            raise errors.StepFailed(f"failed {when}: " + "; ".join(failed))

    def _run(
        self,
        ctx: StepContext,
        specs: list[JobSpec],
        concurrency: int,
        report: dict[str, dict[str, Any]],
        what: str,
    ) -> list[str]:
        """Run jobs, recording each VM's outcome; a refused or failed job fails only its VM."""
        outcomes = ctx.run_jobs(specs, poll=self.backend.job, concurrency=concurrency)
        failures: list[str] = []
        for spec in specs:
            entry = report[_vm_of(spec)]
            outcome = outcomes[spec.name]
            if not outcome.ok:
                entry["outcome"] = f"failed to {what}: {outcome.message}"
                failures.append(f"{entry['name']!r} ({entry['id']}): {outcome.message}")
            elif what == "start":
                _note(entry, "started")
            else:
                entry["outcome"] = "moved back"
        return failures


def _note(entry: dict[str, Any], outcome: str) -> None:
    """Add to a VM's outcome: `moved back` + `started` reads `moved back, started`."""
    done = entry["outcome"] in ("in place", "pending")
    entry["outcome"] = outcome if done else f"{entry['outcome']}, {outcome}"


def _vm_of(spec: JobSpec) -> str:
    """The VM ID in a job name such as `move_vm:<id>` or `start_vm:<id>`."""
    return spec.name.split(":", 1)[1]


def _target(
    inventory: Inventory, node: str, planned: planning.PlannedVm, away: tuple[str, ...] = ()
) -> str:
    """Where to move a VM now: its planned target if it still fits, else the best fit (never a
    node of the same wave)."""
    vm = inventory.vm(planned.id)
    if vm is None:
        raise errors.StepFailed(f"VM {planned.name!r} ({planned.id}) disappeared")
    action = planning.Action(planned.action)
    if planned.target and planning.fits(inventory, planned.target, vm, action):
        return planned.target  # the plan's target, while it still has room
    targets, problems = planning.place(
        inventory, node, [(vm, planning.Action(planned.action))], away=away
    )
    if problems:
        raise errors.StepFailed("; ".join(problems))
    return targets[vm.id]


def _moved_by_run(ctx: StepContext, snapshot: planning.Plan) -> set[str]:
    """The snapshot's VMs that a side effect of this run's drain may have moved, from its
    journal: a move of the VM itself, or a maintenance job of the node for a VM that the drain
    live-migrates. A request refused on submission moved nothing."""
    jobs = {e.job for e in ctx.jobs_in(DRAINING) if e.may_have_acted}
    drained_node = bool(jobs & {"enter_maintenance", "enter_maintenance_again"})
    return {
        vm.id
        for vm in snapshot.vms
        if f"move_vm:{vm.id}" in jobs
        or (drained_node and vm.action == planning.Action.LIVE_MIGRATE)
    }


def _placement(
    inventory: Inventory, snapshot: planning.Plan, node: str, ours: set[str]
) -> dict[str, Any]:
    """Where the drain left the snapshot's VMs: those still on the node and those the run
    moved. A VM someone else moved is not the run's to bring back, so it is not recorded."""
    out = {}
    for planned in snapshot.vms:
        vm = inventory.vm(planned.id)
        if vm is not None and (vm.id in ours or vm.host.lower() == node.lower()):
            out[planned.id] = {"host": vm.host, "state": str(vm.state)}
    return out


def _report_entry(
    planned: planning.PlannedVm, vm: Any, drained: Mapping[str, Any], ours: set[str]
) -> dict[str, Any]:
    during = drained.get(planned.id, {}).get("host")
    if during is None:  # a crash before the drain published: the run's own move went here
        during = vm.host if vm is not None and planned.id in ours else planned.host
    if vm is None:
        outcome = "deleted during the run"
    elif vm.host.lower() != planned.host.lower():
        outcome = "pending"
    else:  # home: it either never left, or an earlier attempt of this step brought it back
        outcome = "in place" if during.lower() == planned.host.lower() else "moved back"
    return {
        "id": planned.id,
        "name": planned.name,
        "from": planned.host,
        "to": during,
        "action": planned.action,
        "state_before": planned.state,
        "outcome": outcome,
    }
