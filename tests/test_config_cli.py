"""`nodepatch config check` and `nodepatch config schema`, run as separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from workflows import config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
PASSWORD = "hunter2-db-secret"


def nodepatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "workflows", *args],
        env=environ | (env or {}),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_check_prints_the_effective_configuration_with_secrets_masked(tmp_path: Path) -> None:
    """`config check FILE` exits 0 and prints every effective value (defaults filled in, paths
    made absolute), with the database password masked, as YAML or as JSON."""
    path = tmp_path / "c.yaml"
    path.write_text(
        f"database: postgresql://np:{PASSWORD}@db01/nodepatch\n"
        "backend: {kind: simulated, simulated: {file: cluster.json}}\n"
        "timeouts_s: {Draining: 60}\n",
        encoding="utf-8",
    )
    text = nodepatch("config", "check", str(path))
    assert text.returncode == 0, text.stderr
    assert PASSWORD not in text.stdout + text.stderr
    shown = yaml.safe_load(text.stdout)
    assert shown["database"] == "postgresql://np:***@db01/nodepatch"
    assert shown["backend"]["simulated"]["file"] == str(tmp_path / "cluster.json")
    assert shown["timeouts_s"]["Draining"] == 60
    assert shown["retries"] == {"attempts": 3, "backoff_s": 5.0, "backoff_max_s": 120.0}
    as_json = nodepatch("config", "check", str(path), "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["config"] == shown
    assert PASSWORD not in as_json.stdout + as_json.stderr


def test_check_of_an_invalid_file_is_one_line_exit_2(tmp_path: Path) -> None:
    """An invalid file: exit 2, one line on stderr naming the key, nothing on stdout. The FILE
    argument is checked even when NODEPATCH_CONFIG names another (broken) file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: {non_ha: blok}\n", encoding="utf-8")
    result = nodepatch("config", "check", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "nodepatch: error: policies.non_ha: must be one of block, save, shutdown, migrate "
        "(got 'blok')"
    ]
    good = nodepatch("config", "check", str(EXAMPLE), env={"NODEPATCH_CONFIG": str(bad)})
    assert good.returncode == 0, good.stderr
    by_env = nodepatch("config", "check", env={"NODEPATCH_CONFIG": str(bad)})
    assert by_env.returncode == 2


def test_schema_is_the_models_json_schema() -> None:
    """`config schema` prints a JSON Schema (2020-12) of the whole file: unknown keys are not
    allowed, backends and patchers are one of their kinds, and the example's keys are all in it."""
    result = nodepatch("config", "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert len(schema["properties"]["backend"]["oneOf"]) == 3
    assert len(schema["properties"]["patcher"]["oneOf"]) == 7  # with configmgr
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert set(example) <= set(schema["properties"])
    assert schema["$defs"]["Policies"]["properties"]["non_ha"]["$ref"].endswith("NonHaPolicy")
    assert schema["$defs"]["NonHaPolicy"]["enum"] == ["block", "save", "shutdown", "migrate"]
    assert "windows-update" in schema["$defs"]["AutoPatcher"]["properties"]
    assert schema == {
        **config.Config.model_json_schema(by_alias=True),
        "$schema": schema["$schema"],
        "$id": schema["$id"],
        "title": "nodepatch configuration",
    }
