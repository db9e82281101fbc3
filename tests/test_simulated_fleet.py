"""The simulator at fleet scale: many clusters in one file, several processes at once, the
operations counted from outside, bounded job storage, and files that are not a simulator."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from engine import errors
from tests.test_first_hour_input import assert_refused, nodepatch
from workflows.backends import base, simdb, simfaults
from workflows.backends.simulated import OPERATIONS, SimulatedCluster

REPO = Path(__file__).resolve().parent.parent
GIB = 1024


def fleet(clusters: int) -> dict[str, Any]:
    """Clusters c1..cK of three 64 GiB hosts ck-hv1..3, each with a running HA VM ck-r on
    hv1, a stopped VM ck-m on hv1 and a stopped VM ck-s on hv3 (room to spare everywhere)."""
    scenario: dict[str, Any] = {"clusters": [], "vms": []}
    for k in range(1, clusters + 1):
        hosts = [{"name": f"c{k}-hv{i}", "memory_mb": 64 * GIB} for i in (1, 2, 3)]
        scenario["clusters"].append({"name": f"c{k}", "hosts": hosts})
        scenario["vms"] += [
            {"id": f"c{k}-r", "name": f"r{k}", "host": f"c{k}-hv1", "memory_mb": 2 * GIB},
            {"id": f"c{k}-m", "name": f"m{k}", "host": f"c{k}-hv1", "memory_mb": GIB}
            | {"state": "PowerOff"},
            {"id": f"c{k}-s", "name": f"s{k}", "host": f"c{k}-hv3", "memory_mb": GIB}
            | {"state": "PowerOff"},
        ]
    return scenario


def done(sim: SimulatedCluster, job_id: str) -> base.Job:
    """At speed 0 the first poll after a request finds its job over."""
    job = sim.job(job_id)
    assert job.ok, job.message
    return job


def usual(operations: dict[str, int]) -> dict[str, int]:
    return {op: operations[op] for op in OPERATIONS}


# -- sim init --clusters ------------------------------------------------------------------------


def test_init_makes_k_clusters_with_names_unique_across_the_fleet(tmp_path: Path) -> None:
    """`sim init --clusters 3` makes cluster1..cluster3, each with --hosts hosts and --vms VMs
    (--non-ha and --stopped-ha per cluster), hosts c<k>-hv01.. and VMs c<k>-vm001.."""
    path = tmp_path / "fleet.db"
    args = ("--clusters", "3", "--hosts", "2", "--vms", "5", "--non-ha", "1", "--stopped-ha", "2")
    result = nodepatch(tmp_path, "sim", "init", "--file", str(path), *args)
    assert result.code == 0, result.err
    snap = SimulatedCluster(path).snapshot()
    assert [c["name"] for c in snap["clusters"]] == ["cluster1", "cluster2", "cluster3"]
    for k, cluster in enumerate(snap["clusters"], start=1):
        hosts = [h["name"] for h in cluster["hosts"]]
        assert hosts == [f"c{k}-hv01", f"c{k}-hv02"]
        vms = [v for v in snap["vms"] if v["host"] in hosts]
        assert [v["name"] for v in vms] == [f"c{k}-vm{i:03d}" for i in range(1, 6)]
        assert sum(not v["ha"] and v["state"] == "Running" for v in vms) == 1
        assert sum(v["ha"] and v["state"] == "PowerOff" for v in vms) == 2
    assert len({v["id"] for v in snap["vms"]}) == 15


def test_one_cluster_is_generated_as_before_and_a_fleet_by_seed(tmp_path: Path) -> None:
    """clusters=1 is the single cluster of before (hv01.., vm001..); a fleet is deterministic by
    seed, and each of its clusters can lose any one node."""
    one = SimulatedCluster.generate(tmp_path / "a.db", seed=7).snapshot()
    same = SimulatedCluster.generate(tmp_path / "b.db", seed=7, clusters=1).snapshot()
    assert one == same
    assert one["clusters"][0]["hosts"][0]["name"] == "hv01"
    a = SimulatedCluster.generate(tmp_path / "c.db", clusters=4, vms=15, seed=3)
    b = SimulatedCluster.generate(tmp_path / "d.db", clusters=4, vms=15, seed=3)
    assert a.snapshot() == b.snapshot()
    for host in ("c2-hv01", "c4-hv03"):
        assert done(a, a.enter_maintenance(host)).ok
        cluster = host.split("-")[0].replace("c", "cluster")
        assert not [v for v in a.inventory(cluster).vms_on(host) if v.uses_memory]


def test_an_unknown_cluster_names_the_first_twenty_of_many(tmp_path: Path) -> None:
    """The clusters listed after a typo are capped, with how many there are in all."""
    sim = SimulatedCluster.generate(tmp_path / "f.db", clusters=30, hosts=1, vms=0)
    with pytest.raises(errors.NotFound, match=r"cluster20, \.\.\. \(30 in all\)\)$"):
        sim.inventory("cluster31")


# -- operations and sim show --------------------------------------------------------------------


def _patch(sim: SimulatedCluster, host: str) -> None:
    done(sim, sim.enter_maintenance(host))
    done(sim, sim.reboot_host(host, patch_seconds=0))
    done(sim, sim.exit_maintenance(host))


def test_sim_show_json_counts_operations_over_the_fleet(tmp_path: Path) -> None:
    """`sim show --json` adds `operations`, totals per kind (every usual kind, zero or not) over
    the fleet, or of one cluster with --cluster; the document is still a valid scenario."""
    path = tmp_path / "fleet.db"
    sim = SimulatedCluster.create(path, fleet(3))
    _patch(sim, "c1-hv1")
    done(sim, sim.move_vm("c2-m", "c2-hv2"))
    done(sim, sim.start_vm("c2-s"))
    done(sim, sim.save_vm("c2-s"))
    done(sim, sim.start_vm("c2-s"))
    done(sim, sim.shutdown_vm("c2-s"))
    shown = nodepatch(tmp_path, "sim", "show", "--file", str(path), "--json").json()
    assert usual(shown["operations"]) == {
        "enter_maintenance": 1,
        "exit_maintenance": 1,
        "reboot_host": 1,
        "live_migrate": 1,
        "move_vm": 1,
        "save_vm": 1,
        "start_vm": 2,
        "shutdown_vm": 1,
    }
    assert shown["operations"]["job"] == 8
    two = nodepatch(tmp_path, "sim", "show", "--file", str(path), "--cluster", "C2", "--json")
    assert [c["name"] for c in two.json()["clusters"]] == ["c2"]
    assert {v["id"] for v in two.json()["vms"]} == {"c2-r", "c2-m", "c2-s"}
    assert usual(two.json()["operations"]) == dict.fromkeys(OPERATIONS, 0) | {
        "move_vm": 1,
        "start_vm": 2,
        "save_vm": 1,
        "shutdown_vm": 1,
    }
    assert sim.operations("c3") == dict.fromkeys(OPERATIONS, 0)
    scenario = tmp_path / "again.json"
    scenario.write_text(json.dumps(shown), encoding="utf-8")
    again = tmp_path / "again.db"
    made = nodepatch(tmp_path, "sim", "init", "--file", str(again), "--from", str(scenario))
    assert made.code == 0, made.err
    assert SimulatedCluster(again).snapshot() == {k: shown[k] for k in ("clusters", "vms")}


def test_sim_show_summarises_a_fleet_a_line_per_cluster(tmp_path: Path) -> None:
    """Without --cluster a fleet is a line per cluster, the totals, the operations and how to
    see one cluster; --cluster shows that cluster's hosts and VMs as for a single cluster."""
    path = tmp_path / "fleet.db"
    SimulatedCluster.generate(path, clusters=12, hosts=4, vms=20, seed=2)
    shown = nodepatch(tmp_path, "sim", "show", "--file", str(path))
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert len(lines) == 2 + 12 + 1 + 2
    assert lines[2].split() == ["cluster1", "4", "0", "0", "20", "20", "0", "0"]
    assert lines[14].split() == ["(all)", "48", "0", "0", "240", "240", "0", "0"]
    assert lines[15] == "operations: none"
    assert "--cluster C" in lines[16]
    one = nodepatch(tmp_path, "sim", "show", "--file", str(path), "--cluster", "CLUSTER7")
    assert one.out.startswith("cluster cluster7\n")
    assert "c7-hv04" in one.out
    assert "c3-hv" not in one.out
    assert "c3-vm" not in one.out
    assert len(one.out.splitlines()) == 1 + 2 + 4 + 1 + 2 + 20
    assert_refused(
        nodepatch(tmp_path, "sim", "show", "--file", str(path), "--cluster", "cluster13"),
        "unknown cluster 'cluster13'",
    )


