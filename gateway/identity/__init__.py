"""Who is calling: mutual TLS and SPIFFE caller identity, the first stage of every request.

    from gateway.identity import IdentityVerifier, server_credentials
    creds = server_credentials(tls.cert, tls.key, tls.ca)      # client certs required
    server.add_secure_port(listen, creds)                      # there is no plaintext port
    verifier = IdentityVerifier(tls.trust_domains, tls.cn_issuers)
    identity = verifier.authenticate(context)                  # or raises Unauthenticated

An identity is the caller's SPIFFE ID (spiffe/spiffe ``standards/SPIFFE-ID.md`` and
``X509-SVID.md``): exactly one URI SAN, a lower-case trust domain on the allow-list, a clean
non-empty path. A certificate with no URI SAN maps to ``cn:<CN>`` only when its issuer is
listed in ``[tls] cn_issuers``. Everything else is UNAUTHENTICATED, with the reason. With
``[tls] trust_bundles`` each trust domain has its own CA bundle, and an ID in that domain
must chain to it (``IdentityVerifier(..., trust_bundles=...)``).

:mod:`gateway.identity.pki` mints the development PKI (``gateway certs init``).
The API defined here is stable; modules starting with ``_`` are not.
"""

from __future__ import annotations

from gateway.identity._identity import Identity
from gateway.identity._reload import https_client_auth, server_credentials
from gateway.identity._settings import TlsSettings
from gateway.identity._spiffe import SpiffeIdError, parse_spiffe_id
from gateway.identity._verifier import IdentityVerifier

__all__ = ["Identity", "IdentityVerifier", "SpiffeIdError", "TlsSettings", "https_client_auth",
           "parse_spiffe_id", "server_credentials"]
