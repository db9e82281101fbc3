"""A Windows stand-in for tests: WSMan/PSRP over real HTTP on 127.0.0.1, backed by psrpcore.

The real pypsrp client talks to it. Each simulated computer (the VMM server, each cluster node)
is its own listener (`StandIn.endpoint(name).port`); every endpoint answers cmdlets and the
product's constant scripts from one `SimulatedCluster`, so the stand-in and the in-process
simulator show the same world. See `tests/standin/fixtures.py` for the pytest fixtures and
`build()` for starting one by hand::

    sim = SimulatedCluster.generate(tmp_path / "sim.json", hosts=3, vms=12)
    standin, world = build(sim)
    settings = settings_for(standin, "vmm01")      # ConnectionSettings for VmmBackend
    ...
    standin.stop()

`standin.dispatcher.calls` records every command received, with its parameters.
"""

from __future__ import annotations

from tests.standin import dispatch, server, world
from tests.standin.cluster_cmdlets import ClusterCmdlets
from tests.standin.node_cmdlets import NodeCmdlets
from tests.standin.vmm_cmdlets import VmmCmdlets
from workflows.backends import connection, simulated


def build(
    sim: simulated.SimulatedCluster,
    *,
    password: str = "s3cret-pass",  # noqa: S107 - the stand-in's own test credential
    tls: object = None,
) -> tuple[server.StandIn, world.World]:
    """A running stand-in (no endpoint started yet) answering from `sim`."""
    w = world.World(sim)
    d = dispatch.Dispatcher()
    d.cmdlet("Select-Object", world.select)
    for part in (VmmCmdlets(w), ClusterCmdlets(w), NodeCmdlets(w)):
        d.register(part.handlers(), part.scripts() if hasattr(part, "scripts") else {})
    d.before_request = w.before_request
    d.convert = world.to_ps
    standin = server.StandIn(d, password=password, tls=tls)  # type: ignore[arg-type]
    return standin, w


def settings_for(
    standin: server.StandIn, computer: str, *, password: str | None = None, **overrides: object
) -> connection.ConnectionSettings:
    """ConnectionSettings for one endpoint: Basic over plain HTTP on 127.0.0.1 (test-only)."""
    endpoint = standin.endpoint(computer)
    values: dict[str, object] = {
        "server": "127.0.0.1",
        "port": endpoint.port,
        "username": standin.username,
        "password": standin.password if password is None else password,
        "ssl": False,
        "auth": "basic",
        "allow_insecure_basic": True,
        "operation_timeout_s": 5.0,
        "connection_timeout_s": 5.0,
        "read_timeout_s": 10.0,
    }
    values.update(overrides)
    return connection.ConnectionSettings(**values)  # type: ignore[arg-type]
