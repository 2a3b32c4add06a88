"""SPIFFE trust bundles: each trust domain's identities must chain to that domain's own CAs.

The TLS handshake verifies a client certificate against the union of every configured CA
(gRPC takes one root set). That alone would let any of those CAs mint identities in any
accepted trust domain, which X509-SVID.md section 5 forbids: a SPIFFE ID is only as good as
the trust bundle *of the domain it names*. :class:`TrustBundles` makes that second check,
with ``cryptography``'s RFC 5280 path builder over the domain's own bundle.

Bundle files are re-read when they change (checked at most once a second); ``generation``
moves on every change, so callers caching verdicts know to drop them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import (
    ClientVerifier,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.errors import ConfigError, Unauthenticated
from gateway.identity._x509 import normalise_trust_domains

log = logging.getLogger("gateway.identity")

#: Seconds between checks of the bundle files for changes.
_RECHECK_S = 1.0


class TrustBundles:
    """Trust domain -> its CA bundle file; :meth:`check` judges a leaf against its domain."""

    def __init__(self, bundles: Mapping[str, Path]) -> None:
        normalise_trust_domains(bundles)  # ConfigError names a bad domain
        self._paths = {domain: Path(path) for domain, path in bundles.items()}
        self._lock = threading.Lock()
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._verifiers: dict[str, ClientVerifier] = {}
        #: Moves on at every (re)load; verdicts cached under another generation are stale.
        self.generation = 0
        self._checked = 0.0
        for domain in self._paths:
            self._load(domain, initial=True)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._paths)

    def _load(self, domain: str, *, initial: bool = False) -> None:
        path = self._paths[domain]
        try:
            stat = os.stat(path)
            certs = x509.load_pem_x509_certificates(path.read_bytes())
            store = Store(certs)
        except (OSError, ValueError) as err:
            if initial:
                raise ConfigError(f"[tls] trust_bundles {domain}: cannot read {path}: "
                                  f"{err}") from None
            log.error("trust bundle of %s not reloaded, keeping the last good one: %s",
                      domain, err)
            return
        self._verifiers[domain] = PolicyBuilder().store(store).build_client_verifier()
        self._stats[domain] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        self.generation += 1

    def refresh(self) -> int:
        """Re-read changed bundle files (at most once a second); returns ``generation``."""
        now = time.monotonic()
        if now - self._checked < _RECHECK_S:
            return self.generation
        with self._lock:
            self._checked = now
            for domain, path in self._paths.items():
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                if (stat.st_ino, stat.st_size, stat.st_mtime_ns) != self._stats.get(domain):
                    self._load(domain)
        return self.generation

    def root_pems(self) -> list[Path]:
        """The bundle files, for the TLS layer's root set."""
        return list(self._paths.values())

    def check(self, domain: str, leaf: x509.Certificate,
              intermediates: Sequence[x509.Certificate] = ()) -> None:
        """Raise Unauthenticated unless ``leaf`` chains to ``domain``'s bundle (if it has one)."""
        verifier = self._verifiers.get(domain)
        if verifier is None:
            return
        try:
            verifier.verify(leaf, list(intermediates))
        except VerificationError as err:
            raise Unauthenticated(
                f"client certificate names trust domain {domain!r} but does not chain to "
                f"that domain's trust bundle ({err}); another domain's CA cannot vouch for "
                f"it") from None
