"""From a verified client certificate to an :class:`Identity`, per X509-SVID.md section 5.2.

The TLS handshake has already done RFC 5280 path validation against the configured CA
bundle (validity window included); this module applies the SPIFFE leaf rules on top:
the certificate is a leaf (``cA`` false, no ``keyCertSign``/``cRLSign``), it carries exactly
one URI SAN, and that URI is a valid SPIFFE ID in an allowed trust domain. A certificate
without any URI SAN may instead map to ``cn:<CN>``, but only if its issuer is one the
operator listed in ``[tls] cn_issuers``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gateway.errors import ConfigError, Unauthenticated
from gateway.identity._identity import Identity
from gateway.identity._spiffe import SpiffeIdError, check_trust_domain, parse_spiffe_id

if TYPE_CHECKING:
    from gateway.identity._bundles import TrustBundles

# A CN that becomes a policy subject: printable, no separators that policy files, audit
# records or log lines could misread (',', ':', '/', quotes, control characters).
# RFC 5280 bounds commonName at 64 characters (ub-common-name).
_CN_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._@ -]{0,62}[A-Za-z0-9._@-])?")


def normalise_trust_domains(names: Iterable[str]) -> frozenset[str]:
    """Validate the configured trust domains; a bad one is a ConfigError naming it."""
    out = set()
    for name in names:
        try:
            out.add(check_trust_domain(name))
        except SpiffeIdError as err:
            raise ConfigError(f"[tls] trust_domains: {err}") from None
    return frozenset(out)


def normalise_issuers(names: Iterable[str]) -> frozenset[str]:
    """Parse the configured issuer DNs and re-print them the way cryptography prints a
    certificate's issuer, so equivalent spellings (optional escapes) match."""
    out = set()
    for name in names:
        try:
            out.add(x509.Name.from_rfc4514_string(name).rfc4514_string())
        except ValueError as err:
            raise ConfigError(
                f"[tls] cn_issuers: {name!r} is not an RFC 4514 distinguished name "
                f"({err or 'syntax error'}); write it as `openssl x509 -noout -issuer "
                f"-nameopt RFC2253` prints it, e.g. 'CN=Legacy CA,O=Example' "
                f"(no space after commas)") from None
    return frozenset(out)


def identity_from_pem(
    pem: bytes, trust_domains: frozenset[str], cn_issuers: frozenset[str],
    bundles: TrustBundles | None = None, chain: bytes = b"",
) -> Identity:
    """Parse and judge one PEM client certificate; Unauthenticated says why it is refused.

    With ``bundles``, a SPIFFE ID in a domain that has its own bundle must chain to it
    (``chain``: the PEM certificates the client presented, leaf first).
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise Unauthenticated(f"client certificate cannot be parsed: {err}") from None
    try:
        _check_leaf(cert)
        uris = _uri_sans(cert)
    except ValueError as err:  # malformed extensions surface lazily, here
        raise Unauthenticated(f"client certificate extensions cannot be parsed: "
                              f"{err}") from None
    issuer = cert.issuer.rfc4514_string()
    identity = functools.partial(
        Identity,
        cert_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        issuer=issuer,
        serial=f"{cert.serial_number:x}",
        not_after=int(cert.not_valid_after_utc.timestamp()),
    )
    if len(uris) > 1:
        raise Unauthenticated(
            f"client certificate has {len(uris)} URI SANs ({', '.join(uris)}); "
            f"a SPIFFE identity needs exactly one")
    if uris:
        try:
            trust_domain, path = parse_spiffe_id(uris[0])
        except SpiffeIdError as err:
            raise Unauthenticated(f"client certificate URI SAN is not a valid SPIFFE ID: "
                                  f"{err}") from None
        if trust_domain not in trust_domains:
            allowed = ", ".join(sorted(trust_domains)) or "none"
            raise Unauthenticated(f"client certificate SPIFFE ID {uris[0]!r} is in trust "
                                  f"domain {trust_domain!r}, which is not accepted "
                                  f"(accepted: {allowed})")
        if bundles is not None:
            bundles.check(trust_domain, cert, _intermediates(chain))
        return identity(id=uris[0], trust_domain=trust_domain, path=path)
    return identity(id=f"cn:{_common_name(cert, issuer, cn_issuers)}", trust_domain="",
                    path=())


def _intermediates(chain: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(chain)[1:] if chain else []
    except ValueError:
        return []


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sans.get_values_for_type(x509.UniformResourceIdentifier)


def _check_leaf(cert: x509.Certificate) -> None:
    """X509-SVID 5.2: a signing certificate must never authenticate a caller."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise Unauthenticated("client certificate is a CA certificate (cA=true), "
                                  "not a leaf")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if usage.key_cert_sign or usage.crl_sign:
        raise Unauthenticated("client certificate has keyCertSign/cRLSign key usage; "
                              "a signing certificate cannot identify a caller")


def _common_name(cert: x509.Certificate, issuer: str, cn_issuers: frozenset[str]) -> str:
    if issuer not in cn_issuers:
        raise Unauthenticated(
            f"client certificate has no URI SAN (SPIFFE ID), and its issuer {issuer!r} "
            f"is not configured to vouch for common names ([tls] cn_issuers)")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise Unauthenticated(f"client certificate has no URI SAN and {len(names)} "
                              f"common names; a cn: identity needs exactly one")
    cn = names[0].value
    if not isinstance(cn, str) or not _CN_RE.fullmatch(cn):
        raise Unauthenticated(f"client certificate common name {cn!r} is not usable as an "
                              f"identity (1-64 of [A-Za-z0-9._@ -], no leading/trailing "
                              f"space)")
    return cn
