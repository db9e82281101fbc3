"""The workflows this build knows, by (name, version). A run is always driven, shown and
signalled with its own workflow; a run of a workflow this build does not know is refused."""

from __future__ import annotations

from collections.abc import Callable

from engine import errors
from engine.workflow import Workflow

Factory = Callable[[], Workflow]


class Registry:
    def __init__(self) -> None:
        self._factories: dict[tuple[str, int], Factory] = {}
        self._built: dict[tuple[str, int], Workflow] = {}

    def add(self, name: str, version: int, factory: Factory) -> None:
        """Register a workflow; `factory` builds it on first use (it may need a backend)."""
        self._factories[(name, version)] = factory

    def known(self) -> list[tuple[str, int]]:
        return sorted(self._factories)

    def get(self, name: str, version: int) -> Workflow:
        key = (name, version)
        if key not in self._built:
            if key not in self._factories:
                known = ", ".join(f"{n} v{v}" for n, v in self.known()) or "none"
                raise errors.UsageError(
                    f"workflow {name!r} version {version} is not known to this nodepatch "
                    f"(it knows {known}): use the nodepatch that started the run"
                )
            workflow = self._factories[key]()
            if (workflow.name, workflow.version) != key:
                raise errors.EngineError(f"the factory for {name} v{version} built another one")
            self._built[key] = workflow
        return self._built[key]

    def check(self, name: str, version: int) -> None:
        """Refuse a run this build cannot drive, without building anything."""
        if (name, version) not in self._factories:
            self.get(name, version)

    def initial(self, name: str, version: int) -> str:
        return self.get(name, version).initial
