"""Caller authentication on every RPC, with parsed certificates cached by their PEM bytes."""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

from gateway.errors import Unauthenticated
from gateway.identity._bundles import TrustBundles
from gateway.identity._identity import Identity
from gateway.identity._x509 import identity_from_pem, normalise_issuers, normalise_trust_domains

# gRPC core's auth-context properties: the peer's leaf certificate and its presented chain (PEM).
_PEM_PROPERTY = "x509_pem_cert"
_CHAIN_PROPERTY = "x509_pem_cert_chain"


class IdentityVerifier:
    """Turns the verified peer certificate of a call into an :class:`Identity`.

        verifier = IdentityVerifier(["demo.local"], cn_issuers=["CN=Legacy CA,O=Example"])
        identity = verifier.authenticate(context)       # or raises Unauthenticated

    Parsing X.509 costs tens of microseconds and one client sends the same certificate on
    every call, so results (refusals too) are kept in an LRU cache keyed by the PEM bytes:
    the hot path is a dict lookup plus an expiry check. The expiry check is repeated per
    call because a long-lived connection can outlive the certificate its handshake saw.

    ``trust_bundles`` maps trust domains to their own CA bundle files (SPIFFE trust-bundle
    semantics): those domains are accepted too, and an ID in one of them must chain to its
    bundle, whichever configured CA the TLS handshake accepted it under.
    """

    def __init__(
        self,
        trust_domains: Iterable[str],
        cn_issuers: Iterable[str] = (),
        *,
        cache_size: int = 4096,
        trust_bundles: Mapping[str, Path] | None = None,
    ) -> None:
        self._bundles = TrustBundles(trust_bundles) if trust_bundles else None
        self._trust_domains = normalise_trust_domains(trust_domains) | (
            self._bundles.domains if self._bundles else frozenset())
        self._generation = self._bundles.generation if self._bundles else 0
        self._cn_issuers = normalise_issuers(cn_issuers)
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._cache_size = cache_size
        # PEM bytes -> Identity, or the refusal message (str) for a refused certificate.
        self._cache: OrderedDict[bytes, Identity | str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def trust_domains(self) -> frozenset[str]:
        return self._trust_domains

    @property
    def cn_issuers(self) -> frozenset[str]:
        return self._cn_issuers

    @property
    def bundle_files(self) -> list[Path]:
        """The per-domain bundle files (the TLS root set must hold them too)."""
        return self._bundles.root_pems() if self._bundles else []

    def authenticate(self, context: grpc.ServicerContext) -> Identity:
        """The caller of this RPC; Unauthenticated (with the reason) if it has none valid."""
        auth = _auth_properties(context)
        pems = auth.get(_PEM_PROPERTY)
        if not pems:
            raise Unauthenticated("no client certificate: the gateway accepts only mutual "
                                  "TLS callers")
        chain = auth.get(_CHAIN_PROPERTY) if self._bundles is not None else None
        return self.verify_pem(pems[0], chain[0] if chain else b"")

    def presented_pem(self, context: grpc.ServicerContext) -> bytes:
        """The PEM certificate the caller presented, accepted as an identity or not
        (b"" without one): the key limits count a client by."""
        pems = _auth_properties(context).get(_PEM_PROPERTY)
        return pems[0] if pems else b""

    def presented_sha256(self, context: grpc.ServicerContext) -> str | None:
        """Hex SHA-256 of the DER certificate the caller presented (None: no certificate);
        names a refused certificate, which has no identity, in records and limits."""
        pem = self.presented_pem(context)
        if not pem:
            return None
        try:
            der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return hashlib.sha256(pem).hexdigest()
        return hashlib.sha256(der).hexdigest()

    def verify_pem(self, pem: bytes, chain: bytes = b"") -> Identity:
        """Judge a PEM leaf certificate whose chain the TLS layer has already verified.

        ``chain`` (the presented chain, leaf first) is only needed for a leaf issued by an
        intermediate of a per-domain trust bundle.
        """
        cache = self._cache
        if self._bundles is not None and self._bundles.refresh() != self._generation:
            with self._lock:
                self._generation = self._bundles.generation
                cache.clear()  # verdicts reached under the old bundles are void
        entry = cache.get(pem)
        if entry is None:
            entry = self._parse(pem, chain)
        else:
            try:
                cache.move_to_end(pem)
            except KeyError:  # evicted by another thread meanwhile; harmless
                pass
        if isinstance(entry, str):
            raise Unauthenticated(entry)
        if entry.not_after <= time.time():
            raise Unauthenticated(f"client certificate expired at {entry.not_after} "
                                  f"(Unix time); this connection outlived it")
        return entry

    def _parse(self, pem: bytes, chain: bytes) -> Identity | str:
        try:
            entry: Identity | str = identity_from_pem(pem, self._trust_domains,
                                                      self._cn_issuers, self._bundles, chain)
        except Unauthenticated as err:
            entry = str(err)
        with self._lock:
            self._cache[pem] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry

    def cache_len(self) -> int:
        """Number of certificates cached (for tests and monitoring)."""
        return len(self._cache)


def _auth_properties(context: grpc.ServicerContext) -> Mapping[str, Sequence[bytes]]:
    """The TLS auth context: each property maps to a list of values (one PEM, one chain)."""
    # The grpc stub types each property as one bytes value; gRPC returns a list of them.
    return context.auth_context()  # type: ignore[return-value]
