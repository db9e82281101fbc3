"""Fields bound to every log line written while they are bound (`run_id`, `workflow`,
`state`): the runner binds the run it drives, so a line logged deep inside a step, a backend or
a patcher names its run without passing it along. Context variables, so each thread (a
worker's slot) has its own."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

_bound: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "nodepatch_log_fields", default=MappingProxyType({})
)


def fields() -> Mapping[str, Any]:
    """The fields bound here now."""
    return _bound.get()


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Bind `values` (over what is already bound) for the duration of the block."""
    token = _bound.set({**_bound.get(), **values})
    try:
        yield
    finally:
        _bound.reset(token)


def update(**values: Any) -> None:
    """Change bound fields until the enclosing `bound` block ends (a run moving on to its
    next state)."""
    _bound.set({**_bound.get(), **values})
