"""Prometheus metrics from the database: `nodepatch metrics` and a real worker's /metrics give
the same figures, parsed with prometheus_client's own parser."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.clitools import Cli, make_cli
from tests.test_cli_acceptance import MIXED
from tests.webhook_receiver import closed_port
from workflows.backends.simulated import SimulatedCluster

CONFIG = """\
engine: {poll_interval_s: 0.005, lease_ttl_s: 1}
retries: {attempts: 3, backoff_s: 0.01, backoff_max_s: 0.05}
"""
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
AGES = ("nodepatch_oldest_run_age_seconds",)


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def history(cli: Cli) -> None:
    """One run that fails in Draining and is resumed to the end; one whose process dies after
    Preflight and whose lease is taken over, stopped in Patching."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    sim.inject({"type": "migration_fails", "vm": "a1", "times": 2})
    failed = cli("start", "--cluster", "c1", "--node", "hv1", "--json")
    assert failed.code == 1, failed.err
    assert cli("resume", failed.json()["run_id"]).code in (0, 5)
    crash = {"NODEPATCH_CRASH_AT": "after_commit:Preflight->Draining"}
    died = cli("start", "--cluster", "c1", "--node", "hv2", "--non-ha", "migrate", env=crash)
    assert died.code not in (0, 1, 2, 3, 4, 5)
    run_id = cli("runs", "--json").json()[0]["run_id"]
    time.sleep(1.2)  # its lease runs out
    assert cli("resume", run_id, "--until", "Patching").code == 3


def test_metrics_count_runs_transitions_failures_operations_and_takeovers(
    tmp_path: Path,
) -> None:
    """`nodepatch metrics` prints runs by state, transitions, step failures, step durations, the
    cluster operations journaled, the age of the oldest run per unfinished state, lease
    takeovers and webhook deliveries; a real worker's /metrics shows the same figures."""
    cli = make_cli(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", CONFIG)
    assert cli("db", "upgrade").code == 0
    history(cli)
    printed = cli("metrics")
    assert printed.code == 0, printed.err
    found = samples(printed.out)
    wf = {"workflow": "node_patch"}
    assert value(found, "nodepatch_runs", state="Done", **wf) == 1
    assert value(found, "nodepatch_runs", state="Patching", **wf) == 1
    assert value(found, "nodepatch_transitions_total", state="Failed", **wf) == 1
    assert value(found, "nodepatch_transitions_total", state="Draining", **wf) == 3
    assert value(found, "nodepatch_step_failures_total", state="Draining", **wf) == 1
    assert value(found, "nodepatch_step_duration_seconds_count", state="Preflight", **wf) == 2
    assert value(found, "nodepatch_step_duration_seconds_bucket", state="Preflight", le="+Inf",
                 **wf) == 2  # fmt: skip
    assert value(found, "nodepatch_cluster_operations_total", kind="move_vm",
                 outcome="failed", **wf) >= 1  # fmt: skip
    assert value(found, "nodepatch_cluster_operations_total", kind="enter_maintenance",
                 outcome="succeeded", **wf) >= 2  # fmt: skip
    age = value(found, "nodepatch_oldest_run_age_seconds", state="Patching", **wf)
    assert 0 <= age < 120
    assert ("nodepatch_oldest_run_age_seconds", (("state", "Done"), *wf.items())) not in found
    assert value(found, "nodepatch_lease_takeovers_total") == 1

    port = closed_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "workflows", "worker", "--metrics-port", str(port),
         "--metrics-addr", "127.0.0.1"],
        env=cli.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        scraped = _scrape(f"http://127.0.0.1:{port}/metrics", worker)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    served = samples(scraped)
    same = {k: v for k, v in found.items() if k[0] not in AGES}
    assert {k: v for k, v in served.items() if k in same} == same
    assert value(served, "nodepatch_oldest_run_age_seconds", state="Patching", **wf) >= age


def _scrape(url: str, worker: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - test URL
                return str(answer.read().decode())
        except OSError:
            assert worker.poll() is None, "the worker exited"
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_metrics_on_either_database(tmp_path: Path, db_url: str) -> None:
    """The same queries work on SQLite and PostgreSQL: after one run to Done, the runs,
    transitions, step durations and operations add up."""
    cli = make_cli(tmp_path, db_url, CONFIG)
    SimulatedCluster.create(cli.sim, MIXED)
    assert cli("start", "--cluster", "c1", "--node", "hv1").code == 0
    printed = cli("metrics")
    assert printed.code == 0, printed.err
    found = samples(printed.out)
    wf = {"workflow": "node_patch"}
    assert value(found, "nodepatch_runs", state="Done", **wf) == 1
    assert value(found, "nodepatch_transitions_total", state="Done", **wf) == 1
    for state in ("Preflight", "Draining", "Patching", "Enabling", "Rebalancing"):
        assert value(found, "nodepatch_step_duration_seconds_count", state=state, **wf) == 1
    assert value(found, "nodepatch_cluster_operations_total", kind="exit_maintenance",
                 outcome="succeeded", **wf) == 1  # fmt: skip
    assert value(found, "nodepatch_lease_takeovers_total") == 0
    assert not [k for k in found if k[0] == "nodepatch_oldest_run_age_seconds"]
