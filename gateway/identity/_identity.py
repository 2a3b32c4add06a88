"""The authenticated caller, as every later stage (policy, audit) sees it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, proven by a client certificate the TLS handshake verified.

    ``id`` is the policy subject: the SPIFFE ID (``spiffe://demo.local/svc/scorer``) or,
    for a CN-only certificate from an issuer configured to allow it, ``cn:<name>``.
    The certificate fields let the audit log pin the exact credential that was used.
    """

    #: Policy subject: a SPIFFE ID or ``cn:<name>``.
    id: str
    #: SPIFFE trust domain ("" for ``cn:`` identities).
    trust_domain: str
    #: SPIFFE path segments, e.g. ("svc", "scorer") (empty for ``cn:`` identities).
    path: tuple[str, ...]
    #: Hex SHA-256 of the DER client certificate.
    cert_sha256: str
    #: Issuer distinguished name, RFC 4514 string.
    issuer: str
    #: Certificate serial number, lower-case hex.
    serial: str
    #: End of the certificate's validity, Unix seconds.
    not_after: int

    def attributes(self) -> dict[str, object]:
        """ABAC attributes of the caller, keyed the way policies refer to them."""
        return {
            "caller.id": self.id,
            "caller.trust_domain": self.trust_domain,
            "caller.path": "/" + "/".join(self.path) if self.path else "",
            "caller.issuer": self.issuer,
            "caller.serial": self.serial,
            "caller.cert_sha256": self.cert_sha256,
        }
