"""Ctrl-C and SIGTERM while a run is driven: the first stops it at the next durable point, a
second stops at once. Either way the run is left resumable (exit 3)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click


class StopNow(BaseException):
    """A second Ctrl-C: stop at once (not an Exception, so nothing on the way can swallow it).
    The lease is given back on the way out; every side effect so far is journaled."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


@contextmanager
def graceful(stop: threading.Event, run_id: str) -> Iterator[None]:
    """While driving `run_id`: SIGINT/SIGTERM set `stop`; a second one raises StopNow."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise StopNow(run_id)
        stop.set()
        name = signal.Signals(signum).name
        click.echo(
            f"nodepatch: {name}: stopping run {run_id} at the next durable point "
            "(Ctrl-C again to stop at once)",
            err=True,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
