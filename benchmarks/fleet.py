"""Fleet benchmark: node-patch runs over many simulated clusters, driven by `nodepatch worker`.

For PostgreSQL (a database of its own on 127.0.0.1, created and dropped here; skipped when the
server is unreachable) and SQLite (a temporary file):

  1. `nodepatch sim init --clusters K` makes a zero-latency simulated fleet (speed 0, the
     simulated patcher with 0 patch seconds); `nodepatch db upgrade` makes the database.
  2. `--pg-workers` (SQLite: `--sqlite-workers`) `nodepatch worker` processes are started.
  3. This driver starts the first node run of every cluster detached (the App API, as
     `nodepatch start --detach` does) and, each time a cluster's run ends, that cluster's next
     one (its hosts in turn): one node of a cluster out at a time, `--runs` runs in all. It
     looks for ended runs every 20 ms (on PostgreSQL one prepared statement in autocommit).
     runs/s = runs / (time from the first start to the last run's end).
  4. Side effects are counted from outside (`sim show --json` operations): each run must enter
     and leave maintenance once and reboot its node once, and move each VM of its node exactly
     twice (off, and back). `fleet_duplicate_side_effects` is every operation beyond that; a
     missing one fails the benchmark.
  5. RSS: each worker's resident set (/proc/PID/statm) sampled every 50 ms; the peak in the
     last tenth of the run over the peak in the first tenth, the worst worker
     (`fleet_rss_growth`). The workers' CPU per run (/proc/PID/stat) and this driver's are
     printed too.
  6. Idle cost (PostgreSQL): the same workers on a fleet of `--idle-runs` clusters; that many
     runs are started with the external patcher, so each drains its node and then waits for the
     signal `patched`. Once all wait, the SQL statements the workers send per second are counted
     for `--idle-seconds` (each worker counts its own through SQLAlchemy's
     before_cursor_execute event, BEGIN excluded, enabled by NODEPATCH_BENCH_STATEMENTS), and
     also with no run at all, to show that waiting runs cost nothing.

The figures are merged into bench.json (see benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks import results
from engine import db
from engine import schema as t
from engine.runner import Runner
from workflows import settings
from workflows.app import App
from workflows.node_patch import Params, subject

PG_URL = os.environ.get(
    "NODEPATCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NODEPATCH = [sys.executable, "-m", "workflows"]
STATEMENTS_ENV = "NODEPATCH_BENCH_STATEMENTS"
MOVES = ("live_migrate", "move_vm")
ONCE_PER_RUN = ("enter_maintenance", "exit_maintenance", "reboot_host")
TARGET_PG_RUNS_PER_S = 50.0


class BenchFailed(Exception):
    """The fleet did not end as it must (a run not Done, a side effect missing, a timeout)."""


@dataclass
class Fleet:
    """One simulated fleet, its configuration and database, in `folder`."""

    folder: Path
    url: str
    clusters: int
    hosts: int
    vms: int
    patcher: str = "simulated"

    @property
    def sim(self) -> Path:
        return self.folder / "sim.db"

    @property
    def config(self) -> Path:
        return self.folder / "config.yaml"

    def make(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cluster_args = ["--clusters", str(self.clusters), "--hosts", str(self.hosts)]
        _nodepatch(
            "sim", "init", "--file", str(self.sim), *cluster_args, "--vms", str(self.vms), "--force"
        )
        document = {
            "database": self.url,
            "backend": {"kind": "simulated", "simulated": {"file": str(self.sim)}},
            "patcher": {"kind": "simulated", "simulated": {"patch_seconds": 0}},
            "engine": {"lease_ttl_s": 30, "poll_interval_s": 0.05},
        }
        self.config.write_text(json.dumps(document), encoding="utf-8")  # JSON is YAML
        _nodepatch("--config", str(self.config), "db", "upgrade")

    def show(self) -> dict[str, Any]:
        out = _nodepatch("sim", "show", "--file", str(self.sim), "--json")
        document: dict[str, Any] = json.loads(out)
        return document

    def hosts_of(self, document: dict[str, Any]) -> dict[str, list[str]]:
        return {c["name"]: [h["name"] for h in c["hosts"]] for c in document["clusters"]}


def _nodepatch(*args: str) -> str:
    done = subprocess.run([*NODEPATCH, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchFailed(f"nodepatch {' '.join(args)}: exit {done.returncode}: {done.stderr}")
    return done.stdout


@dataclass
class Workers:
    """`count` worker processes on a fleet, their RSS sampled and their statements counted."""

    fleet: Fleet
    count: int
    concurrency: int
    poll_s: float
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    samples: list[list[tuple[float, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        for i in range(self.count):
            env = {**os.environ, STATEMENTS_ENV: str(self._counts(i))}
            command = [
                *NODEPATCH,
                "--config",
                str(self.fleet.config),
                "worker",
                "--concurrency",
                str(self.concurrency),
                "--poll",
                str(self.poll_s),
                "--grace",
                "20",
            ]
            with (self.fleet.folder / f"worker{i}.log").open("wb") as log:  # the child's copy
                self.procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
            self.samples.append([])
        threading.Thread(target=self._sample, daemon=True).start()
        deadline = time.monotonic() + 120
        while not all(self._counts(i).exists() for i in range(self.count)):  # all listening
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchFailed("the workers did not start within 120 s")
            time.sleep(0.05)

    def _counts(self, i: int) -> Path:
        return self.fleet.folder / f"statements{i}.txt"

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for proc, samples in zip(self.procs, self.samples, strict=True):
                rss = _rss_kb(proc.pid)
                if rss is not None:
                    samples.append((time.monotonic(), rss))

    def statements(self) -> int:
        """Statements sent so far by all the workers (as of their last count, <= 0.5 s old)."""
        total = 0
        for i in range(self.count):
            path = self._counts(i)
            total += int(path.read_text(encoding="utf-8") or 0) if path.exists() else 0
        return total

    def check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                log = (self.fleet.folder / f"worker{i}.log").read_text(errors="replace")
                raise BenchFailed(f"worker {i} exited with {proc.returncode}: {log[-2000:]}")

    def stop(self) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cpu_s(self) -> float:
        """CPU seconds (user and system) the live workers have used so far."""
        return sum(_cpu_s(proc.pid) for proc in self.procs)

    def rss_growth(self, start: float, end: float) -> float:
        """The worst worker's peak RSS in the last tenth of [start, end] over its first tenth
        (at least 0.2 s each, four samples, for a quick run)."""
        tenth = max((end - start) / 10, 0.2)
        worst = 0.0
        for samples in self.samples:
            first = [rss for at, rss in samples if start <= at <= start + tenth]
            last = [rss for at, rss in samples if end - tenth <= at <= end]
            if first and last:
                worst = max(worst, max(last) / max(first))
        return worst


_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kb(pid: int) -> int | None:
    """The resident set (VmRSS of /proc/PID/status) from /proc/PID/statm: two numbers to read,
    not some fifty lines, twenty times a second per worker."""
    try:
        text = Path(f"/proc/{pid}/statm").read_text(encoding="ascii")
    except OSError:
        return None
    return int(text.split()[1]) * _PAGE_KB


def _cpu_s(pid: int) -> float:
    """A process's CPU seconds (utime + stime, /proc/PID/stat), 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class Driver:
    """Starts runs as the App API does for `nodepatch start --detach`, and watches them end."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.app = App(settings.load(str(fleet.config)), fleet.url, str(fleet.sim))
        self.runner: Runner = self.app.runner()
        self.engine = self.app.store.engine
        self._watch: sa.Connection | None = None  # PostgreSQL: `finished` polls on this

    def start(self, cluster: str, node: str) -> str:
        base = self.app.settings
        params = Params(cluster, node, base.policies, self.fleet.patcher, base.concurrency)
        run = self.runner.create(subject(cluster, node), params.to_json(), detached=True)
        return run.id

    def states(self, run_ids: Sequence[str]) -> dict[str, tuple[str, bool, str | None]]:
        """Each run's (state, finished, waiting_for)."""
        query = sa.select(
            t.run.c.id, t.run.c.state, t.run.c.finished_at, t.run.c.waiting_for
        ).where(t.run.c.id.in_(list(run_ids)))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return {r.id: (r.state, r.finished_at is not None, r.waiting_for) for r in rows}

    def finished(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The state of each of the runs that has finished. On PostgreSQL one statement on a
        connection of its own in autocommit (no BEGIN and ROLLBACK around each poll), with the
        ids as one array parameter, so that its text never changes and psycopg prepares it:
        the driver polls every 20 ms and shares the CPUs with the workers and the database."""
        if self.engine.dialect.name != "postgresql":
            query = sa.select(t.run.c.id, t.run.c.state).where(
                t.run.c.id.in_(list(run_ids)), t.run.c.finished_at.is_not(None)
            )
            with self.engine.connect() as conn:
                return {r.id: r.state for r in conn.execute(query)}
        if self._watch is None:
            self._watch = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        rows = self._watch.exec_driver_sql(
            "SELECT id, state FROM run WHERE id = ANY(%(ids)s) AND finished_at IS NOT NULL",
            {"ids": list(run_ids)},
        )
        return {r.id: r.state for r in rows}

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self.app.close()


def drive_fleet(fleet: Fleet, workers: Workers, runs: int, timeout_s: float) -> tuple[float, float]:
    """Start `runs` runs, a cluster's next one when its last ends; the (start, end) times."""
    per_cluster = runs // fleet.clusters
    names = fleet.hosts_of(fleet.show())
    driver = Driver(fleet)
    started: dict[str, int] = {}  # cluster -> runs started
    current: dict[str, str] = {}  # run id -> cluster
    failed: list[str] = []
    try:
        begin = time.monotonic()
        for cluster, hosts in names.items():
            current[driver.start(cluster, hosts[0])] = cluster
            started[cluster] = 1
        while current:
            if time.monotonic() - begin > timeout_s:
                raise BenchFailed(f"{len(current)} runs still going after {timeout_s:g} s")
            time.sleep(0.02)  # the driver shares the CPUs with the workers and the database
            for run_id, state in driver.finished(list(current)).items():
                cluster = current.pop(run_id)
                if state != "Done":
                    failed.append(f"{run_id} ended {state}")
                    continue
                if started[cluster] < per_cluster:
                    hosts = names[cluster]
                    node = hosts[started[cluster] % len(hosts)]
                    current[driver.start(cluster, node)] = cluster
                    started[cluster] += 1
            workers.check_alive()
        end = time.monotonic()
    finally:
        driver.close()
    if failed:
        raise BenchFailed(f"{len(failed)} runs did not end Done, e.g. {failed[0]}")
    return begin, end


def duplicates(before: dict[str, Any], after: dict[str, Any], runs: int, clusters: int) -> int:
    """Side effects beyond what the runs had to do; BenchFailed if one is missing. The runs of
    a cluster patch its hosts in turn, and each run moves the VMs of its node off and back, so
    every VM is on its own host again after each run (checked)."""
    home = {vm["id"]: vm["host"] for vm in before["vms"]}
    on_host = Counter(vm["host"] for vm in before["vms"])
    per_cluster = runs // clusters
    expected: Counter[str] = Counter()
    for cluster in before["clusters"]:
        hosts = [h["name"] for h in cluster["hosts"]]
        for i in range(per_cluster):
            node = hosts[i % len(hosts)]
            expected["moves"] += 2 * on_host[node]
    done = runs - runs % clusters
    for kind in ONCE_PER_RUN:
        expected[kind] = done
    ops = Counter({k: v - before["operations"].get(k, 0) for k, v in after["operations"].items()})
    actual = Counter({kind: ops[kind] for kind in ONCE_PER_RUN})
    actual["moves"] = sum(ops[kind] for kind in MOVES)
    missing = {k: expected[k] - actual[k] for k in expected if actual[k] < expected[k]}
    if missing:
        raise BenchFailed(f"side effects missing: {missing} (expected {dict(expected)})")
    away = [vm["name"] for vm in after["vms"] if home.get(vm["id"]) != vm["host"]]
    if away:
        raise BenchFailed(f"{len(away)} VMs are not back on their host, e.g. {away[0]}")
    extra = sum(actual[k] - expected[k] for k in expected)
    extra += sum(ops[k] for k in ("save_vm", "start_vm", "shutdown_vm"))
    return extra


@dataclass(frozen=True)
class FleetResult:
    runs_per_s: float
    duplicates: int
    rss_growth: float


def fleet_run(
    name: str, url: str, folder: Path, args: argparse.Namespace, workers_count: int
) -> FleetResult:
    fleet = Fleet(folder, url, args.clusters, args.hosts, args.vms)
    fleet.make()
    before = fleet.show()
    workers = Workers(fleet, workers_count, args.concurrency, args.poll)
    workers.start()
    try:
        cpu0 = (workers.cpu_s(), _own_cpu_s())
        begin, end = drive_fleet(fleet, workers, args.runs, args.timeout)
        cpu1 = (workers.cpu_s(), _own_cpu_s())
    finally:
        workers.stop()
    runs = args.runs - args.runs % args.clusters
    result = FleetResult(
        runs / (end - begin),
        duplicates(before, fleet.show(), args.runs, args.clusters),
        workers.rss_growth(begin, end),
    )
    worker_ms, driver_ms = ((b - a) * 1000 / runs for a, b in zip(cpu0, cpu1, strict=True))
    print(
        f"fleet {name:<10} {runs} node runs, {args.clusters} clusters, {workers_count} workers "
        f"x {args.concurrency} slots: {result.runs_per_s:6.1f} runs/s in {end - begin:5.1f} s | "
        f"duplicate side effects {result.duplicates} | RSS growth (last/first tenth, worst "
        f"worker) {result.rss_growth:.3f} | CPU per run: workers {worker_ms:.0f} ms, this "
        f"driver {driver_ms:.0f} ms",
        flush=True,
    )
    return result


def idle_cost(url: str, folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Statements/s of the workers with no run, then with `--idle-runs` runs waiting."""
    fleet = Fleet(folder, url, args.idle_runs, 2, 2, patcher="external")
    fleet.make()
    workers = Workers(fleet, args.pg_workers, args.concurrency, args.idle_poll)
    workers.start()
    driver = Driver(fleet)
    try:
        time.sleep(2)  # let the workers start and settle
        empty = _statements_per_s(workers, args.idle_seconds)
        names = fleet.hosts_of(fleet.show())
        ids = [driver.start(cluster, hosts[0]) for cluster, hosts in names.items()]
        deadline = time.monotonic() + args.timeout
        while True:
            states = driver.states(ids).values()
            if sum(1 for _s, _f, waiting in states if waiting == "patched") == len(ids):
                break
            if any(finished for _s, finished, _w in states):
                raise BenchFailed("a run meant to wait for a signal ended")
            if time.monotonic() > deadline:
                raise BenchFailed("the idle runs did not all reach their wait in time")
            workers.check_alive()
            time.sleep(0.2)
        time.sleep(1)  # a last wake-up poll of the slots that drove them settles
        waiting = _statements_per_s(workers, args.idle_seconds)
    finally:
        driver.close()
        workers.stop()
    print(
        f"idle       {args.pg_workers} workers x {args.concurrency} slots, poll "
        f"{args.idle_poll:g} s: {empty:.2f} statements/s with no run, {waiting:.2f} with "
        f"{len(ids)} runs waiting for a signal (each worker counts the statements it sends: "
        "SQLAlchemy before_cursor_execute, BEGIN not counted)",
        flush=True,
    )
    return empty, waiting


def _statements_per_s(workers: Workers, seconds: float) -> float:
    time.sleep(0.6)  # a fresh count from every worker
    first, at = workers.statements(), time.monotonic()
    time.sleep(seconds)
    return (workers.statements() - first) / (time.monotonic() - at)


def _postgres_database(name: str) -> tuple[sa.Engine, str] | None:
    admin = sa.create_engine(db.normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        print(f"fleet postgresql skipped: unreachable at {PG_URL} ({exc.orig})")
        admin.dispose()
        return None
    url = sa.make_url(db.normalise_url(PG_URL)).set(database=name)
    return admin, url.render_as_string(hide_password=False)


def _drop(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="node runs in all")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=4, help="per cluster")
    parser.add_argument("--vms", type=int, default=8, help="per cluster")
    parser.add_argument("--pg-workers", type=int, default=4)
    parser.add_argument("--sqlite-workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="slots per worker")
    parser.add_argument("--poll", type=float, default=0.1, help="worker --poll while driving")
    parser.add_argument("--idle-runs", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--idle-poll", type=float, default=5.0, help="worker --poll when idle")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    parser.add_argument("--only", choices=("sqlite", "postgresql"), help="one database only")
    parser.add_argument("--no-record", action="store_true", help="do not write bench.json")
    args = parser.parse_args(argv)
    if args.runs < args.clusters or args.clusters < 1:
        parser.error("--runs must be at least --clusters (>= 1)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    figures: dict[str, float] = {}
    duplicate_total = 0
    worst_rss = 0.0
    with tempfile.TemporaryDirectory(prefix="nodepatch-fleet-") as tmpdir:
        tmp = Path(tmpdir)
        if args.only in (None, "postgresql"):
            name = f"nodepatch_fleet_{os.getpid()}"
            made = _postgres_database(name)
            if made is not None:
                admin, url = made
                try:
                    pg = fleet_run("postgresql", url, tmp / "pg", args, args.pg_workers)
                    empty, waiting = idle_cost(url, tmp / "idle", args)
                finally:
                    _drop(admin, name)
                figures["fleet_pg_runs_per_s"] = round(pg.runs_per_s, 1)
                figures["idle_statements_per_s"] = round(waiting, 2)
                figures["idle_statements_per_s_no_runs"] = round(empty, 2)
                duplicate_total += pg.duplicates
                worst_rss = max(worst_rss, pg.rss_growth)
                print(
                    f"fleet postgresql target: {TARGET_PG_RUNS_PER_S:g} node runs/s with "
                    f"{args.pg_workers} workers",
                    flush=True,
                )
        if args.only in (None, "sqlite"):
            url = f"sqlite:///{tmp / 'sqlite' / 'fleet.db'}"
            lite = fleet_run("sqlite", url, tmp / "sqlite", args, args.sqlite_workers)
            figures["fleet_sqlite_runs_per_s"] = round(lite.runs_per_s, 1)
            duplicate_total += lite.duplicates
            worst_rss = max(worst_rss, lite.rss_growth)
    figures["fleet_duplicate_side_effects"] = duplicate_total
    figures["fleet_rss_growth"] = round(worst_rss, 3)
    if not args.no_record:
        results.record(figures)
    print("fleet figures: " + json.dumps(figures, sort_keys=True), flush=True)
    return figures


if __name__ == "__main__":
    try:
        main()
    except BenchFailed as exc:
        print(f"fleet benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
