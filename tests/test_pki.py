"""The cluster CA, host certificates, revocation list and TLS contexts."""

import datetime as dt
import ipaddress
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nseh.sc.pki import (
    CertAuthority,
    PkiError,
    client_context,
    create_ca,
    issue_host_certificate,
    load_revoked,
    peer_identity,
    read_certificate,
    server_context,
)

ADDRESSES = [ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1")]


@pytest.fixture
def ca(tmp_path):
    return create_ca(tmp_path / "ca")


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_ca_writes_a_self_signed_ca_and_a_private_key(ca):
    assert mode(ca.key_path) == 0o600
    assert mode(ca.directory) == 0o700
    cert = read_certificate(ca.cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "nseh cluster CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert load_revoked(ca.revoked_path) == frozenset()


def test_a_ca_loads_back_and_is_never_overwritten(ca):
    loaded = CertAuthority.load(ca.directory)
    assert loaded.certificate == ca.certificate
    assert loaded.key.private_numbers() == ca.key.private_numbers()
    with pytest.raises(PkiError, match="already holds a CA"):
        create_ca(ca.directory)
    assert CertAuthority.load(ca.directory).certificate == ca.certificate


def test_loading_a_missing_damaged_or_mismatched_ca_fails(tmp_path, ca):
    with pytest.raises(PkiError, match="cannot read the CA"):
        CertAuthority.load(tmp_path / "nowhere")
    other = create_ca(tmp_path / "other")
    ca.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(PkiError, match="does not match its certificate"):
        CertAuthority.load(ca.directory)
    ca.cert_path.write_text("not a certificate")
    with pytest.raises(PkiError, match="is damaged"):
        CertAuthority.load(ca.directory)


def test_host_certificate_names_the_host_and_its_addresses(tmp_path, ca):
    creds = issue_host_certificate(ca, "h1", ADDRESSES, tmp_path / "h1")
    cert = read_certificate(creds.cert_path)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "h1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["h1"]
    assert san.get_values_for_type(x509.IPAddress) == ADDRESSES
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=365, minutes=6)
    assert mode(creds.key_path) == 0o600
    assert creds.ca_path.read_bytes() == ca.cert_path.read_bytes()
    assert creds.revoked_path == ca.revoked_path


def test_host_certificate_validity_can_be_set_and_reissued(tmp_path, ca):
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    first = issue_host_certificate(ca, "h2", ["127.0.0.1"], tmp_path,
                                   not_before=start, not_after=start + dt.timedelta(days=1))
    cert = read_certificate(first.cert_path)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (
        start, start + dt.timedelta(days=1))
    again = issue_host_certificate(ca, "h2", ["127.0.0.1"], tmp_path)
    assert read_certificate(again.cert_path).serial_number != cert.serial_number


@pytest.mark.parametrize("host, addresses, reason", [
    ("H1", [], "invalid host name"),
    ("h1.example", [], "invalid host name"),
    ("", [], "invalid host name"),
    ("h1", ["10.0.0.300"], "does not appear to be an IPv4 or IPv6 address"),
])
def test_bad_host_certificate_requests_are_refused(tmp_path, ca, host, addresses, reason):
    with pytest.raises(PkiError, match=reason):
        issue_host_certificate(ca, host, addresses, tmp_path)


def test_a_certificate_cannot_end_before_it_starts(tmp_path, ca):
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(PkiError, match="would expire"):
        issue_host_certificate(ca, "h1", [], tmp_path, not_before=now, not_after=now)


def test_a_host_directory_never_mixes_two_cas(tmp_path, ca):
    issue_host_certificate(ca, "h1", [], tmp_path / "h")
    other = create_ca(tmp_path / "other")
    with pytest.raises(PkiError, match="holds another CA's certificate"):
        issue_host_certificate(other, "h2", [], tmp_path / "h")


def test_revocation_by_certificate_file_or_serial(tmp_path, ca):
    creds = issue_host_certificate(ca, "h1", [], tmp_path)
    serial = ca.revoke(creds.cert_path)
    assert serial == read_certificate(creds.cert_path).serial_number
    assert ca.revoke(0xABC) == 0xABC
    assert load_revoked(ca.revoked_path) == {serial, 0xABC}
    assert CertAuthority.load(ca.directory).revoke(0xABC) == 0xABC  # idempotent
    assert load_revoked(ca.revoked_path) == {serial, 0xABC}


def test_a_bad_or_missing_revocation_list_is_an_error(tmp_path):
    bad = tmp_path / "revoked.txt"
    bad.write_text("# comment\n\n1F  # trailing comment\nnot-hex\n")
    with pytest.raises(PkiError, match=r"revoked.txt:4: not a hexadecimal serial number"):
        load_revoked(bad)
    with pytest.raises(PkiError, match="cannot read revocation list"):
        load_revoked(tmp_path / "missing.txt")


def test_contexts_are_tls13_only_with_required_certificates(tmp_path, ca):
    creds = issue_host_certificate(ca, "h1", [], tmp_path)
    for context in (server_context(creds), client_context(creds)):
        assert context.minimum_version == context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.cert_store_stats()["x509_ca"] == 1  # the cluster CA, nothing else
    assert client_context(creds).check_hostname


def test_contexts_with_missing_files_fail_with_pki_error(tmp_path, ca):
    creds = issue_host_certificate(ca, "h1", [], tmp_path)
    creds.key_path.unlink()
    with pytest.raises(PkiError, match="cannot load the SC credentials of h1"):
        server_context(creds)


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject,
               client_out: ssl.MemoryBIO, client_in: ssl.MemoryBIO,
               server_out: ssl.MemoryBIO, server_in: ssl.MemoryBIO) -> None:
    """Pump a real TLS handshake between two in-memory endpoints."""
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            server_in.write(client_out.read())
            client_in.write(server_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_two_hosts_of_one_ca_complete_a_mutual_tls_handshake(tmp_path, ca):
    h1 = issue_host_certificate(ca, "h1", ["127.0.0.1"], tmp_path / "h1")
    h2 = issue_host_certificate(ca, "h2", ["127.0.0.1"], tmp_path / "h2")
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client_in, client_out, server_in, server_out = bios
    client = client_context(h1).wrap_bio(client_in, client_out, server_hostname="h2")
    server = server_context(h2).wrap_bio(server_in, server_out, server_side=True)
    _handshake(client, server, client_out, client_in, server_out, server_in)
    assert client.version() == server.version() == "TLSv1.3"
    assert peer_identity(server) == ("h1", read_certificate(h1.cert_path).serial_number)
    assert peer_identity(client) == ("h2", read_certificate(h2.cert_path).serial_number)
