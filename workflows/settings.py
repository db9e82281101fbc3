"""Configuration: YAML, validated once at the edge into frozen Settings.

Errors name the bad key (`policies.non_ha: must be one of block, save, shutdown, migrate`).
Secrets never live here: connection passwords come from an environment variable or a file
(see workflows/backends/connection.py).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from engine import errors
from engine.runner import Retry, RunnerSettings
from workflows import plan as planning
from workflows.node_patch import NODE_PATCH, STATES

BACKENDS = ("simulated", "vmm", "failover")
PATCHERS = ("auto", "simulated", "external", "windows-update", "script", "reboot")
CONNECTED_BACKENDS = ("vmm", "failover")
REMOTE_PATCHERS = ("windows-update", "script", "reboot")


def default_database() -> str:
    """SQLite in $XDG_STATE_HOME/nodepatch (~/.local/state when unset), read when called."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if not Path(state).is_absolute():  # unset, empty or relative: ignored, as the spec says
        state = "~/.local/state"
    return "sqlite:///" + str(Path(state).expanduser() / "nodepatch" / "nodepatch.db")


@dataclass(frozen=True)
class Settings:
    database: str = field(default_factory=default_database)
    backend: str = "simulated"
    sim_file: str | None = None
    connection: Mapping[str, Any] = field(default_factory=dict)
    policies: planning.Policies = field(default_factory=planning.Policies)
    concurrency: int = 2
    patcher: str = "auto"
    patcher_options: Mapping[str, Any] = field(default_factory=dict)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    timeouts_s: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    log_file: str | None = None
    retries: Mapping[str, Mapping[str, Retry]] = field(default_factory=dict)

    def runner_for(self, workflow: str) -> RunnerSettings:
        """The engine settings of one workflow: its own step timeouts and retries over the
        defaults."""
        if workflow == NODE_PATCH:
            return self.runner
        return replace(
            self.runner,
            timeouts_s=dict(self.timeouts_s.get(workflow, {})),
            retries=dict(self.retries.get(workflow, {})),
        )

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
    "timeouts_s": dict,
    "retries": dict,  # see _retries
    "log": {"file": str},
}
_RETRY: dict[str, Any] = {"attempts": int, "backoff_s": float, "backoff_max_s": float}


def load(path: str | None) -> Settings:
    """Settings from a YAML file (or defaults when path is None). Relative paths in the file
    are relative to the file's folder."""
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
    return from_mapping(_anchored(data, Path(path).expanduser().resolve().parent))


_PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("backend", "simulated", "file"),
    ("log", "file"),
    ("patcher", "script", "script_path"),
    *(("backend", b, k) for b in CONNECTED_BACKENDS for k in ("password_file", "ca_bundle")),
    *(
        ("patcher", p, "connection", k)
        for p in REMOTE_PATCHERS
        for k in ("password_file", "ca_bundle")
    ),
)


