"""A small ECDSA P-256 PKI for development, demos and tests.

    from gateway.identity import pki
    written = pki.init_dev_pki(Path("certs/dev"))          # CA, server, demo clients
    ca = pki.load_pair(Path("certs/dev/ca.pem"), Path("certs/dev/ca.key"))
    odd = pki.issue_client(ca, uris=["spiffe://demo.local/a", "spiffe://demo.local/b"])
    odd.write(tmp / "odd.pem", tmp / "odd.key")

The certificates follow the X.509-SVID profile (spiffe/spiffe ``standards/X509-SVID.md``):
signing certificates have ``cA=true`` and ``keyCertSign``; leaves have ``cA=false``,
``digitalSignature`` only, and the URI SAN carrying the SPIFFE ID. Tests use the same
functions to mint deliberately odd leaves (two URI SANs, expired, foreign CA), so nothing
here validates the names it is given: the gateway's verifier is the one place that judges.

Files are written atomically (temporary file, fsync, rename, fsync of the directory) so a
server re-reading its certificate never sees half a file; private keys are mode 0600.
"""

from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway._atomic import private_dir, write_atomic
from gateway.errors import ConfigError

__all__ = [
    "DEMO_CLIENTS",
    "CertifiedKey",
    "create_ca",
    "init_dev_pki",
    "issue_client",
    "issue_server",
    "load_pair",
    "write_file",
]

#: The demo identities `gateway certs init` issues: file stem -> SPIFFE ID.
DEMO_CLIENTS: dict[str, str] = {
    "scorer": "spiffe://demo.local/svc/scorer",
    "intruder": "spiffe://demo.local/svc/intruder",
    "auditor": "spiffe://demo.local/team/audit/auditor",
    "admin": "spiffe://demo.local/team/security/admin",
}

#: Host names and addresses the development server certificate is valid for.
SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

# Backdating absorbs small clock differences between the minting and the verifying host.
_BACKDATE = _dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate with its private key (a CA, a server or a client)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        # Unencrypted PKCS#8: gRPC reads it as is; protection is the 0600 file mode.
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the key (0600) first, then the certificate, each atomically."""
        write_file(key_path, self.key_pem(), private=True)
        write_file(cert_path, self.cert_pem())


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _window(
    not_before: _dt.datetime | None, not_after: _dt.datetime | None, days: int
) -> tuple[_dt.datetime, _dt.datetime]:
    start = not_before if not_before is not None else _now() - _BACKDATE
    end = not_after if not_after is not None else start + _dt.timedelta(days=days)
    if end <= start:
        raise ValueError(f"validity window is empty: not_after {end} <= not_before {start}")
    return start, end


def _name(cn: str | None, org: str = "gateway demo") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _leaf_key_usage() -> x509.KeyUsage:
    # X509-SVID 4.3: leaves set digitalSignature and never keyCertSign/cRLSign.
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False,
        crl_sign=False, encipher_only=False, decipher_only=False,
    )


def create_ca(
    name: str = "gateway development CA",
    *,
    days: int = 3650,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    issuer: CertifiedKey | None = None,
) -> CertifiedKey:
    """A new signing certificate: self-signed, or an intermediate when ``issuer`` is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(not_before, not_after, days)
    subject = _name(name)
    signer_cert = issuer.cert if issuer else None
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None
                                             else 0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    if signer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False)
    return CertifiedKey(builder.sign(signer_key, hashes.SHA256()), key)


def _leaf_builder(
    ca: CertifiedKey, key: ec.EllipticCurvePrivateKey, subject: x509.Name,
    start: _dt.datetime, end: _dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
    )


