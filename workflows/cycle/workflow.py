"""The cluster cycle: a parent run whose node patches are child runs.

Preflight → Rolling → Done, or Failed when a node failed (resume retries the failed nodes and
goes on with the ones not started); Aborting → Aborted; Refused when preflight finds a reason not
to start. Rolling is one re-entrant step: it reads where every node stands (child runs and the
facts it journaled), acts (gate a node that finished, retry or compensate one that failed, start
the next wave), and sleeps until a child ends or its poll interval passes. Every wait is a
durable timer: soak between waves, the next maintenance window.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from engine.context import StepContext
from engine.model import Run
from engine.workflow import Advance, Sleep, StepResult, Transition, Wait, Workflow
from workflows import plan as planning
from workflows.backends.base import ClusterBackend, HostState, Inventory
from workflows.cycle import gate, view, waves
from workflows.cycle.params import CLUSTER_CYCLE, CycleParams
from workflows.cycle.scripts import NodeScripts
from workflows.cycle.windows import show_duration
from workflows.node_patch import NODE_PATCH, cluster_lock, on_abort, subject

PREFLIGHT, ROLLING, ABORTING = "Preflight", "Rolling", "Aborting"
DONE, FAILED, ABORTED, REFUSED, ABANDONED = "Done", "Failed", "Aborted", "Refused", "Abandoned"
STATES = (PREFLIGHT, ROLLING, ABORTING, DONE, FAILED, ABORTED, REFUSED, ABANDONED)
FINAL = frozenset({DONE, ABORTED, REFUSED, ABANDONED})
CONTINUE = "continue"
ABORT = "abort"

TRANSITIONS = (
    Transition("start", PREFLIGHT, ROLLING),
    Transition("refuse", PREFLIGHT, REFUSED),
    Transition("finish", ROLLING, DONE),
    Transition(CONTINUE, ROLLING, ROLLING),
    Transition("abort_unstarted", PREFLIGHT, ABORTED),
    Transition("abort_unstarted", FAILED, ABORTED),
    Transition("abort", ROLLING, ABORTING),
    Transition("abort", FAILED, ABORTING),
    Transition("abort", ABORTING, ABORTING),
    Transition("aborted", ABORTING, ABORTED),
)

History = Callable[[str, str | None], list[float]]  # durations (s) of past Done node runs


def cycle_subject(cluster: str) -> str:
    return f"cycle:{cluster}"


class ClusterCycle:
    def __init__(self, backend: ClusterBackend, scripts: NodeScripts, history: History) -> None:
        self.backend, self.scripts, self.history = backend, scripts, history

    def workflow(self) -> Workflow:
        return Workflow(
            name=CLUSTER_CYCLE,
            version=1,
            states=STATES,
            initial=PREFLIGHT,
            failed=FAILED,
            final=FINAL,
            transitions=TRANSITIONS,
            steps={PREFLIGHT: self.preflight, ROLLING: self.roll, ABORTING: self.aborting},
            signals=frozenset({CONTINUE}),
            on_abort=on_abort,
            abandoned=ABANDONED,
        )

    # ---- Preflight ---------------------------------------------------------------------

    def preflight(self, ctx: StepContext) -> StepResult:
        p = CycleParams.from_run(ctx.run)
        lock = cluster_lock(p.cluster)
        plan = make_plan(
            self.backend.inventory(p.cluster),
            p,
            lock_holder=ctx.lock_holder(lock),
            interference=self.backend.interference(p.cluster),
            estimate=lambda node: self.estimate(p, node),
        )
        ctx.progress(
            f"cycle plan: {len(plan['order'])} node(s) in {len(plan['waves'])} wave(s)"
            + (f"; {len(plan['problems'])} problem(s)" if plan["problems"] else "")
        )
        if plan["problems"]:
            reason = {"reason": "; ".join(plan["problems"])}
            return Advance("refuse", publish={"plan": plan}, details=reason, error=reason)
        return Advance("start", publish={"plan": plan}, acquire=(lock,), if_held="refuse")

    def estimate(self, p: CycleParams, node: str) -> float:
        """A node's expected duration: the median of its past Done runs, else the cluster's,
        else the configured default."""
        for durations in (self.history(p.cluster, node), self.history(p.cluster, None)):
            if durations:
                return float(statistics.median(durations))
        return p.default_node_s

    # ---- Rolling -----------------------------------------------------------------------

    def roll(self, ctx: StepContext) -> StepResult:
        p = CycleParams.from_run(ctx.run)
        round_ = view.current_round(ctx.published)
        self._act(ctx, p, round_)
        facts = view.facts_of(ctx.jobs_in(ROLLING))
        nodes = view.node_views(p.order, ctx.children(), facts, round_, p.retries_per_node)
        in_flight = [n for n in nodes if n.status in view.IN_FLIGHT]
        if in_flight:
            return Sleep(ctx.now() + dt.timedelta(seconds=p.poll_s), _waiting(in_flight))
        failed = [n for n in nodes if n.status == view.FAILED]
        pending = [n.node for n in nodes if n.status == view.PENDING]
        halt = self._halt_reason(ctx, p, nodes)
        if halt is None and len(failed) > p.max_failed_nodes:
            halt = (
                f"{len(failed)} node(s) failed, more than --max-failed-nodes {p.max_failed_nodes}"
            )
        if halt is None and pending:
            return self._next_wave(ctx, p, round_, nodes, facts)
        if not failed and not pending:
            consume = (CONTINUE,) if ctx.signal_pending(CONTINUE) else ()
            return Advance(
                "finish",
                publish={"summary": summary(nodes)},
                release=(cluster_lock(p.cluster),),
                consume=consume,
            )
        return self._halt(p, round_, nodes, halt)

    def _act(self, ctx: StepContext, p: CycleParams, round_: int) -> None:
        """Gate the nodes whose run finished, retry or compensate the ones that failed."""
        facts = view.facts_of(ctx.jobs_in(ROLLING))
        for n in view.node_views(p.order, ctx.children(), facts, round_, p.retries_per_node):
            if n.run is None:
                continue
            if n.status == view.GATING:
                result = ctx.remember(f"gate:{n.node}:{n.run.id}", partial(self._gate, ctx, p, n))
                ctx.progress(f"{n.node}: health gate {'passed' if result['ok'] else 'failed'}")
            elif n.status == view.RETRYING:
                ctx.remember(f"retry:{n.run.id}:{n.retries + 1}", partial(_retry, ctx, n))
                ctx.progress(
                    f"{n.node}: {n.outcome}; retry {n.retries + 1} of {p.retries_per_node}"
                )
            elif (
                n.status == view.FAILED
                and n.run.finished_at is None
                and not n.compensated
                and not p.leaves_failed_nodes
            ):
                ctx.remember(f"compensate:{n.run.id}", partial(_compensate, ctx, n))
                ctx.progress(f"{n.node}: {n.outcome}; compensating (aborting run {n.run.id})")

    def _gate(self, ctx: StepContext, p: CycleParams, n: view.NodeView) -> dict[str, Any]:
        assert n.run is not None
        env = {"NODEPATCH_NODE": n.node, "NODEPATCH_CLUSTER": p.cluster}
        env["NODEPATCH_RUN"] = n.run.id
        found: list[gate.Check] = []
        if p.post_node_script:
            post = self.scripts.run(p.cluster, n.node, p.post_node_script, "post")
            found.append(gate.Check("post-node script", post.ok, post.output or "ok"))
        snapshot = planning.Plan.from_json(ctx.published_of(n.run.id)["snapshot"])
        found += gate.checks(self.backend.inventory(p.cluster), n.node, snapshot)
        if p.health_check:
            found.append(gate.run_health_check(p.health_check, env, p.health_timeout_s))
        return {
            "ok": all(c.ok for c in found),
            "checks": [c.to_json() for c in found],
            "at": ctx.now().isoformat(),
        }

    def _storage(
        self, ctx: StepContext, p: CycleParams, round_: int, index: int
    ) -> Sleep | str | None:
        """Before a wave: Storage Spaces Direct repair jobs finished and virtual disks healthy
        (a durable wait, bounded by `cycle.storage_timeout`); a string when it never healed."""
        health = self.backend.storage_health(p.cluster)
        if not health.checked or not health.s2d or health.healthy:
            return None
        until = ctx.timer(f"storage:r{round_}:{index}", p.storage_timeout_s)
        if ctx.now() >= until:
            limit = show_duration(dt.timedelta(seconds=p.storage_timeout_s))
            return f"storage did not heal within {limit}: {health.summary()}"
        wake = min(until, ctx.now() + dt.timedelta(seconds=p.poll_s))
        return Sleep(wake, f"waiting for storage before wave {index + 1}: {health.summary()}")

    def _script(self, p: CycleParams, node: str, path: str, phase: str) -> dict[str, Any]:
        return self.scripts.run(p.cluster, node, path, phase).to_json()

    def _halt_reason(
        self,
        ctx: StepContext,
        p: CycleParams,
        nodes: Sequence[view.NodeView],
    ) -> str | None:
        changes = [
            f"{n.node}: {change}"
            for n in nodes
            if n.status == view.FAILED and n.gate is not None
            for change in gate.unexpected(n.gate)
        ]
        if changes:
            return "unexpected change to the cluster: " + "; ".join(changes)
        if p.stop_after_s is not None:
            started = ctx.run.created_at
            if ctx.now() >= started + dt.timedelta(seconds=p.stop_after_s):
                return f"--stop-after {show_duration(dt.timedelta(seconds=p.stop_after_s))} passed"
        return None

    def _next_wave(
        self,
        ctx: StepContext,
        p: CycleParams,
        round_: int,
        nodes: Sequence[view.NodeView],
        facts: dict[str, dict[str, Any]],
    ) -> StepResult:
        pending = [n.node for n in nodes if n.status == view.PENDING]
        started = view.waves_of(facts, round_)
        index = len(started)
        if started and any(node in pending for node in started[-1]["nodes"]):
            return self._start(ctx, p, round_, index - 1, started[-1])  # a crash mid-start
        held = _held_after(ctx, p, nodes) or _skip_wait(ctx, index) or _soak(ctx, p, round_, index)
        if held is not None:
            return held
        inventory = self.backend.inventory(p.cluster)
        left = [n.node for n in nodes if n.status == view.FAILED and p.leaves_failed_nodes]
        wave = waves.next_wave(
            inventory,
            pending,
            max_parallel=p.max_parallel,
            headroom=p.headroom,
            policies=p.policies,
            away=left,
        )
        estimate = max(self.estimate(p, node) for node in wave.nodes)
        blocked: Sleep | str | None = self._storage(ctx, p, round_, index) or _cluster_trouble(
            inventory, left
        )
        if not blocked and index not in ctx.published.get("go_now", []):
            blocked = _window(ctx, p, wave, index, estimate)
        if isinstance(blocked, Sleep):
            return blocked
        if blocked:
            return self._halt(p, round_, nodes, blocked)
        record = {**wave.to_json(), "estimate_s": estimate, "left": left}
        record["at"] = ctx.now().isoformat()
        chosen = ctx.remember(f"wave:r{round_}:{index}", lambda: record)
        ctx.progress(f"wave {index + 1}: {', '.join(chosen['nodes'])} ({chosen['reason']})")
        return self._start(ctx, p, round_, index, chosen)

    def _start(
        self, ctx: StepContext, p: CycleParams, round_: int, index: int, wave: dict[str, Any]
    ) -> StepResult:
        members: list[str] = list(wave["nodes"])
        away_base: list[str] = list(wave.get("left", []))
        parallel = len(members) > 1 or bool(away_base)
        for node in members:
            if p.pre_node_script:
                script = partial(self._script, p, node, p.pre_node_script, "pre")
                pre = ctx.remember(f"pre:{node}:r{round_}", script)
                if not pre["ok"]:
                    ctx.progress(f"{node}: pre-node script failed; the node is skipped")
                    continue
            away = [m for m in members if m != node] + away_base if parallel else []
            targets = wave.get("targets", {}).get(node, {}) if parallel else {}
            child = ctx.start_child(
                view.child_name(node, round_),
                workflow=NODE_PATCH,
                version=1,
                subject=subject(p.cluster, node),
                params=p.node_params(node, away, targets),
            )
            ctx.progress(f"{node}: node run {child.id} started")
        return Sleep(ctx.now(), f"wave {index + 1} started; waiting for its node runs")

    def _halt(
        self, p: CycleParams, round_: int, nodes: Sequence[view.NodeView], why: str | None
    ) -> StepResult:
        failed = [n for n in nodes if n.status == view.FAILED]
        pending = [n.node for n in nodes if n.status == view.PENDING]
        parts = [f"{n.node} ({n.run.id if n.run else 'not run'}): {n.outcome}" for n in failed]
        reason = ("failed nodes: " + "; ".join(parts)) if parts else ""
        if why:
            reason = f"halted: {why}" + (f"; {reason}" if reason else "")
        if pending:
            reason += f"; not started: {', '.join(pending)}"
        halted = {
            "round": round_,
            "failed": [n.node for n in failed],
            "not_started": pending,
            "why": why,
        }
        return Advance(
            "fail",
            publish={"halted": halted, "summary": summary(nodes)},
            details={"reason": reason.lstrip("; ")},
        )

    # ---- Aborting ----------------------------------------------------------------------

    def aborting(self, ctx: StepContext) -> StepResult:
        """Every active node run was sent `abort` with the cycle's abort (same transaction);
        wait until each has ended. A node run that fails while compensating is retried."""
        p = CycleParams.from_run(ctx.run)
        active = [c for c in ctx.children() if c.finished_at is None]
        for child in active:
            if child.failed_from is not None and ABORT not in _pending(ctx, child):
                tries = view.facts_of(ctx.jobs_in(ABORTING))
                count = sum(1 for k in tries if k.startswith(f"retry:{child.id}:"))
                if count >= max(p.retries_per_node, 1):
                    continue
                ctx.remember(f"retry:{child.id}:{count + 1}", partial(_retry_run, ctx, child))
        active = [c for c in ctx.children() if c.finished_at is None]
        stuck = [c for c in active if c.failed_from is not None and ABORT not in _pending(ctx, c)]
        if stuck and len(stuck) == len(active):
            names = ", ".join(f"{c.params.get('node')} (run {c.id})" for c in stuck)
            return Advance("fail", details={"reason": f"could not compensate {names}"})
        if active:
            names = ", ".join(f"{c.params.get('node')} ({c.state})" for c in active)
            return Sleep(
                ctx.now() + dt.timedelta(seconds=p.poll_s), f"compensating node runs: {names}"
            )
        return Advance("aborted", release=(cluster_lock(p.cluster),))


def _retry(ctx: StepContext, n: view.NodeView) -> dict[str, Any]:
    assert n.run is not None
    return {**_retry_run(ctx, n.run), "after": n.outcome}


def _retry_run(ctx: StepContext, run: Run) -> dict[str, Any]:
    return {"retried": ctx.retry_child(run)}


def _compensate(ctx: StepContext, n: view.NodeView) -> dict[str, Any]:
    assert n.run is not None
    reason = n.outcome.removeprefix("failed: ")
    return {"reason": reason, "sent": ctx.signal_child(n.run, ABORT)}


def _pending(ctx: StepContext, child: Run) -> list[str]:
    return ctx.pending_signals_of(child)


def _waiting(in_flight: Sequence[view.NodeView]) -> str:
    parts = []
    for n in in_flight:
        run = n.run
        if run is not None and run.waiting_for:
            parts.append(
                f"{n.node} waits for signal {run.waiting_for!r}: "
                f"`nodepatch signal {run.id} {run.waiting_for}`"
            )
        else:
            parts.append(f"{n.node} ({n.outcome})")
    return "waiting for node runs: " + "; ".join(parts)


def _held_after(
    ctx: StepContext, p: CycleParams, nodes: Sequence[view.NodeView]
) -> StepResult | None:
    """--until-node: once that node is done, wait for `continue` (the split-process pattern)."""
    done = {n.node for n in nodes if n.status == view.DONE}
    if not p.until_node or p.until_node not in done:
        return None
    if ctx.published.get("continued") == p.until_node:
        return None
    if ctx.signal_pending(CONTINUE):
        return Advance(CONTINUE, consume=(CONTINUE,), publish={"continued": p.until_node})
    return Wait(
        CONTINUE,
        f"stopped after node {p.until_node} as asked (--until-node): continue with "
        f"`nodepatch signal {ctx.run.id} {CONTINUE}` and `nodepatch resume {ctx.run.id}`",
    )


def _skip_wait(ctx: StepContext, index: int) -> Advance | None:
    """`resume --now` on a sleeping cycle sends `continue`: the soak and the window wait before
    wave `index` are skipped (recorded, so the skip survives the transition that consumes it)."""
    if index in ctx.published.get("go_now", []) or not ctx.signal_pending(CONTINUE):
        return None
    go_now = [*ctx.published.get("go_now", []), index]
    return Advance(CONTINUE, consume=(CONTINUE,), publish={"go_now": go_now})


def _soak(ctx: StepContext, p: CycleParams, round_: int, index: int) -> Sleep | None:
    """The soak after a wave, a durable timer (the same moment after a crash or a wake-up)."""
    if not index or not p.soak_s or index in ctx.published.get("go_now", []):
        return None
    until = ctx.timer(f"soak:r{round_}:{index}", p.soak_s)
    if ctx.now() >= until:
        return None
    return Sleep(
        until, f"soaking {show_duration(dt.timedelta(seconds=p.soak_s))} after wave {index}"
    )


def _window(
    ctx: StepContext, p: CycleParams, wave: waves.Wave, index: int, estimate: float
) -> Sleep | str | None:
    """None when the wave fits in the time left in a window; else a Sleep until the next
    window long enough, or why no window ever will be."""
    schedule = p.schedule
    time_left = schedule.time_left(ctx.now())
    need = dt.timedelta(seconds=estimate)
    if time_left is not None and time_left >= need:
        return None
    opening = schedule.next_opening(ctx.now(), long_enough=need)
    names = ", ".join(wave.nodes)
    if opening is None:
        return f"no maintenance window is long enough for {names} (estimated {show_duration(need)})"
    why = (
        "no window is open"
        if time_left is None
        else f"{show_duration(time_left)} left in the window"
    )
    return Sleep(
        opening,
        f"{why}; wave {index + 1} ({names}) needs about {show_duration(need)}: waiting for the "
        "next window",
    )


def _cluster_trouble(inventory: Inventory, left: Sequence[str]) -> str:
    """A node not patched by this cycle that went down or into maintenance meanwhile."""
    gone = {n.lower() for n in left}
    problems = []
    for host in inventory.hosts:
        if host.name.lower() in gone:
            continue
        if host.state is HostState.DOWN:
            problems.append(f"node {host.name} is down")
        elif host.maintenance:
            problems.append(f"node {host.name} is in maintenance (not by this cycle)")
    return ("unexpected change to the cluster: " + "; ".join(problems)) if problems else ""


def summary(nodes: Sequence[view.NodeView]) -> dict[str, Any]:
    return {n.node: {"status": n.status, "outcome": n.outcome} for n in nodes}


def make_plan(
    inventory: Inventory,
    p: CycleParams,
    *,
    lock_holder: str | None,
    interference: Sequence[str],
    estimate: Callable[[str], float],
) -> dict[str, Any]:
    """The cycle's plan, before any side effect: order, waves (and why each has its size), the
    per-VM plan of every node, and every problem that refuses the cycle."""
    problems: list[str] = []
    if lock_holder:
        problems.append(
            f"cluster {inventory.cluster} is held by nodepatch run {lock_holder}: wait for it "
            f"to end, or `nodepatch abort {lock_holder}`"
        )
    problems += list(interference)
    vms: dict[str, list[dict[str, Any]]] = {}
    for node in p.order:
        node_plan = planning.make_plan(inventory, node, p.policies)
        vms[node] = [vm.to_json() for vm in node_plan.vms]
        problems += [
            f"{node}: {problem}" if "node " not in problem else problem
            for problem in node_plan.problems
        ]
    plan_waves = waves.plan_waves(
        inventory,
        p.order,
        max_parallel=p.max_parallel,
        headroom=p.headroom,
        policies=p.policies,
    )
    longest = p.schedule.longest()
    for node in p.order:
        need = dt.timedelta(seconds=estimate(node))
        if need > longest:
            problems.append(
                f"{node}: estimated {show_duration(need)}, longer than the longest maintenance "
                f"window ({show_duration(longest)})"
            )
    return {
        "cluster": inventory.cluster,
        "order": list(p.order),
        "waves": [{"nodes": list(w.nodes), "reason": w.reason} for w in plan_waves],
        "vms": vms,
        "problems": list(dict.fromkeys(problems)),
    }
