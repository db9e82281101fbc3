"""The Patcher Protocol: patch (and reboot) one drained node as a resumable external job."""

from __future__ import annotations

from typing import Protocol

from workflows.backends import base


class Patcher(Protocol):
    """Patches a node that is already in maintenance.

    `begin` starts the work and returns a reference that is journaled before it is polled, so a
    resumed run polls the same work instead of starting it again. `poll` reports progress; the
    job is done when the node is patched, rebooted if needed, and answering again. The job's
    `details` are published with the run (for example the KBs installed).
    """

    name: str

    def begin(self, host: str) -> str: ...

    def poll(self, ref: str) -> base.Job: ...

    def find(self, host: str) -> str | None:
        """The reference of unfinished patch work on host, if any (re-attach after a crash)."""
        ...

    def reboot(self, host: str) -> str:
        """Restart the node; `poll` on the reference waits for it to come back. Called, as a
        journaled job of its own, when a finished patch job's details say `reboot: pending`."""
        ...
