"""``[tls]``: the server certificate and the rules client certificates are held to.

Read by :func:`gateway.config.load_config` and handed to the identity package; it lives here so
the package owns the meaning of its settings (and their checks) without importing the config
loader, which sits above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ConfigError


@dataclass(frozen=True)
class TlsSettings:
    """Server certificate and the client-certificate trust rules (re-read on change)."""

    cert: Path = Path("certs/dev/server.pem")
    key: Path = Path("certs/dev/server.key")
    #: CA bundle client certificates must chain to.
    ca: Path = Path("certs/dev/ca.pem")
    #: SPIFFE trust domains whose identities are accepted (lower case).
    trust_domains: tuple[str, ...] = ("demo.local",)
    #: Issuer distinguished names (RFC 4514) whose CN-only certificates map to ``cn:<name>``.
    cn_issuers: tuple[str, ...] = ()
    #: SPIFFE trust bundles: trust domain -> its own CA bundle file. A certificate whose
    #: SPIFFE ID names a domain listed here must chain to that domain's bundle (another
    #: domain's CA cannot mint its identities); listed domains are accepted. Domains only
    #: in ``trust_domains`` use ``ca``.
    trust_bundles: dict[str, Path] = field(default_factory=dict, hash=False)
    #: /metrics over TLS with this server certificate, requiring a client certificate that
    #: chains to ``ca``: "on", "off", or "auto" (on unless metrics listen on loopback).
    metrics_tls: str = "auto"

    def __post_init__(self) -> None:
        if self.metrics_tls not in ("auto", "on", "off"):
            raise ConfigError(f"[tls] metrics_tls must be auto, on or off, not "
                              f"{self.metrics_tls!r}")
        shared = sorted(set(self.trust_domains) - set(self.trust_bundles))
        if len(shared) > 1:
            raise ConfigError(
                f"[tls] trust domains {', '.join(shared)} would all be vouched for by any CA "
                f"in {self.ca.name}: map each to its own bundle in [tls] trust_bundles")
