"""Authentication and node addressing (issue 11): CredSSP without its module is a clear error,
Kerberos from the ticket cache sends no password, delegation can be asked for, doctor says
which mechanism was negotiated, and patchers reach nodes by the FQDN the cluster reports."""

from __future__ import annotations

import pytest
from pypsrp.wsman import WSMan

from engine import errors
from tests.standin.fixtures import Rig, rig, standin_sim  # noqa: F401 - pytest fixtures
from workflows import doctor
from workflows.backends import connection, psrp, vmm
from workflows.patchers import remote


def test_credssp_without_its_module_is_a_clear_error_not_a_crash(rig: Rig) -> None:  # noqa: F811
    """auth: credssp with requests-credssp missing: doctor says what to install, and a session
    raises ConfigError (exit 2) instead of letting pypsrp's ImportError escape."""
    pytest.importorskip("pypsrp")
    if psrp.missing_module("credssp") is None:
        pytest.skip("requests-credssp is installed here")
    settings = rig.settings("vmm01", auth="credssp")
    checks = doctor.diagnose(settings, kind="vmm")
    assert not checks[-1].ok and "nodepatch[credssp]" in checks[-1].detail
    session = psrp.Session(settings)
    with pytest.raises(errors.ConfigError, match="requests-credssp"):
        session.run([psrp.Cmd("Get-SCJob")])


def test_kerberos_without_a_password_uses_the_credential_cache() -> None:
    """auth: kerberos with neither password nor username passes None for both (pyspnego reads
    only None as "use the ticket cache"), and the configuration accepts it."""
    settings = connection.from_mapping(
        {"server": "hv01.corp.example", "auth": "kerberos"}, "backend.failover", {}
    )
    kwargs = settings.wsman_kwargs()
    assert kwargs["password"] is None and kwargs["username"] is None


def test_delegation_is_passed_to_pypsrp_when_asked_for() -> None:
    """negotiate_delegate: true reaches WSMan (Kerberos delegation for the second hop)."""
    settings = connection.from_mapping(
        {"server": "hv01.corp.example", "auth": "kerberos", "negotiate_delegate": True},
        "backend.failover",
        {},
    )
    kwargs = settings.wsman_kwargs()
    assert kwargs["negotiate_delegate"] is True
    wsman = WSMan(**kwargs)  # pypsrp accepts the keyword (nothing is sent yet)
    assert wsman.transport.negotiate_delegate is True
    plain = connection.from_mapping(
        {"server": "vmm01", "username": "u", "password_env": "P"}, "backend.vmm", {"P": "x"}
    )
    assert "negotiate_delegate" not in plain.wsman_kwargs()


def test_doctor_says_which_mechanism_was_negotiated(rig: Rig) -> None:  # noqa: F811
    """The authentication check names the mechanism the session actually used."""
    checks = doctor.diagnose(rig.settings("vmm01"), kind="vmm")
    auth = next(c for c in checks if c.name == "authentication")
    assert auth.ok and "negotiated: basic" in auth.detail


def test_patchers_connect_to_the_fqdn_the_cluster_reports(rig: Rig) -> None:  # noqa: F811
    """Without node_addresses a patcher reaches hv01 as hv01.corp.example (VMM's
    FullyQualifiedDomainName), not as the short name; node_addresses still wins."""
    backend = vmm.VmmBackend(rig.settings("vmm01"))
    bare = remote.RebootPatcher(
        remote.RemotePatchSettings(connection=rig.settings("hv01")), backend, "cluster1"
    )
    configured = remote.RebootPatcher(
        remote.RemotePatchSettings(
            connection=rig.settings("hv01"), node_addresses={"hv01": "10.0.0.1:5986"}
        ),
        backend,
        "cluster1",
    )
    assert bare.address("hv01") == "hv01.corp.example"
    assert configured.address("hv01") == "10.0.0.1:5986"
    backend.close()
    real = remote.RemotePatchSettings(
        connection=connection.ConnectionSettings(server="x", username="u", password="p")
    )
    assert real.for_host("hv01", address=bare.address("hv01")).server == "hv01.corp.example"