def issue_server(
    ca: CertifiedKey,
    *,
    hosts: Iterable[str] = SERVER_HOSTS,
    cn: str = "localhost",
    days: int = 825,
) -> CertifiedKey:
    """A TLS server certificate for ``hosts`` (DNS names and IP addresses as SANs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(None, None, days)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        _leaf_builder(ca, key, _name(cn), start, end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return CertifiedKey(cert, key)


def issue_client(
    ca: CertifiedKey,
    *,
    uris: Sequence[str] = (),
    cn: str | None = None,
    days: int = 365,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
) -> CertifiedKey:
    """A client certificate with any URI SANs (none, one SPIFFE ID, or odd ones for tests).

    With no URIs the certificate carries only the subject CN (the ``cn:<name>`` case).
    """
    if not uris and not cn:
        raise ValueError("a client certificate needs a URI SAN or a common name")
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(not_before, not_after, days)
    subject = _name(cn)
    builder = _leaf_builder(ca, key, subject, start, end)
    if uris:
        # X509-SVID 3.1: the URI SAN must be critical when the subject is empty; ours
        # always has an O attribute, so non-critical is correct.
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False)
    # X509-SVID 4.4: when EKU is present, serverAuth and clientAuth are both set.
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return CertifiedKey(builder.sign(ca.key, hashes.SHA256()), key)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Atomically replace ``path`` with ``data`` (mode 0600 if ``private``, else 0644)."""
    path = Path(path)
    private_dir(path.parent)
    write_atomic(path, data, mode=0o600 if private else 0o644)


def load_pair(cert_path: Path, key_path: Path) -> CertifiedKey:
    """Read a certificate and its EC private key; ConfigError names the file at fault."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{cert_path}: cannot read certificate: {err}") from err
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{key_path}: cannot read private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an EC private key")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} does not belong to the certificate in {cert_path}")
    return CertifiedKey(cert, key)


def _still_good(cert_path: Path, key_path: Path, ca: x509.Certificate) -> bool:
    """True if the existing leaf pair is readable, issued by ``ca`` and not expired."""
    try:
        pair = load_pair(cert_path, key_path)
        pair.cert.verify_directly_issued_by(ca)
    except (ConfigError, ValueError, TypeError, InvalidSignature):
        return False
    return pair.cert.not_valid_after_utc > _now()


def init_dev_pki(directory: Path, *, force: bool = False) -> dict:
    """Write the development PKI into ``directory``; keep what is already there and valid.

    Layout: ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (for localhost, 127.0.0.1
    and ::1), and ``clients/<name>.pem|.key`` for each of :data:`DEMO_CLIENTS`.

    Idempotent: an existing CA is reused; an existing leaf is kept if it still chains to
    that CA and has not expired, and re-issued otherwise (so the set stays consistent).
    ``force`` replaces everything with a new CA.

    Returns ``{"directory", "ca", "server", "clients": {name: path}, "written": [paths],
    "kept": [paths]}``.
    """
    directory = Path(directory)
    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    written: list[Path] = []
    kept: list[Path] = []
    if not force and ca_pem.exists():
        if not ca_key.exists():
            raise ConfigError(f"{ca_pem} exists but {ca_key} does not; cannot issue "
                              f"certificates from it (use --force to start a new CA)")
        try:
            ca = load_pair(ca_pem, ca_key)
        except ConfigError as err:
            raise ConfigError(f"{err} (use --force to start a new CA)") from None
        if ca.cert.not_valid_after_utc <= _now():
            raise ConfigError(f"the CA in {ca_pem} has expired; use --force to start a new "
                              f"CA (every client then needs its new certificate)")
        kept.append(ca_pem)
    else:
        ca = create_ca()
        ca.write(ca_pem, ca_key)
        written.append(ca_pem)

    def leaf(stem: Path, make: Callable[[], CertifiedKey]) -> Path:
        cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
        if not force and _still_good(cert_path, key_path, ca.cert):
            kept.append(cert_path)
        else:
            make().write(cert_path, key_path)
            written.append(cert_path)
        return cert_path

    server = leaf(directory / "server", lambda: issue_server(ca))
    clients = {
        name: leaf(directory / "clients" / name,
                   functools.partial(issue_client, ca, uris=[uri], cn=name))
        for name, uri in DEMO_CLIENTS.items()
    }
    return {"directory": directory, "ca": ca_pem, "server": server, "clients": clients,
            "written": written, "kept": kept}
