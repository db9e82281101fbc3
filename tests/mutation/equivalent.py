"""Mutants judged equivalent: no test can tell them from the code, or none can on SQLite, where
`make mutate` runs. They are recorded as `equivalent`, with the reason, instead of being run.

Each is named by the line as written and as mutated (whitespace ignored), optionally narrowed
to a module and to the function or class it is in, so an entry survives edits elsewhere. A new
survivor belongs here only after asking what behaviour it changes; if a user could notice,
write the test instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Equivalent:
    before: str
    after: str
    why: str
    module: str | None = None
    definition: str | None = None

    def matches(self, module: str, definition: str | None, before: str, after: str) -> bool:
        return (
            (self.module is None or self.module == module)
            and (self.definition is None or self.definition == definition)
            and squash(self.before) == before
            and squash(self.after) == after
        )


def squash(code: str) -> str:
    return re.sub(r"\s+", "", code)


EQUIVALENT: tuple[Equivalent, ...] = ()