# -- several processes --------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from workflows.backends import base
    from workflows.backends.simulated import SimulatedCluster

    path, k, clusters, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sim = SimulatedCluster(path)
    Path(f"{path}.ready{k}").touch()
    while not Path(f"{path}.go").exists():
        time.sleep(0.005)
    states = [base.PowerState.SAVED, base.PowerState.POWER_OFF]

    def done(job_id):
        job = sim.job(job_id)
        assert job.ok, job.message

    for r in range(rounds):
        done(sim.enter_maintenance(f"c{k}-hv1"))
        done(sim.exit_maintenance(f"c{k}-hv1"))
        done(sim.move_vm(f"c{k}-m", f"c{k}-hv2" if r % 2 == 0 else f"c{k}-hv1"))
        sim.admin_set_state(f"c{k}-s", states[r % 2])
        sim.inventory(f"c{k % clusters + 1}")
    """
)


@pytest.mark.slow
def test_processes_mutating_different_clusters_at_once_lose_no_operation(
    tmp_path: Path,
) -> None:
    """Four processes, started together, each patch-cycle their own cluster, move and power a VM
    and read the next cluster: every operation of every process is counted, per cluster and
    per target, and every cluster ends where its process left it."""
    clusters, rounds = 4, 40
    path = tmp_path / "fleet.db"
    SimulatedCluster.create(path, fleet(clusters))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(k), str(clusters), str(rounds)],
            cwd=REPO,
        )
        for k in range(1, clusters + 1)
    ]
    deadline = time.monotonic() + 60
    while not all(Path(f"{path}.ready{k}").exists() for k in range(1, clusters + 1)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    Path(f"{path}.go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * clusters
    sim = SimulatedCluster(path)
    per_cluster = dict.fromkeys(OPERATIONS, 0) | {
        "enter_maintenance": rounds,
        "exit_maintenance": rounds,
        "move_vm": rounds,
        "live_migrate": 1,  # ck-r leaves hv1 at the first drain, and never comes back
        "admin_set_state": rounds,
        "inventory": rounds,
        "job": 3 * rounds,
    }
    for k in range(1, clusters + 1):
        assert sim.operations(f"c{k}") == per_cluster
    assert sim.operations() == {op: n * clusters for op, n in per_cluster.items()}
    counts = sim.counts()
    for k in range(1, clusters + 1):
        assert counts[f"enter_maintenance:c{k}-hv1"] == counts[f"move_vm:c{k}-m"] == rounds
        assert counts[f"admin_set_state:c{k}-s"] == rounds
        assert counts[f"live_migrate:c{k}-r"] == 1
    placement = {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]}
    for k in range(1, clusters + 1):
        assert placement[f"c{k}-m"] == (f"c{k}-hv1", "PowerOff")
        assert placement[f"c{k}-s"] == (f"c{k}-hv3", "PowerOff")
        assert placement[f"c{k}-r"][0] in (f"c{k}-hv2", f"c{k}-hv3")
    assert not any(c["maintenance"] or c["open_jobs"] for c in sim.overview())


# -- bounded job storage ------------------------------------------------------------------------


def test_finished_jobs_are_kept_bounded_per_cluster(tmp_path: Path) -> None:
    """Each cluster keeps its newest `job_history` finished jobs however many it ran: an old job
    is forgotten, a recent one still answers, the reboot of a host's current maintenance window
    is kept (the evidence that it was patched), and another cluster's jobs are untouched."""
    sim = SimulatedCluster.create(tmp_path / "f.db", fleet(2), job_history=5)
    other = done(sim, sim.start_vm("c2-s")).id
    drain = done(sim, sim.enter_maintenance("c1-hv1")).id
    reboot = done(sim, sim.reboot_host("c1-hv1", patch_seconds=0)).id
    recent = [done(sim, sim.start_vm("c1-s")).id for _ in range(2)]
    for _ in range(20):
        done(sim, sim.shutdown_vm("c1-s"))
        recent.append(done(sim, sim.start_vm("c1-s")).id)
    kept = {c["name"]: (c["open_jobs"], c["finished_jobs"]) for c in sim.overview()}
    assert kept == {"c1": (0, 5), "c2": (0, 1)}
    with pytest.raises(errors.BackendError, match="unknown job"):
        sim.job(drain)
    assert sim.job(recent[-1]).ok
    assert sim.reboot_in_maintenance("c1-hv1") == reboot
    assert sim.job(reboot).details["reboot"] == "true"
    assert sim.job(other).ok
    done(sim, sim.exit_maintenance("c1-hv1"))
    done(sim, sim.enter_maintenance("c1-hv1"))  # a new window: the old evidence may go
    assert sim.reboot_in_maintenance("c1-hv1") is None
    for _ in range(3):
        done(sim, sim.shutdown_vm("c1-s"))
        done(sim, sim.start_vm("c1-s"))
    with pytest.raises(errors.BackendError, match="unknown job"):
        sim.job(reboot)


