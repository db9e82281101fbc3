"""The one exception tree. Every error nodepatch raises on purpose derives from EngineError.

Each class's docstring is its default message. The CLI maps the families to exit codes:
UsageError (2), Busy (4); everything else that escapes a command is reported as an error (2 for
input problems, 1 for a failed run).
"""

from __future__ import annotations


class EngineError(Exception):
    """nodepatch error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(EngineError):
    """Invalid input."""


class ConfigError(UsageError):
    """Invalid configuration."""


class RunNotFound(UsageError):
    """No such run."""


class DatabaseError(EngineError):
    """The database cannot be used."""


class DatabaseUnavailable(DatabaseError):
    """The database connection failed mid-run (after retries); the run is intact: resume it."""


class DatabaseConfigError(DatabaseError, UsageError):
    """The database URL or schema cannot be used as given."""


class DatabaseMissing(DatabaseConfigError):
    """There is no database at this URL: create it with `nodepatch db upgrade`."""


class SchemaOutdated(DatabaseConfigError):
    """The database schema is older than this nodepatch: run `nodepatch db upgrade`."""


class SchemaTooNew(DatabaseConfigError):
    """The database schema is newer than this nodepatch: upgrade nodepatch."""


class InvalidTransition(EngineError):
    """This transition is not allowed from the run's current state."""


class StaleRun(EngineError):
    """The run changed under us (another writer advanced it); nothing was overwritten."""


class Busy(EngineError):
    """Another live process holds the run."""


class LeaseLost(Busy):
    """This process lost its lease on the run; it stops without writing."""


def lease_lost(run_id: str, holder: str | None) -> LeaseLost:
    by = f"by {holder}" if holder else "by another process, which has released it since"
    return LeaseLost(
        f"lost the lease on run {run_id}: it was taken over {by}; this process stopped "
        "without writing"
    )


class LockHeld(EngineError):
    """A resource lock is held by another run."""

    def __init__(self, resource: str, holder: str) -> None:
        super().__init__(f"{resource} is held by run {holder}")
        self.resource = resource
        self.holder = holder


class StepFailed(EngineError):
    """The step failed; the run goes to its failed state with this reason."""


class StepTimeout(StepFailed):
    """The step ran past its configured timeout."""


class Interrupted(EngineError):
    """Stopped on request (Ctrl-C, SIGTERM, a time bound) at a durable point: resume it."""


class Yielded(EngineError):
    """The step has waited long enough in one go: it sleeps a poll interval and is re-entered
    (re-attaching to its journaled jobs), so that a worker's slot is never held by a wait."""


class TransientError(EngineError):
    """A temporary failure (connection refused, reset, timeout); the step is retried."""


class BackendError(StepFailed):
    """The cluster backend reported an error."""

    def __init__(
        self,
        message: str,
        *,
        category: str | None = None,
        target: str | None = None,
        command: str | None = None,
    ) -> None:
        super().__init__(message)
        self.category = category
        self.target = target
        self.command = command


class NotFound(BackendError):
    """The cluster, host or VM named does not exist."""


class TransientBackendError(TransientError):
    """The cluster backend could not be reached for now."""


class AuthenticationFailed(BackendError):
    """The backend refused the credentials; retrying would not help."""
