"""Node-side cmdlets and scripts (placeholder until the patchers exist)."""

from __future__ import annotations

from typing import Any

from tests.standin import dispatch
from tests.standin.world import World


class NodeCmdlets:
    def __init__(self, world: World) -> None:
        self.w = world

    def handlers(self) -> dict[str, dispatch.Handler]:
        return {}

    def scripts(self) -> dict[str, dispatch.Handler]:
        return {}


_ = Any
