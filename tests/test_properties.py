"""Property: random sequences of crashes, resumes, aborts, competing runs and cluster faults.

Driven in-process (Runner + NodePatch + SimulatedCluster on a real database). A crash is a
BaseException raised from a backend proxy before or after its N-th mutating call, or from the
N-th engine crash point passed (an uncommitted transaction is rolled back, as after a kill).
After every action: no two nodes of the cluster are in maintenance. When the run finishes: no
VM of its snapshot is left Saved or off unless it was so before, and every one is back on its
original host in its original power state, or reported skipped/deleted with a reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import crashpoints, errors
from engine.runner import Runner, RunnerSettings
from engine.store import Store
from tests import durability as d
from workflows.backends.simulated import SimulatedCluster
from workflows.node_patch import NodePatch, Params, subject
from workflows.patchers.simulated import SimulatedPatcher
from workflows.plan import NonHaPolicy, Policies, StoppedHaPolicy

SETTINGS = RunnerSettings(
    lease_ttl_s=30,
    poll_interval_s=0.001,
    retry_attempts=3,
    retry_backoff_s=0.001,
    retry_backoff_max_s=0.002,
    timeouts_s={"Patching": 5.0},
)
NODE_VMS = ("h1", "h2", "n1", "s1")
FINAL = ("Done", "Aborted", "Refused")


class Crash(BaseException):
    """The process dies here (not an Exception: nothing in the product may catch it)."""


class Chaos:
    """Arms one crash: at the N-th mutating backend call (before or after it) or the N-th
    engine crash point passed."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.left = 0
        self.after = False

    def arm(self, plan: tuple[str, int, bool] | None) -> None:
        self.kind, self.left, self.after = plan if plan else (None, 0, False)

    def tick(self, kind: str) -> bool:
        if self.kind != kind:
            return False
        self.left -= 1
        if self.left > 0:
            return False
        self.kind = None
        return True

    def point(self, _name: str) -> None:
        if self.tick("point"):
            raise Crash


class CrashingBackend:
    """A proxy over the simulated cluster that dies around a mutating call when armed."""

    def __init__(self, inner: SimulatedCluster, chaos: Chaos) -> None:
        self._inner, self._chaos = inner, chaos

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in d.MUTATING_OPS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            crash = self._chaos.tick("call")
            after = self._chaos.after
            if crash and not after:
                raise Crash
            result = attr(*args, **kwargs)
            if crash:
                raise Crash
            return result

        return call


# ---- the world of one example -----------------------------------------------------------------


class World:
    def __init__(self, store: Store, root: Path, policies: Policies) -> None:
        self.cluster = f"p{uuid.uuid4().hex[:8]}"
        self.sim = SimulatedCluster.create(
            root / f"{self.cluster}.json",
            d.scenario(
                d.vm("h1", "hv1"),
                d.vm("h2", "hv1"),
                d.vm("n1", "hv1", ha=False),
                d.vm("s1", "hv1", state="PowerOff"),
                d.vm("o1", "hv2"),
                d.vm("o2", "hv3", ha=False, state="PowerOff"),
                cluster=self.cluster,
            ),
        )
        self.chaos = Chaos()
        backend = CrashingBackend(self.sim, self.chaos)
        patch = NodePatch(backend, lambda *_: SimulatedPatcher(backend))  # type: ignore[arg-type]
        self.store = store
        self.runner = Runner(store, patch.workflow(), SETTINGS, actor="prop@local:1")
        self.policies = policies
        self.before = d.placement(self.sim)
        self.run_id = self.create("hv1")

    def create(self, node: str) -> str:
        params = Params(self.cluster, node, self.policies, "simulated", 2)
        return self.runner.create(subject(self.cluster, node), params.to_json()).id

    def state(self, run_id: str | None = None) -> str:
        return self.store.get(run_id or self.run_id).state

    def drive(self, run_id: str | None = None, crash: tuple[str, int, bool] | None = None) -> None:
        self.chaos.arm(crash)
        try:
            self.runner.drive(run_id or self.run_id, retry=True)
        except Crash:
            pass
        except errors.EngineError:  # e.g. a lock held by a crashed competitor: try later
            pass
        finally:
            self.chaos.arm(None)


@contextmanager
def crash_points(chaos: Chaos) -> Iterator[None]:
    original = crashpoints.hit
    crashpoints.hit = chaos.point  # type: ignore[assignment]
    try:
        yield
    finally:
        crashpoints.hit = original  # type: ignore[assignment]


# ---- invariants -------------------------------------------------------------------------------


def at_most_one_node_in_maintenance(w: World) -> None:
    down = [h for h, m in d.maintenance(w.sim).items() if m]
    assert len(down) <= 1, down


def finished_run_left_everything_as_found(w: World) -> None:
    run = w.store.get(w.run_id)
    published = w.store.published(w.run_id)
    if "snapshot" not in published:  # aborted before its preflight: nothing may have changed
        assert d.placement(w.sim) == w.before
        return
    snapshot = {v["id"]: v for v in published["snapshot"]["vms"]}
    outcomes = {e["id"]: e["outcome"] for e in published.get("rebalance", [])}
    now = d.placement(w.sim)
    assert not d.maintenance(w.sim)["hv1"], "the node is left in maintenance"
    for vm_id, planned in snapshot.items():
        if vm_id not in now:
            assert outcomes.get(vm_id) == "deleted during the run", (vm_id, outcomes)
            reason_is_true(w, vm_id, outcomes[vm_id])
            continue
        host, power = now[vm_id]
        if power in ("Saved", "PowerOff"):
            assert power == planned["state"], (vm_id, now[vm_id], planned, run.state)
        if (host, power) != (planned["host"], planned["state"]):
            outcome = outcomes.get(vm_id, "")
            assert outcome.startswith("skipped: "), (vm_id, now[vm_id], planned, outcomes)
        reason_is_true(w, vm_id, outcomes.get(vm_id, ""))


