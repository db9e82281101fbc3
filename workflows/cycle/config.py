"""The `cycle:` section of the configuration: defaults of `nodepatch cycle` options, validated
once at the edge into CycleParams field values (the command line overrides each)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from engine import errors
from workflows.cycle.params import OnNodeFailure
from workflows.cycle.waves import Order
from workflows.cycle.windows import parse_duration, parse_window


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
        return _CONVERT[key](value, where)
    except errors.UsageError as exc:
        raise errors.ConfigError(str(exc)) from None


def _parallel(value: Any, where: str) -> dict[str, Any]:
    return {"max_parallel": None if value == "auto" else _count(value, where, minimum=1)}


def _windows(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, list):
        raise errors.ConfigError(f"{where}: must be a list of windows")
    for i, spec in enumerate(value):
        parse_window(str(spec), f"{where}[{i}]")
    return {"windows": [str(s) for s in value]}


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise errors.ConfigError(f"{where}: must be a non-empty string")
    return value


def _headroom(value: Any, where: str) -> dict[str, Any]:
    number = _number(value, where)
    if not 0 <= number < 100:
        raise errors.ConfigError(f"{where}: must be between 0 and 99 (got {value!r})")
    return {"headroom": number / 100}


def _seconds(field: str) -> Callable[[Any, str], dict[str, Any]]:
    return lambda v, w: {field: parse_duration(str(v), w).total_seconds()}


_CONVERT: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "order": lambda v, w: {"order_by": _choice(v, [o.value for o in Order], w)},
    "on_node_failure": lambda v, w: {
        "on_node_failure": _choice(v, [o.value for o in OnNodeFailure], w)
    },
    "max_parallel": _parallel,
    "max_failed_nodes": lambda v, w: {"max_failed_nodes": _count(v, w, minimum=0)},
    "retries_per_node": lambda v, w: {"retries_per_node": _count(v, w, minimum=0)},
    "soak": _seconds("soak_s"),
    "stop_after": _seconds("stop_after_s"),
    "windows": _windows,
    "health_check": lambda v, w: {"health_check": _text(v, w)},
    "pre_node_script": lambda v, w: {"pre_node_script": _text(v, w)},
    "post_node_script": lambda v, w: {"post_node_script": _text(v, w)},
    "headroom_percent": _headroom,
    "default_node_minutes": lambda v, w: {"default_node_s": _number(v, w, positive=True) * 60},
    "health_check_timeout_s": lambda v, w: {"health_timeout_s": _number(v, w, positive=True)},
    "poll_s": lambda v, w: {"poll_s": _number(v, w, positive=True)},
}
KEYS = tuple(_CONVERT)


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
