"""The node patch at its edges, driven in this process on a real database and the simulated
cluster: aborting before anything was touched, a cluster held by another run, VMs that change
under the run, a failed drain, a crash between a request and its journal entry, and the move
back. Assertions are on the cluster's state and its per-target operation counts. Each test
names the mutants of `make mutate` it holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine import crashpoints
from engine.runner import Runner, RunnerSettings, Stop
from engine.store import Store
from tests import durability as d
from workflows.backends.simulated import SimulatedCluster
from workflows.node_patch import NodePatch, Params, subject
from workflows.patchers.simulated import SimulatedPatcher
from workflows.plan import NonHaPolicy, Policies

SETTINGS = RunnerSettings(
    lease_ttl_s=30,
    poll_interval_s=0.001,
    retry_attempts=3,
    retry_backoff_s=0.001,
    retry_backoff_max_s=0.002,
    timeouts_s={"Patching": 5.0},
)


class Patch:
    """A patch of hv1 on a fresh simulated cluster `c1` of three nodes, driven in-process."""

    def __init__(
        self,
        store: Store,
        root: Path,
        *vms: dict[str, Any],
        policies: Policies = Policies(),  # noqa: B008 - frozen
        memory: int = 4 * d.H,
        node: str = "hv1",
        patcher: str = "simulated",
        sim: SimulatedCluster | None = None,
        **runner: Any,
    ) -> None:
        self.sim = sim or SimulatedCluster.create(root / "c1.json", d.scenario(*vms, memory=memory))
        workflow = NodePatch(self.sim, lambda *_: SimulatedPatcher(self.sim)).workflow()
        self.store = store
        settings = runner.pop("settings", SETTINGS)
        self.runner = Runner(store, workflow, settings, actor="t@h:1", **runner)
        params = Params("c1", node, policies, patcher, 2)
        self.run_id = self.runner.create(subject("c1", node), params.to_json()).id

    def drive(self, **kwargs: Any) -> Stop:
        return self.runner.drive(self.run_id, **kwargs)

    def abort(self) -> Stop:
        self.runner.signal(self.run_id, "abort")
        return self.drive()

    def transitions(self) -> list[tuple[str | None, str | None]]:
        return d.transitions(self.store.events(self.run_id))

    def outcomes(self) -> dict[str, str]:
        return {e["id"]: e["outcome"] for e in self.store.published(self.run_id)["rebalance"]}

    def ops(self) -> dict[str, int]:
        return d.operations(self.sim.counts())


class Crash(BaseException):
    """The process dies here (nothing in the product may catch it)."""


@contextmanager
def crash_at(point: str) -> Iterator[None]:
    """Die at the first passing of an engine crash point, as a kill would."""
    original = crashpoints.hit

    def hit(name: str) -> None:
        if name == point:
            crashpoints.hit = original  # type: ignore[assignment]
            raise Crash(name)
        original(name)

    crashpoints.hit = hit  # type: ignore[assignment]
    try:
        yield
    finally:
        crashpoints.hit = original  # type: ignore[assignment]


@pytest.fixture
def store(engine: sa.Engine) -> Store:
    return Store(engine)


# ---- aborting and refusing before anything is touched -------------------------------------------


def test_a_run_aborted_before_its_preflight_ends_aborted_at_once(
    store: Store, tmp_path: Path
) -> None:
    """Aborted in Preflight: straight to Aborted, nothing asked of the cluster. (Kills the
    `or` of `on_abort`.)"""
    patch = Patch(store, tmp_path, d.vm("h1", "hv1"))
    assert patch.abort().run.state == "Aborted"
    assert patch.transitions() == [("Preflight", "Aborted")]
    assert patch.ops() == {}


def test_a_run_refused_in_preflight_then_aborted_skips_the_compensation(
    store: Store, tmp_path: Path
) -> None:
    """A run that failed in its preflight (the cluster refused the credentials) touched
    nothing: its abort goes from Failed straight to Aborted, not through Enabling and
    Rebalancing. (Kills the `run.state == FAILED` test of `on_abort`.) A refusal proper ends
    Refused and needs no abort at all."""
    patch = Patch(store, tmp_path, d.vm("h1", "hv1"))
    patch.sim.inject({"type": "auth_fails", "times": 1})
    assert patch.drive().run.state == "Failed"
    assert patch.abort().run.state == "Aborted"
    assert patch.transitions()[-2:] == [("Preflight", "Failed"), ("Failed", "Aborted")]
    assert patch.ops() == {}


def test_a_cluster_held_by_another_run_is_refused_in_preflight_naming_it(
    store: Store, tmp_path: Path
) -> None:
    """While one run holds the cluster, a run for another node is refused in its preflight with
    a published plan that names the holder, and touches nothing; the holder records the
    workflow it runs. (Kills the lock-holder test of `preflight`.)"""
    first = Patch(store, tmp_path, d.vm("h1", "hv1"), d.vm("o1", "hv2"))
    assert first.drive(until="Patching").run.state == "Patching"
    before = first.ops()
    second = Patch(store, tmp_path, node="hv2", sim=first.sim)
    stop = second.drive()
    assert (stop.run.state, stop.run.failed_from) == ("Refused", "Preflight")
    problems = store.published(second.run_id)["snapshot"]["problems"]
    assert problems == [
        f"cluster c1 is held by nodepatch run {first.run_id}: wait for it to end, or "
        f"`nodepatch abort {first.run_id}`",
        "node hv1 is already in maintenance mode",
    ]
    assert second.ops() == before
    run = store.get(first.run_id)
    assert (run.workflow, run.workflow_version) == ("node_patch", 1)


# ---- the drain --------------------------------------------------------------------------------

SAVE = Policies(NonHaPolicy.SAVE)
MIGRATE = Policies(NonHaPolicy.MIGRATE)


def test_a_vm_the_drain_moves_itself_does_not_stop_the_run_preparing_the_next_one(
    store: Store, tmp_path: Path
) -> None:
    """An HA VM (moved by the drain, nothing to do before it) listed before a non-HA VM under
    `save`: the run still saves the non-HA VM itself, then resumes it. (Kills `continue`
    becoming `break` for VMs with no action before the drain.)"""
    patch = Patch(store, tmp_path, d.vm("h1", "hv1"), d.vm("n1", "hv1", ha=False), policies=SAVE)
    assert patch.drive().run.state == "Done"
    assert patch.ops()["save_vm:n1"] == 1
    assert patch.ops()["start_vm:n1"] == 1
    assert d.placement(patch.sim)["n1"] == ("hv1", "Running")


def test_vms_deleted_or_moved_away_before_the_drain_are_skipped_and_the_rest_prepared(
    store: Store, tmp_path: Path
) -> None:
    """Between the plan and the drain, someone moves one non-HA VM away and deletes another.
    Under `migrate` both are skipped, and the third is still moved away and back. (Kills the
    `vm is None` test and `continue` becoming `break` for VMs no longer on the node.)"""
    patch = Patch(
        store,
        tmp_path,
        d.vm("m1", "hv1", ha=False),
        d.vm("d1", "hv1", ha=False),
        d.vm("n2", "hv1", ha=False),
        policies=MIGRATE,
    )
    assert patch.drive(until="Draining").run.state == "Draining"
    patch.sim.admin_move("m1", "hv2")
    patch.sim.admin_delete("d1")
    assert patch.drive().run.state == "Done"
    assert patch.ops().get("move_vm:m1", 0) == 0
    assert patch.ops()["move_vm:n2"] == 2
    assert d.placement(patch.sim) == {"m1": ("hv2", "Running"), "n2": ("hv1", "Running")}
    assert patch.outcomes() == {
        "m1": "skipped: moved by someone else to hv2",
        "d1": "deleted during the run",
        "n2": "moved back",
    }


def test_a_crash_between_the_maintenance_request_and_its_journal_entry_asks_once(
    store: Store, tmp_path: Path
) -> None:
    """The process dies after the cluster accepted the maintenance request and before the run
    journaled it. The resumed run sees the node in maintenance and does not ask again: every
    operation of the patch happens exactly once. (Kills the test that skips a maintenance
    already reached.)"""
    patch = Patch(store, tmp_path, d.vm("h1", "hv1"), d.vm("h2", "hv1"))
    with crash_at("after_submit:enter_maintenance"), pytest.raises(Crash):
        patch.drive()
    assert patch.drive().run.state == "Done"
    assert patch.ops() == d.ONCE


def test_after_a_failed_drain_only_the_running_ha_vms_are_moved_one_by_one(
    store: Store, tmp_path: Path
) -> None:
    """The maintenance job fails once: the run moves the node's running HA VMs itself, one at a
    time, and tries again. A stopped HA VM (left on the node) and a non-HA VM (saved, then
    resumed) are not moved. (Kills `vm.ha and vm.uses_memory` and the concurrency of 1.)"""
    sim = SimulatedCluster.create(
        tmp_path / "c1.json",
        d.scenario(
            d.vm("h1", "hv1"),
            d.vm("h2", "hv1"),
            d.vm("s1", "hv1", state="PowerOff"),
            d.vm("n1", "hv1", ha=False),
        ),
    )
    sim.inject({"type": "job_fails", "op": "enter_maintenance", "target": "hv1"})
    watched = Watched(sim)
    patch = Patch(store, tmp_path, policies=SAVE, sim=watched)  # type: ignore[arg-type]
    assert patch.drive(until="Patching").run.state == "Patching"
    assert watched.most_moves_at_once == 1  # the drain's own moves: one at a time
    assert patch.drive().run.state == "Done"
    ops = patch.ops()
    assert (ops["move_vm:h1"], ops["move_vm:h2"], ops.get("move_vm:s1", 0)) == (2, 2, 0)
    assert ops["enter_maintenance:hv1"] == 2
    assert ops.get("move_vm:n1", 0) == 0


class Watched:
    """The simulated cluster, watched: the most VM moves the run had in flight at once."""

    def __init__(self, inner: SimulatedCluster) -> None:
        self._inner = inner
        self._moving: set[str] = set()
        self.most_moves_at_once = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def move_vm(self, vm_id: str, host: str) -> str:
        ref = self._inner.move_vm(vm_id, host)
        self._moving.add(ref)
        self.most_moves_at_once = max(self.most_moves_at_once, len(self._moving))
        return ref

    def job(self, ref: str) -> Any:
        job = self._inner.job(ref)
        if job.done:
            self._moving.discard(ref)
        return job


class Meddler:
    """The simulated cluster, where someone else acts right after one of the run's jobs ends."""

    def __init__(self, inner: SimulatedCluster, after: str, act: Any) -> None:
        self._inner, self._after, self._act = inner, after, act
        self._watched: str | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._after:
            return attr

        def request(*args: Any) -> str:
            self._watched = attr(*args)
            return self._watched

        return request

    def job(self, ref: str) -> Any:
        job = self._inner.job(ref)
        if ref == self._watched and job.done:
            self._watched = None
            self._act(self._inner)
        return job


