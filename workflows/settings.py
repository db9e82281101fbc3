"""Configuration: YAML, validated once at the edge into frozen Settings.

Errors name the bad key (`policies.non_ha: must be one of block, save, shutdown, migrate`).
Secrets never live here: connection passwords come from an environment variable or a file
(see workflows/backends/connection.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine import errors
from engine.runner import RunnerSettings
from workflows import plan as planning
from workflows.node_patch import STATES

DEFAULT_DATABASE = "sqlite:///" + str(
    Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser()
    / "nodepatch"
    / "nodepatch.db"
)
BACKENDS = ("simulated", "vmm", "failover")
PATCHERS = ("auto", "simulated", "external", "windows-update", "script", "reboot")


@dataclass(frozen=True)
class Settings:
    database: str = DEFAULT_DATABASE
    backend: str = "simulated"
    sim_file: str | None = None
    connection: Mapping[str, Any] = field(default_factory=dict)
    policies: planning.Policies = field(default_factory=planning.Policies)
    concurrency: int = 2
    patcher: str = "auto"
    patcher_options: Mapping[str, Any] = field(default_factory=dict)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    log_file: str | None = None

    def patcher_for_runs(self) -> str:
        """The patcher a new run records: `auto` is simulated on the simulator, else external."""
        if self.patcher != "auto":
            return self.patcher
        return "simulated" if self.backend == "simulated" else "external"


_SCHEMA: dict[str, Any] = {
    "database": str,
    "backend": {"kind": str, "simulated": {"file": str}, "vmm": dict, "failover": dict},
    "policies": {"non_ha": str, "stopped_ha": str, "rebalance_concurrency": int},
    "patcher": {
        "kind": str,
        "simulated": {"patch_seconds": float},
        "windows-update": dict,
        "script": dict,
        "reboot": dict,
    },
    "engine": {"lease_ttl_s": float, "poll_interval_s": float},
    "timeouts_s": {state: float for state in STATES[:5]},
    "retries": {"attempts": int, "backoff_s": float, "backoff_max_s": float},
    "log": {"file": str},
}


def load(path: str | None) -> Settings:
    """Settings from a YAML file (or defaults when path is None)."""
    if path is None:
        return from_mapping({})
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise errors.ConfigError(f"{path}: malformed YAML{where}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise errors.ConfigError(f"{path}: the top level must be a mapping")
    return from_mapping(data)


def _check(data: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(data, dict):
            raise errors.ConfigError(f"{where or 'configuration'}: must be a mapping")
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key not in schema:
                known = ", ".join(schema)
                raise errors.ConfigError(f"{path}: unknown key (known: {known})")
            _check(value, schema[key], path)
        return
    if schema is float and isinstance(data, int) and not isinstance(data, bool):
        return
    if not isinstance(data, schema) or (schema is int and isinstance(data, bool)):
        kind = {str: "a string", int: "an integer", float: "a number", dict: "a mapping"}[schema]
        raise errors.ConfigError(f"{where}: must be {kind} (got {data!r})")


def _choice(value: str, choices: tuple[str, ...] | type[Any], where: str) -> str:
    options = tuple(str(c) for c in choices)
    if value not in options:
        raise errors.ConfigError(f"{where}: must be one of {', '.join(options)} (got {value!r})")
    return value


def _positive(value: float, where: str) -> float:
    if value <= 0:
        raise errors.ConfigError(f"{where}: must be greater than 0 (got {value!r})")
    return value


def from_mapping(data: Mapping[str, Any]) -> Settings:
    _check(dict(data), _SCHEMA, "")
    backend = data.get("backend", {})
    policies = data.get("policies", {})
    patcher = data.get("patcher", {})
    eng = data.get("engine", {})
    retries = data.get("retries", {})
    timeouts = {
        k: _positive(float(v), f"timeouts_s.{k}") for k, v in data.get("timeouts_s", {}).items()
    }
    kind = _choice(backend.get("kind", "simulated"), BACKENDS, "backend.kind")
    runner = RunnerSettings(
        lease_ttl_s=_positive(float(eng.get("lease_ttl_s", 30)), "engine.lease_ttl_s"),
        poll_interval_s=_positive(float(eng.get("poll_interval_s", 2)), "engine.poll_interval_s"),
        timeouts_s={**DEFAULT_TIMEOUTS, **timeouts},
        retry_attempts=int(_positive(retries.get("attempts", 3), "retries.attempts")),
        retry_backoff_s=_positive(float(retries.get("backoff_s", 5)), "retries.backoff_s"),
        retry_backoff_max_s=_positive(
            float(retries.get("backoff_max_s", 120)), "retries.backoff_max_s"
        ),
    )
    patcher_kind = _choice(patcher.get("kind", "auto"), PATCHERS, "patcher.kind")
    return Settings(
        database=data.get("database", DEFAULT_DATABASE),
        backend=kind,
        sim_file=backend.get("simulated", {}).get("file"),
        connection=backend.get(kind, {}) if kind != "simulated" else {},
        policies=planning.Policies(
            planning.NonHaPolicy(
                _choice(policies.get("non_ha", "block"), planning.NonHaPolicy, "policies.non_ha")
            ),
            planning.StoppedHaPolicy(
                _choice(
                    policies.get("stopped_ha", "leave"),
                    planning.StoppedHaPolicy,
                    "policies.stopped_ha",
                )
            ),
        ),
        concurrency=int(
            _positive(policies.get("rebalance_concurrency", 2), "policies.rebalance_concurrency")
        ),
        patcher=patcher_kind,
        patcher_options=patcher.get(patcher_kind, {}) if patcher_kind != "auto" else {},
        runner=runner,
        log_file=data.get("log", {}).get("file"),
    )


DEFAULT_TIMEOUTS = {
    "Preflight": 600.0,
    "Draining": 4 * 3600.0,
    "Patching": 4 * 3600.0,
    "Enabling": 3600.0,
    "Rebalancing": 4 * 3600.0,
}
