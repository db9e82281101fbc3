"""The composition root: settings + global options → store, backend, patchers, runner."""

from __future__ import annotations

import getpass
import os
import shlex
import socket
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa

from engine import db, errors
from engine.context import ProgressSink
from engine.model import Run
from engine.registry import Registry
from engine.store import Store
from workflows.backends.base import ClusterBackend
from workflows.node_patch import NODE_PATCH, NodePatch
from workflows.patchers.base import Patcher
from workflows.settings import Settings

CLUSTER_CYCLE = "cluster_cycle"
"""workflows.cycle.params.CLUSTER_CYCLE, named here so that commands that never drive a cycle
do not import it (and dateutil); tests/test_cli_fast.py checks that the two agree."""

if TYPE_CHECKING:
    from engine.machine import StateMachine
    from engine.runner import Runner
    from engine.workflow import Workflow


def actor() -> str:
    """Who is acting, for the audit trail: user@host:pid."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


class _Deferred:
    """The backend, opened on its first use (showing or releasing a run never needs it)."""

    def __init__(self, app: App) -> None:
        self._app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app.backend, name)


def shown_url(url: str) -> str:
    """The URL as the user gave it, unless it holds a password: then with the password hidden."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


@dataclass
class App:
    settings: Settings
    database_url: str
    sim_file: str | None
    creates_database: bool = False
    """Whether a missing database is created on first use: only the default one is."""
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    progress: ProgressSink = lambda _msg: None
    _machines: dict[tuple[str, int], StateMachine] = field(default_factory=dict, repr=False)

    @cached_property
    def store(self) -> Store:
        fix = self.upgrade_command()
        engine = db.connect(self.database_url, create=self.creates_database, upgrade_command=fix)
        db.ensure_schema(engine, create_if_empty=self.creates_database, upgrade_command=fix)
        return Store(engine)

    def upgrade_command(self) -> str:
        """The command that creates or upgrades this database (naming it unless default)."""
        if self.creates_database:
            return "nodepatch db upgrade"
        return shlex.join(
            ["nodepatch", "--database", shown_url(self.database_url), "db", "upgrade"]
        )

    @cached_property
    def backend(self) -> ClusterBackend:
        if self.sim_file or self.settings.backend == "simulated":
            from workflows.backends.simulated import SimulatedCluster

            path = self.sim_file or self.settings.sim_file
            if not path:
                raise errors.ConfigError(
                    "backend.simulated.file: required for the simulated backend "
                    "(or pass --sim FILE / set NODEPATCH_SIM)"
                )
            return SimulatedCluster(path)
        conn = self.connection()
        options = self.options()
        if self.settings.backend == "vmm":
            from workflows.backends.vmm import VmmBackend

            return VmmBackend(conn, **options)
        from workflows.backends.failover import FailoverBackend

        return FailoverBackend(conn, **options)

    def connection(self) -> Any:
        """The validated connection settings of the configured VMM or failover backend."""
        from workflows.backends import connection

        where = f"backend.{self.settings.backend}"
        return connection.from_mapping(self.settings.connection, where, self.environ)

    def options(self) -> dict[str, Any]:
        """The validated backend options of the configured VMM or failover backend."""
        from workflows.backends import connection

        where = f"backend.{self.settings.backend}"
        return connection.backend_options(self.settings.connection, where)

    def node_settings(self) -> Any:
        """How to reach a node (a callable), when a node-side patcher is configured; else None."""
        from workflows import settings as config

        kind = self.settings.patcher
        if kind not in config.REMOTE_PATCHERS:
            return None
        from workflows.patchers import remote

        options = dict(self.settings.patcher_options)
        patch = remote.settings_from_mapping(options, f"patcher.{kind}", self.environ)
        return patch.for_host

    def patcher(self, kind: str, cluster: str) -> Patcher:
        """The patcher of a run; raises ConfigError if its configuration is invalid."""
        options: dict[str, Any] = dict(self.settings.patcher_options)
        if kind == "simulated":
            from workflows.backends.simulated import SimulatedCluster
            from workflows.patchers.simulated import SimulatedPatcher

            if not isinstance(self.backend, SimulatedCluster):
                raise errors.ConfigError(
                    "patcher.kind: simulated needs the simulated backend (--sim FILE)"
                )
            seconds = options.get("patch_seconds")  # None: each host's own (else 60 s)
            return SimulatedPatcher(
                self.backend, patch_seconds=None if seconds is None else float(seconds)
            )
        from workflows.patchers import configmgr, remote

        patchers: dict[
            str,
            type[
                remote.RebootPatcher
                | remote.WindowsUpdatePatcher
                | remote.ScriptPatcher
                | configmgr.ConfigMgrPatcher
            ],
        ] = {
            "reboot": remote.RebootPatcher,
            "windows-update": remote.WindowsUpdatePatcher,
            "script": remote.ScriptPatcher,
            "configmgr": configmgr.ConfigMgrPatcher,
        }
        if kind not in patchers:
            raise errors.ConfigError(f"patcher.kind: {kind!r} has no implementation here")
        config = remote.settings_from_mapping(options, f"patcher.{kind}", self.environ)
        return patchers[kind](config, self.backend, cluster)

    @cached_property
    def registry(self) -> Registry:
        """Every workflow this build can drive, by (name, version). Building one does not
        connect to the cluster: the backend is opened when a step first uses it."""
        registry = Registry()
        backend = cast(ClusterBackend, _Deferred(self))
        registry.add(NODE_PATCH, 1, lambda: NodePatch(backend, self.patcher).workflow())
        registry.add(CLUSTER_CYCLE, 1, lambda: self._cycle(backend).workflow())
        return registry

    def _cycle(self, backend: ClusterBackend) -> Any:
        from workflows.cycle.workflow import ClusterCycle

        return ClusterCycle(backend, self.node_scripts(), self.node_durations)

    def node_scripts(self) -> Any:
        """How pre- and post-node scripts reach a node: here for the simulator, else over the
        remoting the patchers use."""
        from workflows.cycle import scripts

        if self.sim_file or self.settings.backend == "simulated":
            return scripts.LocalScripts()
        return scripts.RemoteScripts(self.patcher("reboot", ""))

    def node_durations(self, cluster: str, node: str | None) -> list[float]:
        """How long past Done node runs of a node (or of any node of the cluster) took, newest
        first (the last 20), for a cycle's estimates."""
        prefix = f"{cluster}/{node}" if node else f"{cluster}/"
        runs = self.store.runs(workflow=NODE_PATCH, subject_prefix=prefix, state="Done", limit=20)
        return [
            (r.finished_at - r.created_at).total_seconds()
            for r in runs
            if r.finished_at is not None and (node is None or r.subject == prefix)
        ]

    def runner(self, name: str = NODE_PATCH, version: int = 1) -> Runner:
        """A runner for new runs of workflow `name`."""
        from engine.runner import Runner

        workflow = self.registry.get(name, version)
        return Runner(
            self.store,
            workflow,
            self.settings.runner_for(name),
            actor=actor(),
            progress=self.progress,
            initial_states=self.registry.initial,
            machine=self._machine(workflow),
        )

    def runner_for(self, run: Run) -> Runner:
        """A runner for an existing run, with its own workflow; exit 2 if this build does not
        know it."""
        return self.runner(run.workflow, run.workflow_version)

    def _machine(self, workflow: Workflow) -> StateMachine:
        key = (workflow.name, workflow.version)
        if key not in self._machines:
            from engine.machine import StateMachine  # transitions: only to drive a run

            self._machines[key] = StateMachine(workflow)
        return self._machines[key]

    def close(self) -> None:
        if "backend" in self.__dict__:
            self.backend.close()
        if "store" in self.__dict__:
            self.store.engine.dispose()