def test_unfinished_jobs_are_never_forgotten(tmp_path: Path) -> None:
    """A job that hangs outlives any number of later jobs: find_job still re-attaches to it."""
    sim = SimulatedCluster.create(tmp_path / "f.db", fleet(1), job_history=2)
    sim.inject({"type": "job_hangs", "op": "start_vm", "target": "c1-s"})
    hung = sim.start_vm("c1-s")
    for _ in range(10):
        done(sim, sim.move_vm("c1-m", "c1-hv2"))
        done(sim, sim.move_vm("c1-m", "c1-hv1"))
    assert sim.find_job("start_vm", "c1-s") == hung
    assert sim.job(hung).status is base.JobStatus.RUNNING
    assert sim.overview()[0]["open_jobs"] == 1
    assert sim.overview()[0]["finished_jobs"] == 2


# -- the file -----------------------------------------------------------------------------------


def test_an_open_cluster_follows_its_file_when_it_is_made_again(tmp_path: Path) -> None:
    """An object in use sees the new world after `sim init --force` (rewritten in place) and
    after the file was deleted and made again (another file)."""
    path = tmp_path / "f.db"
    sim = SimulatedCluster.create(path, fleet(1))
    assert sim.inventory("c1").cluster == "c1"
    forced = nodepatch(tmp_path, "sim", "init", "--file", str(path), "--force", "--clusters", "2")
    assert forced.code == 0, forced.err
    assert sim.inventory("cluster2").cluster == "cluster2"
    path.unlink()
    with pytest.raises(errors.BackendError, match="no simulated cluster at"):
        sim.inventory("cluster2")
    SimulatedCluster.create(path, fleet(3))
    assert sim.inventory("c3").cluster == "c3"


