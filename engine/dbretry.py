"""Retrying the store's calls over a lost database: `retried` wraps an idempotent call and
repeats it, with backoff, while the database is unavailable; `_transient` tells a lost
connection or a lock wait that ran out (worth a retry) from an error that is not."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import sqlalchemy as sa

from engine import errors

P = ParamSpec("P")
R = TypeVar("R")

DB_RETRIES = 6
DB_BACKOFF_S = 0.1


def retried(method: Callable[P, R]) -> Callable[P, R]:
    """Retry an idempotent store call over a lost connection or a lock timeout."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in range(DB_RETRIES):
            try:
                return method(*args, **kwargs)
            except errors.DatabaseUnavailable:
                if attempt == DB_RETRIES - 1:
                    raise
                time.sleep(DB_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


def _transient(exc: sa.exc.DBAPIError) -> bool:
    """A lost connection (PostgreSQL) or a lock wait that ran out (SQLite): worth a retry.
    A missing table or a syntax error is not."""
    if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
        return True
    if exc.orig is not None and type(exc.orig).__module__.startswith("psycopg"):
        return True
    message = str(exc.orig).lower()
    return "locked" in message or "busy" in message