def someone(request: str, host: str) -> Any:
    """Someone else's maintenance request on host, followed to its end."""

    def act(sim: SimulatedCluster) -> None:
        ref = getattr(sim, request)(host)
        while not sim.job(ref).done:
            pass

    return act


def test_a_node_taken_out_of_maintenance_right_after_the_drain_is_not_patched(
    store: Store, tmp_path: Path
) -> None:
    """Someone takes the node out of maintenance as soon as the drain ends: the run fails in
    Draining saying so, and never reboots a node that is back in service. (Kills the
    maintenance check after the drain.)"""
    sim = SimulatedCluster.create(tmp_path / "c1.json", d.scenario(d.vm("h1", "hv1")))
    meddled = Meddler(sim, "enter_maintenance", someone("exit_maintenance", "hv1"))
    patch = Patch(store, tmp_path, sim=meddled)  # type: ignore[arg-type]
    stop = patch.drive()
    assert (stop.run.state, stop.run.failed_from) == ("Failed", "Draining")
    assert stop.run.error is not None
    assert stop.run.error["reason"] == "hv1 is not in maintenance mode after the drain"
    assert "reboot_host:hv1" not in patch.ops()


# ---- patching ---------------------------------------------------------------------------------


def test_the_external_patcher_waits_for_the_patched_signal_and_consumes_it_once(
    store: Store, tmp_path: Path
) -> None:
    """With the `external` patcher the run waits in Patching, and keeps waiting when resumed
    without the signal; once `patched` is sent it goes on and consumes it. The node is never
    rebooted by nodepatch. (Kills the signal test of `patch`.)"""
    patch = Patch(store, tmp_path, d.vm("h1", "hv1"), patcher="external")
    first = patch.drive()
    assert (first.reason, first.run.state, first.run.waiting_for) == (
        "waiting",
        "Patching",
        "patched",
    )
    assert patch.drive().reason == "waiting"
    patch.runner.signal(patch.run_id, "patched")
    assert patch.drive().run.state == "Done"
    assert store.pending_signals(patch.run_id) == []
    assert store.published(patch.run_id)["patch"] == {"patcher": "external"}
    assert "reboot_host:hv1" not in patch.ops()


