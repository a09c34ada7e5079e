"""The cluster's certificate authority, host certificates and TLS contexts of the SC channel.

One CA per cluster signs one certificate per hypervisor host: CN = host name, SAN = DNS:host
plus the host's management addresses, EC P-256 keys, usable as TLS server and client.
Agents trust only that CA, speak only TLS 1.3 and always require the peer's certificate.

Revocation is a plain text file next to the CA (`revoked.txt`: one hexadecimal serial
number per line, `#` comments) that the channel reads for every new connection, so a
revocation takes effect without restarting an agent. On a real cluster that file is
distributed with the CA certificate.

Layout: the CA directory holds `ca.pem`, `ca-key.pem` (mode 0600) and `revoked.txt`; a
host directory holds `<host>.pem`, `<host>-key.pem` (mode 0600) and a copy of `ca.pem`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
REVOKED_FILE = "revoked.txt"
CA_VALID_DAYS = 3650
# Tolerated clock difference between the issuing machine and the hosts.
CLOCK_SKEW = dt.timedelta(minutes=5)
# The agent's host-name rule (AgentConfig.host): also a valid DNS label for the SAN check.
HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PkiError(Exception):
    """A CA, certificate, key or revocation list that cannot be created or used; one line."""


@dataclass(frozen=True)
class HostCredentials:
    """What an agent needs for the SC channel: its certificate and key, the CA to trust."""
    host: str
    cert_path: Path
    key_path: Path
    ca_path: Path
    revoked_path: Path | None = None


@dataclass(frozen=True)
class CertAuthority:
    directory: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY_FILE

    @property
    def revoked_path(self) -> Path:
        return self.directory / REVOKED_FILE

    @classmethod
    def load(cls, directory: Path) -> CertAuthority:
        try:
            certificate = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
            key = serialization.load_pem_private_key(
                (directory / CA_KEY_FILE).read_bytes(), password=None)
        except OSError as exc:
            raise PkiError(f"cannot read the CA in {directory}: {exc.strerror}") from None
        except ValueError as exc:
            raise PkiError(f"the CA in {directory} is damaged: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"the CA key in {directory} is not an EC key")
        if key.public_key() != certificate.public_key():
            raise PkiError(f"the CA key in {directory} does not match its certificate")
        return cls(directory, certificate, key)

    def revoke(self, certificate: x509.Certificate | Path | int) -> int:
        """Add a certificate (object, PEM file or serial number) to the revocation list."""
        if isinstance(certificate, Path):
            certificate = read_certificate(certificate)
        serial = certificate if isinstance(certificate, int) else certificate.serial_number
        revoked = load_revoked(self.revoked_path) | {serial}
        _write_atomically(self.revoked_path, _revoked_text(revoked).encode(), 0o644)
        return serial


def read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from None


def load_revoked(path: Path) -> frozenset[int]:
    """The serial numbers in a revocation list file; a missing or bad file is an error."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PkiError(f"cannot read revocation list {path}: {exc}") from None
    serials = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            serials.add(int(text, 16))
        except ValueError:
            raise PkiError(f"{path}:{number}: not a hexadecimal serial number") from None
    return frozenset(serials)


def _revoked_text(serials: Iterable[int]) -> str:
    lines = [f"{serial:X}" for serial in sorted(serials)]
    return "# revoked SC channel certificates: one hexadecimal serial per line\n" + "".join(
        f"{line}\n" for line in lines)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file, so a reader never sees half a file or a wider mode."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(directory: Path, name: str = "nseh cluster CA",
              valid_days: int = CA_VALID_DAYS) -> CertAuthority:
    """A new CA in `directory`; refuses to replace an existing one."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    ca = CertAuthority(directory, certificate, key)
    try:
        # O_EXCL: never overwrite another CA's key.
        fd = os.open(ca.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"{directory} already holds a CA ({ca.key_path} exists)") from None
    with os.fdopen(fd, "wb") as file:
        file.write(_private_pem(key))
    _write_atomically(ca.cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_atomically(ca.revoked_path, _revoked_text(()).encode(), 0o644)
    return ca


def issue_host_certificate(ca: CertAuthority, host: str, addresses: Iterable[IPAddress | str],
                           directory: Path, valid_days: int = 365,
                           not_before: dt.datetime | None = None,
                           not_after: dt.datetime | None = None) -> HostCredentials:
    """Key and certificate for `host` in `directory` (replacing older ones), plus the CA."""
    if not HOST_NAME.fullmatch(host):
        raise PkiError(f"invalid host name {host!r} (expected {HOST_NAME.pattern})")
    try:
        ips = [ipaddress.ip_address(address) for address in addresses]
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    now = _now()
    not_before = not_before or now - CLOCK_SKEW
    not_after = not_after or now + dt.timedelta(days=valid_days)
    if not_after <= not_before:
        raise PkiError(f"certificate for {host} would expire ({not_after}) before it is "
                       f"valid ({not_before})")
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key_id = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        # Agents are TLS servers (destination) and clients (source) of the SC channel.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(host), *map(x509.IPAddress, ips)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_key_id.value), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = HostCredentials(host, cert_path=directory / f"{host}.pem",
                            key_path=directory / f"{host}-key.pem",
                            ca_path=directory / CA_CERT_FILE, revoked_path=ca.revoked_path)
    ca_pem = ca.certificate.public_bytes(serialization.Encoding.PEM)
    if creds.ca_path.exists() and creds.ca_path.read_bytes() != ca_pem:
        raise PkiError(f"{creds.ca_path} holds another CA's certificate")
    _write_atomically(creds.key_path, _private_pem(key), 0o600)
    _write_atomically(creds.cert_path, certificate.public_bytes(serialization.Encoding.PEM),
                      0o644)
    if not creds.ca_path.exists():
        _write_atomically(creds.ca_path, ca_pem, 0o644)
    return creds


def _context(creds: HostCredentials, server_side: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        # Only the cluster CA: no system trust store is ever loaded.
        context.load_verify_locations(cafile=creds.ca_path)
        context.load_cert_chain(creds.cert_path, creds.key_path)
    except OSError as exc:  # ssl.SSLError included
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise PkiError(f"cannot load the SC credentials of {creds.host}: {reason}") from None
    return context


def server_context(creds: HostCredentials) -> ssl.SSLContext:
    """TLS 1.3 server context that requires a client certificate from the cluster CA."""
    context = _context(creds, server_side=True)
    # No session tickets: every channel is a full handshake with a checked client certificate.
    context.num_tickets = 0
    return context


def client_context(creds: HostCredentials) -> ssl.SSLContext:
    """TLS 1.3 client context; the server's certificate must name the expected host (SAN)."""
    context = _context(creds, server_side=False)
    context.check_hostname = True
    return context


def check_not_revoked(creds: HostCredentials, serial: int) -> None:
    """Raise PkiError if the CA revoked `serial`. The list is read for every connection, so
    a revocation needs no agent restart; a missing or unreadable list refuses everyone."""
    if creds.revoked_path is not None and serial in load_revoked(creds.revoked_path):
        raise PkiError(f"certificate serial {serial:X} is revoked")


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, int]:
    """(common name, serial number) of the verified peer certificate of a TLS connection."""
    certificate: dict[str, Any] | None = ssl_object.getpeercert()
    if not certificate:
        raise PkiError("the peer presented no verified certificate")
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    if len(names) != 1:
        raise PkiError(f"the peer certificate has {len(names)} common names, expected 1")
    return names[0], int(certificate["serialNumber"], 16)
