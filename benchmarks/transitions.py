"""Engine throughput next to the raw commit rate of the same database, measured in one run.

For SQLite (a temporary file, WAL, synchronous=FULL) and PostgreSQL (127.0.0.1, if reachable):
  raw      single-row INSERT + COMMIT per iteration through the bare driver
  engine   persisted transitions/s of a no-op workflow (lease, CAS update, hashed audit event)
  nodepatch transitions/s of full node-patch runs on the zero-latency simulated cluster
Each figure is the best of `--rounds` rounds of `--seconds` each, the rounds interleaved;
ratios are engine/raw. Statements and transactions per engine transition are counted
(SQLAlchemy `before_cursor_execute` and `begin` events; the BEGIN that opens a transaction is
not counted as a statement) over a few no-op runs outside the timed rounds. The figures are
merged into bench.json (see benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy import event

from benchmarks import results
from engine import db
from engine.runner import Runner, RunnerSettings
from engine.store import Store
from engine.workflow import Advance, StepResult, Transition, Workflow
from workflows.backends.simulated import SimulatedCluster
from workflows.node_patch import NodePatch, Params, subject
from workflows.patchers.simulated import SimulatedPatcher
from workflows.plan import Policies

PG_URL = os.environ.get(
    "NODEPATCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SETTINGS = RunnerSettings(lease_ttl_s=30, poll_interval_s=0.0001)
CHAIN = ("S0", "S1", "S2", "S3", "S4")
ROUNDS = 6
TARGET_RATIO = 0.2  # engine/raw, on SQLite (WAL, synchronous=FULL) and on PostgreSQL
COUNTED_RUNS = 20


def rates(
    figures: dict[str, Callable[[], int]], seconds: float, rounds: int = ROUNDS
) -> dict[str, float]:
    """Units per second of each figure, the best of its rounds. The rounds are interleaved
    (raw, engine, node patch, raw, ...) and short, so that on a shared machine, where the speed
    of the disk and the CPU left drift from one second to the next, every figure gets rounds in
    the same quiet moments."""
    best = dict.fromkeys(figures, 0.0)
    for _ in range(rounds):
        for name, fn in figures.items():
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                done += fn()
            best[name] = max(best[name], done / (time.perf_counter() - start))
    return best


def raw_sqlite(path: Path) -> Callable[[], int]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, v TEXT)")

    def one() -> int:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bench (v) VALUES ('x')")
        conn.execute("COMMIT")
        return 1

    return one


def raw_postgres(url: str) -> Callable[[], int]:
    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    conn.execute("CREATE TABLE IF NOT EXISTS bench (id serial PRIMARY KEY, v text)")
    conn.commit()

    def one() -> int:
        conn.execute("INSERT INTO bench (v) VALUES ('x')")
        conn.commit()
        return 1

    return one


def noop_workflow() -> Workflow:
    def step(trigger: str) -> Callable[..., StepResult]:
        return lambda _ctx: Advance(trigger)

    transitions = tuple(Transition(f"t{i}", CHAIN[i], CHAIN[i + 1]) for i in range(4))
    return Workflow(
        name="bench",
        version=1,
        states=(*CHAIN, "Done", "Failed"),
        initial="S0",
        failed="Failed",
        final=frozenset({"Done"}),
        transitions=(*transitions, Transition("t4", "S4", "Done")),
        steps={s: step(f"t{i}") for i, s in enumerate(CHAIN)},
    )


def engine_rate(store: Store) -> Callable[[], int]:
    runner = Runner(store, noop_workflow(), SETTINGS, actor="bench@local:0")

    def one() -> int:
        runner.start("bench", {})
        return 5

    return one


def nodepatch_rate(store: Store, sim_path: Path) -> Callable[[], int]:
    def one() -> int:
        cluster = SimulatedCluster.generate(sim_path, hosts=3, vms=9, seed=1)
        patch = NodePatch(cluster, lambda _k, _c: SimulatedPatcher(cluster))
        runner = Runner(store, patch.workflow(), SETTINGS, actor="bench@local:0")
        params = Params("cluster1", "hv01", Policies(), "simulated", 4)
        assert runner.start(subject("cluster1", "hv01"), params.to_json()).run.state == "Done"
        return 5

    return one


class Counts:
    """Statements and transactions an engine issues while counting (a context manager)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.statements = 0
        self.transactions = 0

    def _statement(self, _conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip()[:5].upper() != "BEGIN":
            self.statements += 1

    def _begin(self, _conn: object) -> None:
        self.transactions += 1

    def __enter__(self) -> Counts:
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "begin", self._begin)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "begin", self._begin)


def per_transition(store: Store) -> tuple[float, float]:
    """Statements and transactions per transition of the no-op workflow, whole runs included
    (create, claim, the runner's reads, the transitions, release)."""
    one = engine_rate(store)
    with Counts(store.engine) as counts:
        transitions = sum(one() for _ in range(COUNTED_RUNS))
    return counts.statements / transitions, counts.transactions / transitions


def measure(
    name: str, url: str, raw: Callable[[], int], tmp: Path, *, seconds: float, rounds: int
) -> None:
    engine = db.connect(url, create=True)
    db.upgrade(engine)
    store = Store(engine)
    statements, transactions = per_transition(store)
    best = rates(
        {
            "raw": raw,
            "engine": engine_rate(store),
            "nodepatch": nodepatch_rate(store, tmp / f"{name}.json"),
        },
        seconds,
        rounds,
    )
    raw_rate, eng_rate, np_rate = best["raw"], best["engine"], best["nodepatch"]
    engine.dispose()
    ratio = eng_rate / raw_rate
    print(
        f"{name:<10} raw commits/s {raw_rate:9.0f} | engine transitions/s {eng_rate:8.0f} "
        f"(ratio {ratio:.3f}, target {TARGET_RATIO}) | node-patch transitions/s {np_rate:7.1f} "
        f"(ratio {np_rate / raw_rate:.4f})"
    )
    print(
        f"{name:<10} per engine transition: {statements:.1f} statements, "
        f"{transactions:.2f} transactions"
    )
    results.record(
        {
            f"engine_ratio_{name}": round(ratio, 4),
            f"raw_commits_per_s_{name}": round(raw_rate, 1),
            f"engine_transitions_per_s_{name}": round(eng_rate, 1),
            f"nodepatch_transitions_per_s_{name}": round(np_rate, 1),
            f"nodepatch_ratio_{name}": round(np_rate / raw_rate, 4),
            f"engine_statements_per_transition_{name}": round(statements, 2),
            f"engine_transactions_per_transition_{name}": round(transactions, 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of each figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nodepatch-bench-") as tmpdir:
        tmp = Path(tmpdir)
        measure(
            "sqlite",
            f"sqlite:///{tmp / 'bench.db'}",
            raw_sqlite(tmp / "raw.db"),
            tmp,
            seconds=args.seconds,
            rounds=args.rounds,
        )
        name = f"nodepatch_bench_{os.getpid()}"
        admin = sa.create_engine(db.normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        except sa.exc.OperationalError as exc:
            print(f"postgresql skipped: unreachable at {PG_URL} ({exc.orig})")
            return
        url = str(
            sa.make_url(db.normalise_url(PG_URL))
            .set(database=name)
            .render_as_string(hide_password=False)
        )
        try:
            measure(
                "postgresql", url, raw_postgres(url), tmp, seconds=args.seconds, rounds=args.rounds
            )
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