def _legacy(path: Path) -> None:
    scenario = simfaults.generate(
        hosts=3, vms=4, non_ha=0, stopped_ha=0, seed=0, cluster="cluster1"
    )
    path.write_text(json.dumps(simfaults.build_state(scenario, speed=0.0)), encoding="utf-8")


def _other_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE run (id TEXT)")
    conn.commit()
    conn.close()


def _truncated(path: Path) -> None:
    SimulatedCluster.generate(path, clusters=3).close()
    path.write_bytes(path.read_bytes()[:4096])


def _newer(path: Path) -> None:
    SimulatedCluster.generate(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE world SET schema = 99")
    conn.commit()
    conn.close()


NOT_A_SIMULATOR = {
    "an earlier nodepatch's JSON file": (_legacy, "is in the JSON format of an earlier nodepatch"),
    "an empty file": (lambda p: p.write_bytes(b""), "is not valid JSON"),
    "another SQLite database": (_other_database, "is an SQLite database but not a simulated"),
    "a truncated simulator file": (_truncated, "is corrupt: database disk image is malformed"),
    "a newer simulator": (
        _newer,
        f"has simulator schema 99, this nodepatch reads {simdb.SCHEMA_VERSION}",
    ),
}


@pytest.mark.parametrize("case", list(NOT_A_SIMULATOR))
def test_a_file_that_is_not_a_simulator_is_refused_naming_it(tmp_path: Path, case: str) -> None:
    """Opening it raises UsageError; the CLI exits 2 with one line naming the file and what is
    wrong, for a run as for `sim show`."""
    make, problem = NOT_A_SIMULATOR[case]
    path = tmp_path / "cluster.json"
    make(path)
    with pytest.raises(errors.UsageError, match=problem):
        SimulatedCluster(path)
    plan = nodepatch(tmp_path, "--sim", str(path), "plan", "--cluster", "c1", "--node", "hv1")
    assert_refused(plan, str(path), problem)
    assert_refused(nodepatch(tmp_path, "sim", "show", "--file", str(path)), str(path), problem)


def test_sim_show_uses_the_simulator_named_by_nodepatch_sim(tmp_path: Path) -> None:
    """`sim show` needs no --file when --sim / NODEPATCH_SIM names the simulator."""
    assert nodepatch(tmp_path, "sim", "init", "--file", "c.db", "--clusters", "2").code == 0
    shown = nodepatch(tmp_path, "sim", "show", "--json", env={"NODEPATCH_SIM": "c.db"})
    assert shown.code == 0, shown.err
    assert len(json.loads(shown.out)["clusters"]) == 2
    missing = nodepatch(tmp_path, "sim", "show")
    assert missing.code == 2 and "--sim FILE / NODEPATCH_SIM" in missing.err
