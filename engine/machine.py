"""Builds a strict `transitions` machine from a Workflow and answers "where does this trigger go?".

The machine is static (model=None) and holds no per-run state: the database row is the truth.
No callbacks, so no I/O can hide in the machine.
"""

from __future__ import annotations

from typing import Any

from transitions import Machine, MachineError

from engine import errors
from engine.workflow import Transition, Workflow


class _Probe:
    """A throwaway model carrying only the state the trigger is fired from."""

    def __init__(self, state: str) -> None:
        self.state = state


class StateMachine:
    def __init__(self, workflow: Workflow) -> None:
        self.workflow = workflow
        self.table = _full_table(workflow)
        self._next: dict[tuple[str, str], str] = {}  # the answers so far: the machine is static
        self._machine = Machine(
            model=None,
            states=list(workflow.states),
            transitions=[
                {"trigger": t.trigger, "source": t.source, "dest": t.dest} for t in self.table
            ],
            initial=None,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            queued=False,
        )

    def next_state(self, state: str, trigger: str) -> str:
        """The state `trigger` leads to from `state`; InvalidTransition if it is not allowed."""
        found = self._next.get((state, trigger))
        if found is None:
            found = self._next[state, trigger] = self._fire(state, trigger)
        return found

    def _fire(self, state: str, trigger: str) -> str:
        probe = _Probe(state)
        event: Any = self._machine.events.get(trigger)
        if event is None:
            raise errors.InvalidTransition(f"unknown trigger {trigger!r} in {self.workflow.name}")
        try:
            event.trigger(probe)
        except MachineError as exc:
            raise errors.InvalidTransition(
                f"{self.workflow.name}: {trigger!r} is not allowed from {state}"
            ) from exc
        return probe.state

    def is_final(self, state: str) -> bool:
        return state in self.workflow.final

    def mermaid(self) -> str:
        lines = ["stateDiagram-v2", f"    [*] --> {self.workflow.initial}"]
        lines += [f"    {t.source} --> {t.dest}: {t.trigger}" for t in self.table]
        return "\n".join(lines)


def _full_table(workflow: Workflow) -> tuple[Transition, ...]:
    stepped = [s for s in workflow.states if s in workflow.steps]
    generated = [Transition("fail", s, workflow.failed) for s in stepped]
    generated += [Transition(f"retry:{s}", workflow.failed, s) for s in stepped]
    if workflow.abandoned:
        unfinished = [s for s in workflow.states if s not in workflow.final]
        generated += [Transition("release", s, workflow.abandoned) for s in unfinished]
    return tuple(workflow.transitions) + tuple(generated)
