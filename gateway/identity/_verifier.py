"""Caller authentication on every RPC, with parsed certificates cached by their PEM bytes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

import grpc

from gateway.errors import Unauthenticated
from gateway.identity._identity import Identity
from gateway.identity._x509 import identity_from_pem, normalise_issuers, normalise_trust_domains

# gRPC core's auth-context property holding the peer's leaf certificate (PEM).
_PEM_PROPERTY = "x509_pem_cert"


class IdentityVerifier:
    """Turns the verified peer certificate of a call into an :class:`Identity`.

        verifier = IdentityVerifier(["demo.local"], cn_issuers=["CN=Legacy CA,O=Example"])
        identity = verifier.authenticate(context)       # or raises Unauthenticated

    Parsing X.509 costs tens of microseconds and one client sends the same certificate on
    every call, so results (refusals too) are kept in an LRU cache keyed by the PEM bytes:
    the hot path is a dict lookup plus an expiry check. The expiry check is repeated per
    call because a long-lived connection can outlive the certificate its handshake saw.
    """

    def __init__(
        self,
        trust_domains: Iterable[str],
        cn_issuers: Iterable[str] = (),
        *,
        cache_size: int = 4096,
    ) -> None:
        self._trust_domains = normalise_trust_domains(trust_domains)
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

    def authenticate(self, context: grpc.ServicerContext) -> Identity:
        """The caller of this RPC; Unauthenticated (with the reason) if it has none valid."""
        pems = context.auth_context().get(_PEM_PROPERTY)
        if not pems:
            raise Unauthenticated("no client certificate: the gateway accepts only mutual "
                                  "TLS callers")
        return self.verify_pem(pems[0])

    def verify_pem(self, pem: bytes) -> Identity:
        """Judge a PEM leaf certificate whose chain the TLS layer has already verified."""
        cache = self._cache
        entry = cache.get(pem)
        if entry is None:
            entry = self._parse(pem)
        else:
            try:
                cache.move_to_end(pem)
            except KeyError:  # evicted by another thread meanwhile; harmless
                pass
        if type(entry) is str:
            raise Unauthenticated(entry)
        if entry.not_after <= time.time():
            raise Unauthenticated(f"client certificate expired at {entry.not_after} "
                                  f"(Unix time); this connection outlived it")
        return entry

    def _parse(self, pem: bytes) -> Identity | str:
        try:
            entry: Identity | str = identity_from_pem(pem, self._trust_domains,
                                                      self._cn_issuers)
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
