"""The `cycle:` section of the configuration: defaults of `nodepatch cycle` options, validated
once at the edge into CycleParams field values (the command line overrides each)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine import errors
from workflows.cycle.params import OnNodeFailure
from workflows.cycle.waves import Order
from workflows.cycle.windows import parse_duration, parse_window

KEYS = (
    "order",
    "max_parallel",
    "max_failed_nodes",
    "retries_per_node",
    "soak",
    "windows",
    "stop_after",
    "health_check",
    "health_check_timeout_s",
    "pre_node_script",
    "post_node_script",
    "on_node_failure",
    "headroom_percent",
    "default_node_minutes",
    "poll_s",
)
PATH_KEYS = ("pre_node_script", "post_node_script")


def defaults(data: Any) -> dict[str, Any]:
    """CycleParams field values from the `cycle:` mapping; every error names its key."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise errors.ConfigError("cycle: must be a mapping")
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"cycle.{key}"
        if key not in KEYS:
            raise errors.ConfigError(f"{where}: unknown key (known: {', '.join(KEYS)})")
        out.update(_one(str(key), value, where))
    return out


def _one(key: str, value: Any, where: str) -> dict[str, Any]:
    try:
        if key == "order":
            return {"order_by": _choice(value, [o.value for o in Order], where)}
        if key == "on_node_failure":
            return {key: _choice(value, [o.value for o in OnNodeFailure], where)}
        if key == "max_parallel":
            if value == "auto":
                return {key: None}
            return {key: _count(value, where, minimum=1)}
        if key in ("max_failed_nodes", "retries_per_node"):
            return {key: _count(value, where, minimum=0)}
        if key in ("soak", "stop_after"):
            seconds = parse_duration(str(value), where).total_seconds()
            return {f"{key}_s": seconds}
        if key == "windows":
            if not isinstance(value, list):
                raise errors.ConfigError(f"{where}: must be a list of windows")
            for i, spec in enumerate(value):
                parse_window(str(spec), f"{where}[{i}]")
            return {key: [str(s) for s in value]}
        if key in ("health_check", "pre_node_script", "post_node_script"):
            if not isinstance(value, str) or not value:
                raise errors.ConfigError(f"{where}: must be a non-empty string")
            return {key: value}
        if key == "headroom_percent":
            number = _number(value, where)
            if not 0 <= number < 100:
                raise errors.ConfigError(f"{where}: must be between 0 and 99 (got {value!r})")
            return {"headroom": number / 100}
        if key == "default_node_minutes":
            return {"default_node_s": _number(value, where, positive=True) * 60}
        if key == "health_check_timeout_s":
            return {"health_timeout_s": _number(value, where, positive=True)}
        return {key: _number(value, where, positive=True)}  # poll_s
    except errors.UsageError as exc:
        raise errors.ConfigError(str(exc)) from None


def _choice(value: Any, options: list[str], where: str) -> str:
    if value not in options:
        raise errors.ConfigError(f"{where}: must be one of {', '.join(options)} (got {value!r})")
    return str(value)


def _count(value: Any, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise errors.ConfigError(
            f"{where}: must be an integer of at least {minimum} (got {value!r})"
        )
    return value


def _number(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.ConfigError(f"{where}: must be a number (got {value!r})")
    if positive and value <= 0:
        raise errors.ConfigError(f"{where}: must be greater than 0 (got {value!r})")
    return float(value)
