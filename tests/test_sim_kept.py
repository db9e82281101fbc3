"""The rows of a cluster each simulator object keeps between calls (per cluster version): a
change made through another object or process on the same file is seen by the next call, and so
is a world made again in place."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_simulated_fleet import REPO, done, fleet
from workflows.backends import base
from workflows.backends.simulated import SimulatedCluster


def placement(sim: SimulatedCluster, cluster: str) -> dict[str, tuple[str, str]]:
    return {vm.id: (vm.host, vm.state.value) for vm in sim.inventory(cluster).vms}


def maintenance(sim: SimulatedCluster, cluster: str) -> dict[str, bool]:
    return {h.name: h.maintenance for h in sim.inventory(cluster).hosts}


def test_a_change_through_another_object_is_seen_by_the_next_call(tmp_path: Path) -> None:
    """Two objects on one file (as two processes): each change one makes to a cluster the
    other has read (a host into maintenance, a VM moved, started, deleted, moved into another
    cluster, a job started and one finished) is what the other's next call sees."""
    path = tmp_path / "f.db"
    one = SimulatedCluster.create(path, fleet(2))
    other = SimulatedCluster(path)
    assert placement(one, "c1") == placement(other, "c1")
    assert placement(other, "c2")["c2-r"] == ("c2-hv1", "Running")

    done(one, one.enter_maintenance("c1-hv3"))
    assert maintenance(other, "c1") == {"c1-hv1": False, "c1-hv2": False, "c1-hv3": True}
    done(one, one.move_vm("c1-m", "c1-hv2"))
    assert placement(other, "c1")["c1-m"] == ("c1-hv2", "PowerOff")
    done(one, one.start_vm("c1-m"))
    assert placement(other, "c1")["c1-m"] == ("c1-hv2", "Running")
    one.admin_delete("c1-s")
    assert "c1-s" not in placement(other, "c1")
    one.admin_move("c2-r", "c1-hv1")
    assert placement(other, "c1")["c2-r"] == ("c1-hv1", "Running")
    assert "c2-r" not in placement(other, "c2")

    one.inject({"type": "job_hangs", "op": "exit_maintenance", "target": "c1-hv3"})
    hung = one.exit_maintenance("c1-hv3")
    assert other.find_job("exit_maintenance", "c1-hv3") == hung
    assert other.interference("c1") == [
        f"job {hung} (exit_maintenance on c1-hv3) is running in cluster c1"
    ]
    moved = one.move_vm("c1-r", "c1-hv2")  # open until the next call that loads c1
    assert other.find_job("move_vm", "c1-r") is None  # that call finished it
    assert one.job(moved).ok
    assert placement(one, "c1") == placement(other, "c1")
    assert maintenance(one, "c1") == maintenance(other, "c1")


def test_what_an_object_wrote_is_what_it_reads_after_another_wrote(tmp_path: Path) -> None:
    """Writes from both objects in turn, on the same cluster: each sees the other's and its
    own, and the counts hold every request of both."""
    path = tmp_path / "f.db"
    one = SimulatedCluster.create(path, fleet(1))
    other = SimulatedCluster(path)
    for i in range(5):
        first, second = (one, other) if i % 2 == 0 else (other, one)
        done(first, first.move_vm("c1-m", "c1-hv2"))
        assert placement(second, "c1")["c1-m"] == ("c1-hv2", "PowerOff")
        done(second, second.move_vm("c1-m", "c1-hv1"))
        assert placement(first, "c1")["c1-m"] == ("c1-hv1", "PowerOff")
    assert one.operations("c1")["move_vm"] == 10
    assert one.counts() == other.counts()


def test_a_world_made_again_in_place_is_seen_whatever_kept_rows(tmp_path: Path) -> None:
    """A world made again in the same file (`sim init --force` on a simulator: rewritten in
    place, same cluster and host names) is what an object that read the old one sees next,
    though nothing in the new world has changed yet."""
    path = tmp_path / "f.db"
    sim = SimulatedCluster.create(path, fleet(1))
    assert placement(sim, "c1")["c1-r"] == ("c1-hv1", "Running")
    again = fleet(1)
    again["vms"][0]["host"] = "c1-hv2"
    again["clusters"][0]["hosts"][2]["maintenance"] = True
    SimulatedCluster.create(path, again)
    assert placement(sim, "c1")["c1-r"] == ("c1-hv2", "Running")
    assert maintenance(sim, "c1")["c1-hv3"] is True


CHANGE = textwrap.dedent(
    """
    import sys
    from workflows.backends.simulated import SimulatedCluster
    sim = SimulatedCluster(sys.argv[1])
    assert sim.job(sim.move_vm("c1-m", "c1-hv3")).ok
    sim.admin_set_state("c1-s", "Saved")
    """
)


def test_a_change_made_by_another_process_is_seen_by_the_next_call(tmp_path: Path) -> None:
    """Another process moves a VM and saves another in a cluster this one has read: this
    process's next inventory shows both."""
    path = tmp_path / "f.db"
    sim = SimulatedCluster.create(path, fleet(1))
    assert placement(sim, "c1")["c1-m"] == ("c1-hv1", "PowerOff")
    subprocess.run([sys.executable, "-c", CHANGE, str(path)], cwd=REPO, check=True, timeout=60)
    now = placement(sim, "c1")
    assert now["c1-m"] == ("c1-hv3", "PowerOff")
    assert now["c1-s"] == ("c1-hv3", base.PowerState.SAVED.value)
