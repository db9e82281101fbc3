"""The rows one call of the simulated cluster works on: loaded cluster by cluster from the
simulator's SQLite file (`simdb`), changed in memory as dicts, and written back when they changed.

Each cluster row has a `version`, bumped in the transaction that writes any of the cluster's
hosts, VMs or open jobs (a VM moved to another cluster bumps both). A process keeps the rows of
each cluster as of a version (`simkept.Cached`, in `simdb.Handle`): a call reads the cluster's
row, and reads its hosts, VMs and open jobs again only when the version is not the one kept.
What a call wrote becomes the kept version once its transaction has committed (`Rows.fresh`).
"""

from __future__ import annotations

import collections
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workflows.backends import base, simkept

JSON = dict[str, Any]

_FINISHED_KEYS = ("id", "kind", "target", "status", "progress", "message", "details", "started_at")


def finished(job: JSON) -> bool:
    return job["status"] not in (base.JobStatus.NOT_STARTED, base.JobStatus.RUNNING)


def dump(obj: Any) -> str:
    """The stored JSON text of a job or fault."""
    return json.dumps(obj, separators=(",", ":"))


@dataclass
class Cluster:
    """A loaded cluster: its hosts in order, and how many finished jobs it keeps."""

    id: int
    name: str
    hosts: list[JSON] = field(default_factory=list)
    finished: int = 0
    version: int = 0


def _compact(job: JSON) -> JSON:
    """What a finished job keeps: what `job()` reports about it."""
    return {key: job[key] for key in _FINISHED_KEYS}