class Clock:
    """The cluster's clock, moved on only by the run's waits (`sleep`)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_node_still_rebooting_when_the_run_enables_it_is_waited_for_then_enabled(
    store: Store, tmp_path: Path
) -> None:
    """The operator's own tool reboots the node and signals `patched` at once: the run finds
    the node rebooting, says once that it waits for it, polls until it is up, then takes it out
    of maintenance and moves its VM back. (Kills the one-time notice of the wait, and covers the
    wait itself.)"""
    clock = Clock()
    sim = SimulatedCluster.create(
        tmp_path / "c1.json", d.scenario(d.vm("h1", "hv1")), speed=1.0, clock=clock
    )
    shown: list[str] = []
    slow_polls = RunnerSettings(lease_ttl_s=30, poll_interval_s=10, timeouts_s={"Patching": 5.0})
    patch = Patch(
        store,
        tmp_path,
        sim=sim,
        patcher="external",
        settings=slow_polls,
        sleep=clock.sleep,
        progress=shown.append,
    )
    assert patch.drive().run.state == "Patching"
    sim.reboot_host("hv1", patch_seconds=0)
    patch.runner.signal(patch.run_id, "patched")
    assert patch.drive().run.state == "Done"
    assert [m for m in shown if m.startswith("waiting for hv1")] == [
        "waiting for hv1 to respond (Rebooting)"
    ]
    assert patch.ops()["exit_maintenance:hv1"] == 1
    assert d.placement(sim)["h1"] == ("hv1", "Running")


# ---- moving back ------------------------------------------------------------------------------


@pytest.mark.parametrize("arrived", [True, False], ids=["h1-home", "h1-on-its-way"])
def test_a_crash_while_moving_back_still_brings_every_vm_home(
    store: Store, tmp_path: Path, arrived: bool
) -> None:
    """The node has room for exactly its two VMs. The process dies right after journaling the
    move back of h1. Whether h1 is home by the time the run resumes or still on its way, the
    run follows h1's move to its end and brings h2 back too: h1's memory is counted once.
    (Before the fix, a VM already home was counted twice and h2 was skipped for want of
    memory. Kills the `continue` after a re-attached move.)"""
    clock = Clock()
    sim = SimulatedCluster.create(
        tmp_path / "c1.json",
        d.scenario(d.vm("h1", "hv1", memory=4096), d.vm("h2", "hv1", memory=4096), memory=8192),
        speed=1.0,
        clock=clock,
    )
    slow_polls = RunnerSettings(lease_ttl_s=30, poll_interval_s=10, timeouts_s={"Patching": 5.0})
    patch = Patch(store, tmp_path, sim=sim, settings=slow_polls, sleep=clock.sleep)
    with crash_at("after_journal:move_vm:h1"), pytest.raises(Crash):
        patch.drive()
    assert store.get(patch.run_id).state == "Rebalancing"
    if arrived:
        clock.sleep(3600)
    assert d.placement(sim)["h1"][0] == ("hv1" if arrived else "hv2")
    assert patch.drive().run.state == "Done"
    assert d.placement(sim) == {"h1": ("hv1", "Running"), "h2": ("hv1", "Running")}
    assert patch.outcomes() == {"h1": "moved back", "h2": "moved back"}
    assert (patch.ops()["move_vm:h1"], patch.ops()["move_vm:h2"]) == (1, 1)
