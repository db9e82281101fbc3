"""How a workflow is declared: states, a transition table and one step per non-final state.

A step is a function of a StepContext that returns what should happen next: `Advance` (fire a
trigger, publishing data and taking or releasing locks in the same transaction), `Wait` (stop
until a signal arrives) or `Sleep` (stop until a time, then run the step again). Steps do their
side effects through `ctx.run_job`, which journals them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.context import StepContext
    from engine.model import Run


@dataclass(frozen=True)
class Transition:
    trigger: str
    source: str
    dest: str


@dataclass(frozen=True)
class Advance:
    trigger: str
    publish: Mapping[str, Any] = field(default_factory=dict)
    acquire: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    consume: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    if_held: str | None = None  # the trigger to fire instead when a lock to acquire is held
    error: Mapping[str, Any] | None = None  # why the run ends unsuccessfully (e.g. refused)


@dataclass(frozen=True)
class Wait:
    signal: str
    reason: str


@dataclass(frozen=True)
class Sleep:
    """A durable timer: run this step again at `until` (UTC). The run gives its lease back and
    stops; a worker (or a `resume` after `until`) picks it up. A child run that ends wakes its
    parent at once."""

    until: dt.datetime
    reason: str


StepResult = Advance | Wait | Sleep
Step = Callable[["StepContext"], StepResult]


@dataclass(frozen=True)
class Workflow:
    """A workflow definition. The engine adds, for every state with a step:

    - `fail`: state → `failed` (a step raised StepFailed or gave up retrying);
    - `retry:<State>`: `failed` → State (resume from the step that failed);
    - `release`: every unfinished state → `abandoned`, when the workflow has one: an operator
      gives up on a run that cannot finish, leaving things as they are.
    An operator's `abort` signal is turned into a trigger by `on_abort(run)`; None means the
    run cannot be aborted in its current state.
    """

    name: str
    version: int
    states: tuple[str, ...]
    initial: str
    failed: str
    final: frozenset[str]
    transitions: tuple[Transition, ...]
    steps: Mapping[str, Step]
    signals: frozenset[str] = frozenset()
    on_abort: Callable[[Run], str | None] = field(default=lambda _run: None)
    abandoned: str | None = None

    def ahead(self, state: str) -> frozenset[str]:
        """The states a run in `state` can still reach by its declared transitions (itself
        included): `--until` must name one of them."""
        seen, todo = {state}, [state]
        while todo:
            here = todo.pop()
            for t in self.transitions:
                if t.source == here and t.dest not in seen:
                    seen.add(t.dest)
                    todo.append(t.dest)
        return frozenset(seen)

    def __post_init__(self) -> None:
        missing = [
            s
            for s in self.states
            if s not in self.final and s != self.failed and s not in self.steps
        ]
        if missing:
            raise ValueError(f"workflow {self.name}: no step for state(s) {missing}")