def _anchored(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A copy of data whose relative paths (and sqlite:/// URL) are made absolute under folder."""
    out = copy.deepcopy(data)
    for keys in _PATH_KEYS:
        parent: Any = out
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        value = parent.get(keys[-1]) if isinstance(parent, dict) else None
        if isinstance(value, str) and value:
            parent[keys[-1]] = str(folder / Path(value).expanduser())
    if isinstance(out.get("database"), str):
        out["database"] = _anchored_url(out["database"], folder)
    return out


def _anchored_url(url: str, folder: Path) -> str:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return url  # reported, naming it, when the database is opened
    name = parsed.database
    if parsed.get_backend_name() != "sqlite" or not name or name == ":memory:":
        return url
    if name.startswith("file:") or Path(name).expanduser().is_absolute():
        return url
    return parsed.set(database=str(folder / name)).render_as_string(hide_password=False)


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
    default_retry, retries = _retries(data.get("retries", {}))
    timeouts = _timeouts(data.get("timeouts_s", {}))
    kind = _choice(backend.get("kind", "simulated"), BACKENDS, "backend.kind")
    runner = RunnerSettings(
        lease_ttl_s=_positive(float(eng.get("lease_ttl_s", 30)), "engine.lease_ttl_s"),
        poll_interval_s=_positive(float(eng.get("poll_interval_s", 2)), "engine.poll_interval_s"),
        timeouts_s={**DEFAULT_TIMEOUTS, **timeouts.get(NODE_PATCH, {})},
        retry_attempts=default_retry.attempts,
        retry_backoff_s=default_retry.backoff_s,
        retry_backoff_max_s=default_retry.backoff_max_s,
        retries=retries.get(NODE_PATCH, {}),
    )
    patcher_kind = _choice(patcher.get("kind", "auto"), PATCHERS, "patcher.kind")
    _check_remote_blocks(backend, kind, patcher, patcher_kind)
    return Settings(
        database=data.get("database") or default_database(),
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
        timeouts_s=timeouts,
        log_file=data.get("log", {}).get("file"),
        retries=retries,
    )


STEPPED = {NODE_PATCH: STATES[:5]}  # the states with a step, by workflow


def _timeouts(data: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """`timeouts_s.<workflow>.<State>` (the flat `timeouts_s.<State>` of node_patch still
    works): seconds a step may take."""
    out: dict[str, dict[str, float]] = {}
    for key, value in data.items():
        where = f"timeouts_s.{key}"
        if key in STEPPED and isinstance(value, Mapping):
            for state, seconds in value.items():
                _timeout_key(out, key, state, seconds, f"{where}.{state}")
        elif key in STEPPED[NODE_PATCH]:
            _timeout_key(out, NODE_PATCH, key, value, where)
        else:
            raise errors.ConfigError(
                f"{where}: unknown key (known: a workflow, {', '.join(STEPPED)}, with its "
                f"states; or one of {', '.join(STEPPED[NODE_PATCH])} for {NODE_PATCH})"
            )
    return out


def _timeout_key(
    out: dict[str, dict[str, float]], workflow: str, state: Any, seconds: Any, where: str
) -> None:
    if state not in STEPPED[workflow]:
        known = ", ".join(STEPPED[workflow])
        raise errors.ConfigError(f"{where}: unknown state (known: {known})")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise errors.ConfigError(f"{where}: must be a number (got {seconds!r})")
    out.setdefault(workflow, {})[state] = _positive(float(seconds), where)


def _retries(data: Mapping[str, Any]) -> tuple[Retry, dict[str, dict[str, Retry]]]:
    """`retries.{attempts,backoff_s,backoff_max_s}` for every step, and per workflow and state
    `retries.<workflow>.<State>.{...}` (keys it does not give come from the flat ones)."""
    flat = {key: value for key, value in data.items() if key in _RETRY}
    default = _retry(flat, Retry(), "retries")
    out: dict[str, dict[str, Retry]] = {}
    for key, value in data.items():
        where = f"retries.{key}"
        if key in _RETRY:
            continue
        if key not in STEPPED or not isinstance(value, Mapping):
            raise errors.ConfigError(
                f"{where}: unknown key (known: {', '.join(_RETRY)}, or a workflow, "
                f"{', '.join(STEPPED)}, with its states)"
            )
        for state, block in value.items():
            if state not in STEPPED[key]:
                known = ", ".join(STEPPED[key])
                raise errors.ConfigError(f"{where}.{state}: unknown state (known: {known})")
            out.setdefault(key, {})[state] = _retry(block, default, f"{where}.{state}")
    return default, out


def _retry(data: Any, base: Retry, where: str) -> Retry:
    _check(data, _RETRY, where)
    return Retry(
        attempts=int(_positive(data.get("attempts", base.attempts), f"{where}.attempts")),
        backoff_s=_positive(float(data.get("backoff_s", base.backoff_s)), f"{where}.backoff_s"),
        backoff_max_s=_positive(
            float(data.get("backoff_max_s", base.backoff_max_s)), f"{where}.backoff_max_s"
        ),
    )


def _check_remote_blocks(
    backend: Mapping[str, Any], kind: str, patcher: Mapping[str, Any], patcher_kind: str
) -> None:
    """The connection blocks of the backend and the patchers, checked now like every other key;
    only their secrets wait until a command uses them."""
    from workflows.backends import connection

    for name in CONNECTED_BACKENDS:
        if name in backend or name == kind:
            connection.validate(backend.get(name, {}), f"backend.{name}")
    remote_blocks = [p for p in REMOTE_PATCHERS if p in patcher or p == patcher_kind]
    if remote_blocks:
        from workflows.patchers import remote  # pypsrp: imported only when configured

        for name in remote_blocks:
            remote.validate(patcher.get(name, {}), f"patcher.{name}")


DEFAULT_TIMEOUTS = {
    "Preflight": 600.0,
    "Draining": 4 * 3600.0,
    "Patching": 4 * 3600.0,
    "Enabling": 3600.0,
    "Rebalancing": 4 * 3600.0,
}