def reason_is_true(w: World, vm_id: str, outcome: str) -> None:
    """A VM reported as moved by someone else was moved by someone else (the simulator counts
    every administrator's move), to the host named; a VM reported deleted was deleted."""
    admin = d.operations(w.sim.counts())
    if "someone else" in outcome:
        assert admin.get(f"admin_move:{vm_id}", 0) >= 1, (vm_id, outcome, admin)
        assert outcome.startswith(
            f"skipped: moved by someone else to {d.placement(w.sim)[vm_id][0]}"
        )
    if outcome == "deleted during the run":
        assert admin.get(f"admin_delete:{vm_id}", 0) == 1, (vm_id, outcome, admin)


# ---- the property -----------------------------------------------------------------------------

FAULTS = st.one_of(
    st.builds(
        lambda op, n: {"type": "transient", "op": op, "times": n},
        st.sampled_from(["any", "job", "move_vm", "inventory", "enter_maintenance"]),
        st.integers(1, 2),
    ),
    st.builds(
        lambda vm, n: {"type": "migration_fails", "vm": vm, "times": n},
        st.sampled_from(NODE_VMS),
        st.integers(1, 6),
    ),
    st.builds(
        lambda op: {"type": "job_fails", "op": op, "target": "hv1"},
        st.sampled_from(["enter_maintenance", "exit_maintenance", "reboot_host"]),
    ),
    st.builds(
        lambda vm, on: {"type": "delete_vm", "vm": vm, "on": on},
        st.sampled_from(NODE_VMS),
        st.sampled_from(["reboot_host", "exit_maintenance"]),
    ),
    st.builds(
        lambda vm, to, on: {"type": "move_vm", "vm": vm, "to": to, "on": on},
        st.sampled_from(NODE_VMS),
        st.sampled_from(["hv2", "hv3"]),
        st.sampled_from(["reboot_host", "exit_maintenance"]),
    ),
    st.just({"type": "auth_fails", "times": 1}),
)
CRASHES = st.one_of(
    st.tuples(st.just("call"), st.integers(1, 5), st.booleans()),
    st.tuples(st.just("point"), st.integers(1, 16), st.just(False)),
)
DRIVE = st.tuples(st.just("drive"), CRASHES)
ACTIONS = st.lists(
    st.one_of(
        DRIVE,
        DRIVE,
        DRIVE,
        st.tuples(st.just("fault"), FAULTS),
        st.tuples(st.just("compete"), st.none()),
        st.tuples(st.just("abort"), st.none()),
    ),
    min_size=1,
    max_size=10,
)
POLICIES = st.builds(
    Policies,
    st.sampled_from([NonHaPolicy.SAVE, NonHaPolicy.SHUTDOWN, NonHaPolicy.MIGRATE]),
    st.sampled_from(list(StoppedHaPolicy)),
)


def compete(w: World) -> None:
    """Another run on another node of the same cluster, while this run holds it: refused in
    Preflight (or failed there on a fault, then aborted), its node and VMs untouched, holding
    nothing."""
    if w.store.locks(w.run_id) == []:
        return
    before = d.operations(w.sim.counts())
    other = w.create("hv2")
    w.drive(other)
    assert w.state(other) in ("Refused", "Failed")  # Failed: a fault met in its Preflight
    assert w.store.get(other).failed_from == "Preflight"
    assert d.operations(w.sim.counts()) == before
    if w.state(other) == "Failed":
        w.runner.signal(other, "abort")
        w.drive(other)
        assert w.state(other) == "Aborted"
    assert w.store.locks(other) == []


def step(w: World, action: str, arg: Any) -> None:
    if action == "drive":
        w.drive(crash=arg)
    elif action == "fault":
        w.sim.inject(arg)
    elif action == "abort" and w.state() not in FINAL:
        w.runner.signal(w.run_id, "abort")
    elif action == "compete":
        compete(w)


def finish(w: World) -> None:
    """No more faults: resume until the run is final, aborting it if it keeps failing."""
    w.sim.clear_faults()
    for attempt in range(6):
        if w.state() in FINAL:
            return
        if attempt == 3:
            w.runner.signal(w.run_id, "abort")
        w.drive()
    raise AssertionError(f"run stuck in {w.state()}: {w.store.get(w.run_id).error}")


@pytest.mark.slow
def test_random_crashes_resumes_aborts_and_faults_keep_the_invariants(
    db_url: str, tmp_path: Path
) -> None:
    """Whatever happens (crashes around cluster calls and commits, resumes, aborts, competing
    runs, cluster faults), nodepatch never has two nodes of a cluster in maintenance, and a
    finished run leaves every VM of its snapshot as it found it, or reported why not."""
    with d.store(db_url) as store:
        run_example(store, tmp_path)


def run_example(store: Store, root: Path) -> None:
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(policies=POLICIES, actions=ACTIONS)
    def example(policies: Policies, actions: list[tuple[str, Any]]) -> None:
        w = World(store, root, policies)
        with crash_points(w.chaos):
            for action, arg in actions:
                was_final = w.state() in FINAL
                step(w, action, arg)
                at_most_one_node_in_maintenance(w)
                if w.state() in FINAL and not was_final:
                    finished_run_left_everything_as_found(w)
            if w.state() not in FINAL:
                finish(w)
                at_most_one_node_in_maintenance(w)
                finished_run_left_everything_as_found(w)

    example()
