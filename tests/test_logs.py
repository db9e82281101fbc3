"""Log lines carry run_id, workflow, state and action, as text or JSON, including the lines of
modules that used to log outside the configured logger (the PSRP transport)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import logcontext
from tests.clitools import FAST_CONFIG, make_cli
from tests.test_cli_acceptance import MIXED
from workflows.backends import psrp
from workflows.backends.simulated import SimulatedCluster
from workflows.cli import _setup_logging


@pytest.fixture
def configured() -> Iterator[logging.Logger]:
    root = logging.getLogger("nodepatch")
    before = list(root.handlers)
    yield root
    for handler in root.handlers:
        if handler not in before:
            root.removeHandler(handler)
            handler.close()


def test_psrp_lines_reach_the_configured_log_with_the_bound_run(
    tmp_path: Path, configured: logging.Logger
) -> None:
    """A line logged by the PSRP transport inside a run lands in the log file, as JSON, with
    the run's fields; `extra=` fields given by the call win over bound ones."""
    path = tmp_path / "n.log"
    _setup_logging(str(path), True, "json")
    with logcontext.bound(run_id="r1", workflow="node_patch", state="Draining"):
        psrp.log.debug("closing pipeline")
        logging.getLogger("nodepatch.engine").info("x", extra={"action": "a", "state": "Enabling"})
    logging.getLogger("nodepatch.worker").info("idle")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(d["logger"], d["run_id"], d["state"], d["action"]) for d in lines] == [
        ("nodepatch.psrp", "r1", "Draining", None),
        ("nodepatch.engine", "r1", "Enabling", "a"),
        ("nodepatch.worker", None, None, None),
    ]
    assert lines[0]["workflow"] == "node_patch"
    assert lines[0]["message"] == "closing pipeline"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_run_logs_its_fields_in_either_format(tmp_path: Path, fmt: str) -> None:
    """Every line a real run writes names its run, workflow and state, in the chosen format."""
    log = tmp_path / "nodepatch.log"
    cli = make_cli(
        tmp_path, f"sqlite:///{tmp_path / 'n.db'}", FAST_CONFIG + f"log: {{file: {log}}}\n"
    )
    assert cli("db", "upgrade").code == 0
    SimulatedCluster.create(cli.sim, MIXED)
    started = cli("--log-format", fmt, "start", "--cluster", "c1", "--node", "hv1", "--json")
    assert started.code == 0, started.err
    run_id = started.json()["run_id"]
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines
    if fmt == "json":
        docs = [json.loads(line) for line in lines]
        assert all(d["run_id"] == run_id and d["workflow"] == "node_patch" for d in docs)
        assert {d["state"] for d in docs} >= {"Preflight", "Draining", "Rebalancing"}
        assert {d["action"] for d in docs} >= {"step_started", "progress"}
    else:
        assert all(f"run_id={run_id} workflow=node_patch state=" in line for line in lines)
        assert any("action=step_started" in line for line in lines)


def test_the_worker_logs_json_lines_to_stderr(tmp_path: Path) -> None:
    """A worker (a daemon: journald, docker logs) writes its log lines to stderr too, in the
    chosen format, naming the run each is about."""
    cli = make_cli(tmp_path, f"sqlite:///{tmp_path / 'n.db'}")
    assert cli("db", "upgrade").code == 0
    SimulatedCluster.create(cli.sim, MIXED)
    detached = cli("start", "--cluster", "c1", "--node", "hv1", "--detach", "--json")
    run_id = detached.json()["run_id"]
    worker = cli("--log-format", "json", "worker", "--until-idle", "--poll", "0.1")
    assert worker.code == 0, worker.err
    docs = [json.loads(line) for line in worker.err.splitlines() if line.startswith("{")]
    stopped = [d for d in docs if d["action"] == "run_stopped"]
    assert [(d["run_id"], d["state"]) for d in stopped] == [(run_id, "Done")]
    assert {d["state"] for d in docs if d["run_id"] == run_id} >= {"Draining", "Rebalancing"}