class Rows:
    """The rows one call has loaded, as the dicts the simulation works on.

    A cluster is loaded whole (hosts, VMs, open jobs) the first time anything in it is looked
    up, and `on_load` is told (the world then advances the cluster's jobs to now). `flush()`
    writes back what changed since the rows were loaded or last flushed.
    """

    def __init__(
        self, conn: sqlite3.Connection, kept: dict[int, simkept.Cached] | None = None
    ) -> None:
        self.conn = conn
        self._kept = {} if kept is None else kept  # read here; written only after a commit
        self.fresh: dict[int, simkept.Cached] = {}  # what this call wrote, to keep once committed
        row = conn.execute(
            "SELECT speed, sim_time, real_time, job_history, EXISTS (SELECT 1 FROM faults) "
            "FROM world"
        ).fetchone()
        self.speed: float = row[0]
        self.sim_time: float = row[1]
        self.real_time: float = row[2]
        self.job_history: int = row[3]
        self._any_faults: bool = bool(row[4])  # no fault rows: none to read
        self._clock0 = (self.speed, self.sim_time, self.real_time)
        self.on_load: Callable[[Cluster], None] = lambda cluster: None
        self.clusters: dict[int, Cluster] = {}
        self.reboots: dict[str, str | None] = {}  # host key: the reboot of its maintenance window
        self.job_cluster: dict[str, int] = {}
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self._hosts: dict[str, JSON] = {}  # by key (lower-case name)
        self._host_cluster: dict[str, int] = {}
        self._hosts0: dict[str, tuple[bool, str, str | None]] = {}
        self._host_rows: dict[int, tuple[simkept.Row, ...]] = {}  # by cluster, as loaded
        self._vms: dict[str, JSON] = {}
        self._vm_seq: dict[str, int] = {}
        self._vms0: dict[str, tuple[str, str]] = {}
        self._vm_rows: dict[str, simkept.Row] = {}  # as loaded
        self._vm_cluster: dict[str, int] = {}  # as stored
        self._gone: set[int] = set()  # clusters a deleted VM was in, until the next flush
        self._deleted: set[str] = set()
        self._to_delete: list[str] = []
        self._jobs: dict[str, JSON] = {}
        self._jobs0: dict[str, str | None] = {}  # the stored doc; None: not stored yet
        self._was_open: set[str] = set()
        self._open: dict[int, list[JSON]] = {}
        self._faults: list[JSON] | None = None
        self._faults0: list[str] = []

    # clusters ---------------------------------------------------------------------------------

    def cluster_named(self, name: str) -> Cluster | None:
        row = self.conn.execute(simkept.CLUSTER_BY_KEY, (name.lower(),)).fetchone()
        return None if row is None else self.load(row[0], row)

    def cluster_names(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT name FROM clusters ORDER BY id")]

    def all_clusters(self) -> list[Cluster]:
        ids = self.conn.execute("SELECT id FROM clusters ORDER BY id").fetchall()
        return [self.load(cid) for (cid,) in ids]

    def load_busy(self) -> None:
        """Load every cluster that has an unfinished job (so that its jobs advance)."""
        for (cid,) in self.conn.execute(
            "SELECT id FROM clusters WHERE EXISTS "
            "(SELECT 1 FROM jobs WHERE cluster = clusters.id AND open = 1)"
        ).fetchall():
            self.load(cid)

    def load(self, cid: int, row: simkept.Row | None = None) -> Cluster:
        """The cluster, loaded the first time; `row` its clusters row (as `simkept.CLUSTER`
        reads it) when the caller has read it."""
        if cid in self.clusters:
            return self.clusters[cid]
        if row is None:
            row = self.conn.execute(simkept.CLUSTER_BY_ID, (cid,)).fetchone()
        _, name, finished_jobs, version = row
        cluster = self.clusters[cid] = Cluster(cid, name, [], finished_jobs, version)
        kept = self._kept.get(cid)
        if kept is None or kept.version != version:
            kept = self._kept[cid] = simkept.Cached(
                version,
                tuple(self.conn.execute(simkept.HOSTS, (cid,)).fetchall()),
                tuple(self.conn.execute(simkept.VMS, (cid,)).fetchall()),
                tuple(self.conn.execute(simkept.OPEN_JOBS, (cid,)).fetchall()),
            )
        self._load_hosts(cluster, kept.hosts)
        self._load_vms(cid, kept.vms)
        self._open[cid] = []
        for job_id, doc in kept.jobs:
            self._remember_job(cid, job_id, doc, is_open=True)
        self.on_load(cluster)
        return cluster

    def _load_hosts(self, cluster: Cluster, rows: tuple[simkept.Row, ...]) -> None:
        self._host_rows[cluster.id] = rows
        for key, name, memory, maintenance, state, reboot, patch_s, reboot_s in rows:
            host = {
                "name": name,
                "memory_mb": memory,
                "maintenance": bool(maintenance),
                "state": state,
                "patch_seconds": patch_s,
                "reboot_seconds": reboot_s,
            }
            cluster.hosts.append(host)
            self._hosts[key], self._host_cluster[key] = host, cluster.id
            self.reboots[key] = reboot
            self._hosts0[key] = (bool(maintenance), state, reboot)

    def _load_vms(self, cid: int, rows: tuple[simkept.Row, ...]) -> None:
        for row in rows:
            seq, vm_id, name, host, ha, state, memory = row
            self._vms[vm_id] = {
                "id": vm_id,
                "name": name,
                "host": host,
                "ha": bool(ha),
                "state": state,
                "memory_mb": memory,
            }
            self._vm_seq[vm_id] = seq
            self._vms0[vm_id] = (host, state)
            self._vm_rows[vm_id] = row
            self._vm_cluster[vm_id] = cid

    # hosts and VMs ----------------------------------------------------------------------------

    def host(self, name: str) -> JSON | None:
        key = name.lower()
        if key not in self._hosts:
            row = self.conn.execute(simkept.CLUSTER_OF_HOST, (key,)).fetchone()
            if row is None:
                return None
            self.load(row[0], row)
        return self._hosts.get(key)

    def cluster_of(self, host: str) -> int:
        """The cluster of a loaded host."""
        return self._host_cluster[host.lower()]

    def vm(self, vm_id: str) -> JSON | None:
        if vm_id not in self._vms and vm_id not in self._deleted:
            row = self.conn.execute(simkept.CLUSTER_OF_VM, (vm_id,)).fetchone()
            if row is not None:
                self.load(row[0], row)
        return self._vms.get(vm_id)

    def delete_vm(self, vm_id: str) -> None:
        del self._vms[vm_id]
        self._gone.add(self._vm_cluster.pop(vm_id))
        self._deleted.add(vm_id)
        self._to_delete.append(vm_id)

    def vms_on(self, *hosts: str) -> list[JSON]:
        """The loaded VMs on these hosts (names as stored), in creation order."""
        names = set(hosts)
        found = [vm for vm in self._vms.values() if vm["host"] in names]
        return sorted(found, key=lambda vm: self._vm_seq[vm["id"]])

    # jobs -------------------------------------------------------------------------------------

    def job(self, job_id: str) -> JSON | None:
        if job_id not in self._jobs:
            row = self.conn.execute(
                "SELECT cluster, open, doc FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            if row[1]:
                self.load(row[0])
            else:
                self._remember_job(row[0], job_id, row[2], is_open=False)
        return self._jobs.get(job_id)

    def _remember_job(self, cid: int, job_id: str, doc: str, *, is_open: bool) -> None:
        job = self._jobs[job_id] = json.loads(doc)
        self.job_cluster[job_id] = cid
        self._jobs0[job_id] = doc
        if is_open:
            self._was_open.add(job_id)
            self._open[cid].append(job)

    def open_jobs(self, cid: int) -> list[JSON]:
        """The unfinished jobs of a loaded cluster, in submission order."""
        return [job for job in self._open[cid] if not finished(job)]

    def open_jobs_on(self, target: str) -> list[JSON]:
        """The unfinished jobs on a host or VM, whatever cluster they were submitted in."""
        for (cid,) in self.conn.execute(
            "SELECT DISTINCT cluster FROM jobs WHERE open = 1 AND target = ?", (target,)
        ).fetchall():
            self.load(cid)
        return [
            job
            for jobs in self._open.values()
            for job in jobs
            if job["target"] == target and not finished(job)
        ]

    def add_job(self, cid: int, job: JSON) -> None:
        self._jobs[job["id"]] = job
        self.job_cluster[job["id"]] = cid
        self._jobs0[job["id"]] = None
        self._open[cid].append(job)

    # faults and counts ------------------------------------------------------------------------

    @property
    def faults(self) -> list[JSON]:
        """The faults not yet used up, in firing order (change the list in place)."""
        if self._faults is None:
            self._faults0 = (
                [row[0] for row in self.conn.execute("SELECT doc FROM faults ORDER BY seq")]
                if self._any_faults
                else []
            )
            self._faults = [json.loads(doc) for doc in self._faults0]
        return self._faults

    def count(self, key: str, cid: int = 0) -> None:
        self.counts[(key, cid)] += 1

    def totals(self, cid: int | None = None) -> dict[str, int]:
        """Every count, summed over clusters (or of one cluster); flushes first."""
        self.flush()
        where, args = ("WHERE cluster = ?", (cid,)) if cid is not None else ("", ())
        return dict(
            self.conn.execute(f"SELECT key, SUM(n) FROM counts {where} GROUP BY key", args)  # noqa: S608
        )

    def totals_by_cluster(self) -> dict[int, dict[str, int]]:
        self.flush()
        out: dict[int, dict[str, int]] = collections.defaultdict(dict)
        for key, cid, n in self.conn.execute("SELECT key, cluster, n FROM counts"):
            out[cid][key] = n
        return out

    def job_totals(self) -> dict[int, tuple[int, int]]:
        """Per cluster: (open jobs, finished jobs kept); flushes first."""
        self.flush()
        return {
            cid: (int(opened), int(kept))
            for cid, opened, kept in self.conn.execute(
                "SELECT cluster, SUM(open), SUM(1 - open) FROM jobs GROUP BY cluster"
            )
        }

    # writing back -----------------------------------------------------------------------------

    def flush(self) -> None:
        clock = (self.speed, self.sim_time, self.real_time)
        if clock != self._clock0:
            self.conn.execute("UPDATE world SET speed = ?, sim_time = ?, real_time = ?", clock)
            self._clock0 = clock
        touched = self._flush_hosts() | self._flush_vms()
        newly = self._flush_jobs(touched)
        self._prune(newly)
        self._bump(touched)
        self._flush_faults()
        if self.counts:
            self.conn.executemany(
                "INSERT INTO counts (key, cluster, n) VALUES (?, ?, ?) "
                "ON CONFLICT (key, cluster) DO UPDATE SET n = n + excluded.n",
                [(key, cid, n) for (key, cid), n in self.counts.items()],
            )
            self.counts.clear()

    def _flush_hosts(self) -> set[int]:
        """Write the changed hosts; the clusters they are in."""
        touched = set()
        for key, host in self._hosts.items():
            now = (host["maintenance"], host["state"], self.reboots[key])
            if now != self._hosts0[key]:
                self.conn.execute(
                    "UPDATE hosts SET maintenance = ?, state = ?, window_reboot = ? WHERE key = ?",
                    (*now, key),
                )
                self._hosts0[key] = now
                touched.add(self._host_cluster[key])
        return touched

    def _flush_vms(self) -> set[int]:
        """Delete the deleted VMs, write the changed ones; the clusters they were and are in."""
        touched, self._gone = self._gone, set()
        if self._to_delete:
            self.conn.executemany("DELETE FROM vms WHERE id = ?", [(i,) for i in self._to_delete])
            self._to_delete.clear()
        for vm_id, vm in self._vms.items():
            now = (vm["host"], vm["state"])
            if now != self._vms0[vm_id]:
                cid = self.cluster_of(vm["host"])
                self.conn.execute(
                    "UPDATE vms SET host = ?, state = ?, cluster = ? WHERE id = ?",
                    (*now, cid, vm_id),
                )
                self._vms0[vm_id] = now
                touched.update((self._vm_cluster[vm_id], cid))
                self._vm_cluster[vm_id] = cid
        return touched

    def _flush_jobs(self, touched: set[int]) -> collections.Counter[int]:
        """Write new and changed jobs (finished ones compact), adding their clusters to
        touched; count the newly finished."""
        newly: collections.Counter[int] = collections.Counter()
        for job_id, job in self._jobs.items():
            done = finished(job)
            doc = dump(_compact(job) if done else job)
            before, cid = self._jobs0[job_id], self.job_cluster[job_id]
            if (before is None or job_id in self._was_open) and doc != before:
                touched.add(cid)  # a job its cluster's load reads (an open one) changed
            if before is None:
                self.conn.execute(
                    "INSERT INTO jobs (id, cluster, target, open, doc) VALUES (?, ?, ?, ?, ?)",
                    (job_id, cid, job["target"], not done, doc),
                )
            elif doc != before:
                self.conn.execute(
                    "UPDATE jobs SET open = ?, doc = ? WHERE id = ?", (not done, doc, job_id)
                )
            if done and (before is None or job_id in self._was_open):
                newly[cid] += 1
                self._was_open.discard(job_id)
            elif not done:
                self._was_open.add(job_id)
            self._jobs0[job_id] = doc
        return newly

    def _prune(self, newly: collections.Counter[int]) -> None:
        """Keep the newest `job_history` finished jobs of each cluster (and the reboot job of
        each host's maintenance window, the evidence that it was patched)."""
        for cid, n in newly.items():
            cluster = self.clusters[cid]
            cluster.finished += n
            excess = cluster.finished - self.job_history
            if excess > 0:
                gone = self.conn.execute(
                    "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE cluster = ? "
                    "AND open = 0 AND id NOT IN (SELECT window_reboot FROM hosts "
                    "WHERE cluster = ? AND window_reboot IS NOT NULL) ORDER BY seq LIMIT ?)",
                    (cid, cid, excess),
                )
                cluster.finished -= gone.rowcount
            self.conn.execute(
                "UPDATE clusters SET finished = ? WHERE id = ?", (cluster.finished, cid)
            )

    def _bump(self, touched: set[int]) -> None:
        """A new version of each cluster written, and its rows as now stored in `fresh` (the
        hosts, VMs and open jobs that a load at that version reads)."""
        if not touched:
            return
        self.conn.executemany(
            "UPDATE clusters SET version = version + 1 WHERE id = ?", [(c,) for c in touched]
        )
        for cid in touched:
            cluster = self.clusters[cid]
            cluster.version += 1
            hosts, vms = self._stored_hosts(cid), self._stored_vms(cid)
            self.fresh[cid] = simkept.Cached(cluster.version, hosts, vms, self._open_docs(cid))

    def _stored_hosts(self, cid: int) -> tuple[simkept.Row, ...]:
        rows = []
        for key, name, memory, _m, _s, _r, patch_s, reboot_s in self._host_rows[cid]:
            maintenance, state, reboot = self._hosts0[key]
            rows.append((key, name, memory, maintenance, state, reboot, patch_s, reboot_s))
        return tuple(rows)

    def _stored_vms(self, cid: int) -> tuple[simkept.Row, ...]:
        rows = []
        for vm_id, stored in self._vm_cluster.items():
            if stored == cid:
                seq, _i, name, _h, ha, _s, memory = self._vm_rows[vm_id]
                host, state = self._vms0[vm_id]
                rows.append((seq, vm_id, name, host, ha, state, memory))
        return tuple(sorted(rows))

    def _open_docs(self, cid: int) -> tuple[simkept.Row, ...]:
        """The stored open jobs of a cluster in submission order (those loaded were in order,
        and a new one has a higher seq than any before it)."""
        return tuple(
            (job["id"], self._jobs0[job["id"]]) for job in self._open[cid] if not finished(job)
        )

    def _flush_faults(self) -> None:
        if self._faults is None:
            return
        docs = [dump(fault) for fault in self._faults]
        if docs != self._faults0:
            self.conn.execute("DELETE FROM faults")
            self.conn.executemany("INSERT INTO faults (doc) VALUES (?)", [(d,) for d in docs])
            self._faults0 = docs
