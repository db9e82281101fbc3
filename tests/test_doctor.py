"""`diagnose` against the stand-in, and ConnectionSettings validation."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine import errors
from tests.standin import build, server, settings_for
from tests.standin.fixtures import Rig, addresses, rig, standin_sim  # noqa: F401 - pytest fixtures
from workflows import doctor
from workflows.backends import connection, simulated


def names(checks: list[doctor.Check]) -> list[str]:
    return [c.name for c in checks]


def test_all_checks_pass_against_the_stand_in(rig: Rig) -> None:  # noqa: F811
    """Over plain HTTP: tcp, authentication, module, cluster and jobs all pass."""
    checks = doctor.diagnose(rig.settings(), cluster="cluster1")
    assert names(checks) == ["tcp", "authentication", "module", "cluster", "jobs"]
    assert all(c.ok for c in checks), checks
    assert checks[3].detail == "cluster cluster1: 3 nodes, 12 VMs"


def test_failover_kind_checks_the_failover_module(rig: Rig) -> None:  # noqa: F811
    """kind='failover' probes Get-ClusterNode and reads the cluster through FailoverBackend."""
    options = {"node_addresses": addresses(rig)}
    checks = doctor.diagnose(
        rig.settings("hv01"), kind="failover", cluster="cluster1", options=options
    )
    assert names(checks) == ["tcp", "authentication", "module", "cluster"]
    assert all(c.ok for c in checks), checks


def test_wrong_password_is_reported_in_plain_words(rig: Rig) -> None:  # noqa: F811
    """A refused password stops at the authentication check with a plain message."""
    checks = doctor.diagnose(rig.settings(password="nope"), cluster="cluster1")
    assert names(checks) == ["tcp", "authentication"]
    assert checks[-1] == doctor.Check(
        "authentication", False, "the server rejected the username or password"
    )


def test_closed_port_is_reported_in_plain_words() -> None:
    """Nothing listening: the first check fails with 'connection refused' and nothing else runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = connection.ConnectionSettings(
        server="127.0.0.1", port=port, username="u", password="p", ssl=False, auth="ntlm"
    )
    checks = doctor.diagnose(settings)
    assert checks == [
        doctor.Check("tcp", False, f"cannot connect to 127.0.0.1:{port}: connection refused")
    ]


def test_missing_vmm_module_is_reported(rig: Rig) -> None:  # noqa: F811
    """Without the VMM module, the module check fails and the cluster is not tried."""
    rig.world.vmm_module = False
    checks = doctor.diagnose(rig.settings(), cluster="cluster1")
    assert names(checks)[-1] == "module" and not checks[-1].ok
    assert "VMM (virtualmachinemanager) PowerShell module is not available" in checks[-1].detail


def test_unknown_cluster_is_reported(rig: Rig) -> None:  # noqa: F811
    """A cluster the account cannot see fails the cluster check."""
    checks = doctor.diagnose(rig.settings(), cluster="elsewhere")
    assert not checks[-1].ok and checks[-1].detail.startswith("cannot read cluster elsewhere")


@pytest.fixture
def tls_standin(tmp_path: Path) -> Iterator[tuple[server.StandIn, Path]]:
    """A stand-in served over TLS with a self-signed certificate for 127.0.0.1."""
    cert_path, key_path = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    sim = simulated.SimulatedCluster.generate(tmp_path / "sim.json")
    standin, _ = build(sim, tls=context)
    yield standin, cert_path
    standin.stop()


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmm01.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_untrusted_certificate_is_reported_in_plain_words(
    tls_standin: tuple[server.StandIn, Path],
) -> None:
    """A self-signed certificate the client does not trust stops at the TLS check."""
    standin, _ = tls_standin
    settings = settings_for(standin, "vmm01", ssl=True, allow_insecure_basic=False)
    checks = doctor.diagnose(settings)
    assert names(checks) == ["tcp", "tls"]
    assert checks[-1].detail.startswith("certificate of 127.0.0.1 is not trusted: ")
    assert "self" in checks[-1].detail


def test_trusted_ca_bundle_passes_tls_and_basic_over_https(
    tls_standin: tuple[server.StandIn, Path],
) -> None:
    """With ca_bundle pointing at the certificate, TLS and Basic auth over HTTPS work."""
    standin, cert_path = tls_standin
    settings = settings_for(
        standin, "vmm01", ssl=True, allow_insecure_basic=False, ca_bundle=str(cert_path)
    )
    checks = doctor.diagnose(settings, cluster="cluster1")
    assert all(c.ok for c in checks), checks
    assert names(checks) == ["tcp", "tls", "authentication", "module", "cluster", "jobs"]


# -- ConnectionSettings ---------------------------------------------------------------------

BASE = {"server": "vmm01", "username": "CORP\\svc", "password_env": "NODEPATCH_VMM_PASSWORD"}
ENV = {"NODEPATCH_VMM_PASSWORD": "hunter2-secret"}


def test_settings_defaults_and_the_password_never_shows() -> None:
    """Defaults are TLS on 5986 with negotiate; the password is absent from repr and str."""
    s = connection.from_mapping(BASE, "backend.vmm", ENV)
    assert (s.ssl, s.effective_port, s.auth, s.cert_validation) == (True, 5986, "negotiate", True)
    assert s.password == "hunter2-secret"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)


def test_password_file_is_read(tmp_path: Path) -> None:
    """password_file is read, without its trailing newline."""
    secret = tmp_path / "pw"
    secret.write_text("from-file\n", encoding="utf-8")
    data = {"server": "vmm01", "username": "u", "password_file": str(secret), "ssl": False}
    s = connection.from_mapping(data, "backend.vmm", {})
    assert s.password == "from-file" and s.effective_port == 5985


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"password": "x"}, r"backend\.vmm\.password: .*use password_env .* or password_file"),
        ({"auth": "digest"}, r"backend\.vmm\.auth: must be one of negotiate, kerberos"),
        ({"colour": "red"}, r"backend\.vmm\.colour: unknown key"),
        ({"port": "5986"}, r"backend\.vmm\.port: must be an integer"),
        ({"ssl": "yes"}, r"backend\.vmm\.ssl: must be true or false"),
        ({"auth": "basic", "ssl": False}, r"backend\.vmm\.auth: basic is only allowed with ssl"),
        ({"encryption": "never"}, r"backend\.vmm\.allow_insecure_basic: test-only, refused"),
        ({"password_env": "NOPE"}, r"environment variable NOPE is not set"),
    ],
)
def test_bad_settings_name_the_key(extra: dict[str, object], message: str) -> None:
    """Every invalid setting raises ConfigError naming backend.vmm.<key>."""
    with pytest.raises(errors.ConfigError, match=message) as caught:
        connection.from_mapping({**BASE, **extra}, "backend.vmm", ENV)
    assert "hunter2" not in str(caught.value)


def test_insecure_basic_is_allowed_only_on_loopback() -> None:
    """encryption: never (test-only) is accepted for 127.0.0.1 with basic over HTTP."""
    data = {**BASE, "server": "127.0.0.1", "auth": "basic", "ssl": False, "encryption": "never"}
    s = connection.from_mapping(data, "backend.vmm", ENV)
    assert s.wsman_kwargs()["encryption"] == "never"
