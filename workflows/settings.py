"""Configuration: YAML, validated once at the edge into frozen Settings.

The keys, types and limits are the pydantic models of `workflows.config` (imported only when a
file is read: the defaults need no pydantic). Errors name the bad key (`policies.non_ha: must be
one of block, save, shutdown, migrate`). Secrets never live here: connection passwords come from
an environment variable or a file (see workflows/backends/connection.py).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from engine import errors
from engine.runner import Retry, RunnerSettings
from workflows import plan as planning
from workflows.node_patch import NODE_PATCH, STATES

if TYPE_CHECKING:
    from workflows import config

BACKENDS = ("simulated", "vmm", "failover")
PATCHERS = ("auto", "simulated", "external", "windows-update", "script", "reboot", "configmgr")
CONNECTED_BACKENDS = ("vmm", "failover")
REMOTE_PATCHERS = ("windows-update", "script", "reboot", "configmgr")


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
    # How long a step waits in one go before it gives its lease back and sleeps a poll interval:
    # the workers' default, and what `start` / `resume` / `abort` use for the run they drive.
    yield_after_s: float = 30.0
    timeouts_s: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    log_file: str | None = None
    cycle: Mapping[str, Any] = field(default_factory=dict)  # CycleParams field defaults
    webhooks: tuple[Webhook, ...] = ()
    model: config.Config | None = field(default=None, repr=False, compare=False)
    """The validated configuration file (None: no file, every default)."""
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


def load(path: str | None) -> Settings:
    """Settings from a YAML file (or defaults when path is None). Relative paths in the file
    are relative to the file's folder."""
    if path is None:
        return defaults()
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    import yaml  # only when a file is read

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
    ("cycle", "pre_node_script"),
    ("cycle", "post_node_script"),
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


def defaults() -> Settings:
    """The settings of an empty configuration, without loading the configuration's models
    (tests/test_settings.py checks that they are what an empty file gives)."""
    return Settings(runner=RunnerSettings(timeouts_s=dict(DEFAULT_TIMEOUTS)))


def from_mapping(data: Mapping[str, Any]) -> Settings:
    """Settings from a configuration document, validated by `workflows.config.Config`."""
    from workflows import config
    from workflows.cycle import config as cycle_config

    model: config.Config = config.validate(dict(data))
    backend, patcher = model.backend, model.patcher
    raw_backend = data.get("backend") or {}
    raw_patcher = data.get("patcher") or {}
    timeouts = _timeouts(model.timeouts_s)
    default_retry, retries = _retries(model.retries)
    runner = RunnerSettings(
        lease_ttl_s=model.engine.lease_ttl_s,
        poll_interval_s=model.engine.poll_interval_s,
        timeouts_s={**DEFAULT_TIMEOUTS, **timeouts},
        retry_attempts=default_retry.attempts,
        retry_backoff_s=default_retry.backoff_s,
        retry_backoff_max_s=default_retry.backoff_max_s,
        retries=retries.get(NODE_PATCH, {}),
    )
    return Settings(
        database=model.database.get_secret_value() if model.database else default_database(),
        backend=backend.kind,
        sim_file=backend.simulated.file if backend.simulated else None,
        connection=raw_backend.get(backend.kind, {}) if backend.kind != "simulated" else {},
        policies=planning.Policies(model.policies.non_ha, model.policies.stopped_ha),
        concurrency=model.policies.rebalance_concurrency,
        patcher=patcher.kind,
        patcher_options=raw_patcher.get(patcher.kind, {}) if patcher.kind != "auto" else {},
        runner=runner,
        yield_after_s=model.engine.yield_after_s,
        timeouts_s=_per_workflow(model.timeouts_s, timeouts),
        log_file=model.log.file,
        cycle=cycle_config.defaults(
            model.cycle.model_dump(exclude_none=True) if model.cycle else None
        ),
        webhooks=_webhooks(model.webhooks),
        model=model,
        retries=retries,
    )


def _per_workflow(model: config.Timeouts, node_patch: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {NODE_PATCH: node_patch} if node_patch else {}
    cycle = model.cluster_cycle
    if cycle is not None and cycle.model_fields_set:
        out["cluster_cycle"] = {state: getattr(cycle, state) for state in cycle.model_fields_set}
    return out


STEPPED = {  # the states with a step, by workflow
    NODE_PATCH: STATES[:5],
    "cluster_cycle": ("Preflight", "Rolling", "Aborting"),
}


def _timeouts(model: config.Timeouts) -> dict[str, float]:
    """node_patch's step timeouts the file sets: `timeouts_s.node_patch.<State>`, or the flat
    `timeouts_s.<State>` (the nested form wins when both are given)."""
    nested = model.node_patch
    flat = {state: getattr(model, state) for state in STEPPED[NODE_PATCH]}
    chosen = {state: flat[state] for state in model.model_fields_set if state in flat}
    if nested is not None:
        chosen |= {state: getattr(nested, state) for state in nested.model_fields_set}
    return chosen


def _retries(model: config.Retries) -> tuple[Retry, dict[str, dict[str, Retry]]]:
    """`retries.{attempts,backoff_s,backoff_max_s}` for every step, and per workflow and state
    `retries.<workflow>.<State>.{...}` (keys it does not give come from the flat ones)."""
    default = Retry(model.attempts, model.backoff_s, model.backoff_max_s)
    out: dict[str, dict[str, Retry]] = {}
    for workflow, states in STEPPED.items():
        for state, block in (getattr(model, workflow) or {}).items():
            if state not in states:
                known = ", ".join(states)
                raise errors.ConfigError(
                    f"retries.{workflow}.{state}: unknown state (known: {known})"
                )
            out.setdefault(workflow, {})[state] = Retry(
                attempts=block.attempts or default.attempts,
                backoff_s=block.backoff_s or default.backoff_s,
                backoff_max_s=block.backoff_max_s or default.backoff_max_s,
            )
    return default, out


DEFAULT_TIMEOUTS = {
    "Preflight": 600.0,
    "Draining": 4 * 3600.0,
    "Patching": 4 * 3600.0,
    "Enabling": 3600.0,
    "Rebalancing": 4 * 3600.0,
}


# ---- webhooks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Webhook:
    """One receiver of run events (workflows/webhooks.py). `url` or `url_env` (a Slack or
    Teams URL is itself a secret); the signing secret from `secret_env` or `secret_file`,
    read when deliveries are sent, never stored."""

    name: str
    url: str | None
    url_env: str | None
    events: tuple[str, ...]
    secret_env: str | None
    secret_file: str | None
    timeout_s: float
    max_attempts: int
    backoff_s: float
    backoff_max_s: float
    format: str


def _webhooks(found: Sequence[config.Webhook]) -> tuple[Webhook, ...]:
    """The validated `webhooks:` list (workflows.config.Webhook), each with its name."""
    from workflows import webhooks

    hooks = tuple(
        Webhook(
            name=w.name or webhooks.default_name(w.url, w.url_env),
            url=w.url,
            url_env=w.url_env,
            events=tuple(w.events),
            secret_env=w.secret_env,
            secret_file=w.secret_file,
            timeout_s=w.timeout_s,
            max_attempts=w.max_attempts,
            backoff_s=w.backoff_s,
            backoff_max_s=w.backoff_max_s,
            format=w.format,
        )
        for w in found
    )
    names = [w.name for w in hooks]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise errors.ConfigError(f"webhooks[{i}].name: {name!r} is used twice; names differ")
    return hooks
