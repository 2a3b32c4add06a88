"""Leased token batches: a member takes several tokens of a shared bucket at once and spends
them locally, so most quota checks cost no round trip to the hub or the database.

The bound (also in the package docstring): every token spent was first taken out of the shared
bucket, which refills at ``rate`` up to ``burst``; so over any interval ``t`` all members
together admit at most ``burst + rate * t``, exactly as one bucket would. The approximation is
on the other side only: while other members hold leased tokens they have not spent, a call can
be refused that one exact bucket would have admitted. At most ``lease_tokens`` tokens (or the
size of the last call, if larger) idle in each member, and an unspent lease goes back within
``lease_seconds``; so at most ``(members - 1) * lease_tokens`` early refusals per key at a time.
A member the shared bucket refused refuses that key locally until the bucket could have
refilled what it asked for (at most ``lease_seconds``), so a refused caller's flood costs no
round trip per call; only tokens another member gives back meanwhile wait that long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from gateway.errors import StateUnavailable

log = logging.getLogger("gateway.state")


class BucketStore(Protocol):
    """The shared side of leased buckets (the hub's, or the database's)."""

    def lease(self, key: str, rate: float, burst: int, need: int,
              want: int) -> tuple[int, float]:
        """Up to ``want`` tokens if ``need`` are there, else 0; and the tokens left.
        Raises StateUnavailable when it cannot answer."""
        ...

    def release(self, key: str, rate: float, burst: int, n: int) -> None:
        """Put ``n`` unspent tokens back."""
        ...


class LeasedBuckets:
    """:class:`~gateway.state.Buckets` over a shared :class:`BucketStore`, leased in batches."""

    def __init__(self, store: BucketStore, *, lease_tokens: int, lease_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._k = lease_tokens
        self._ttl = lease_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [tokens held, leased at, rate, burst, no new lease before]
        self._held: dict[str, list[float]] = {}
        self._shared: dict[str, float] = {}  # key -> tokens the store had left, last we saw
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None

    def take(self, key: str, rate: float, burst: int, n: int = 1) -> bool:
        with self._lock:
            h = self._held.get(key)
            if h is not None and h[2] == rate and h[3] == burst:
                if h[0] >= n:
                    h[0] -= n
                    return True
                if self._clock() < h[4]:
                    return False  # the shared bucket said no moments ago: no round trip
                have = int(h[0])
            else:
                have = 0  # a changed rule: what was held under the old one is dropped
        need = n - have
        try:
            granted, left = self._store.lease(key, rate, burst, need, max(need, self._k))
        except StateUnavailable:
            self.drop_all()  # fail closed: hold nothing we can no longer account for
            raise
        with self._lock:
            h = self._held.get(key)
            if h is None or h[2] != rate or h[3] != burst:
                h = self._held[key] = [0.0, 0.0, rate, burst, 0.0]
            h[0] += granted
            now = self._clock()
            if granted:
                h[1] = now
            else:  # refused: until the shared bucket could have refilled what we needed
                refill = (need - left) / rate if rate > 0 else self._ttl
                h[4] = now + min(self._ttl, max(0.0, refill))
            self._shared[key] = left
            if len(self._shared) > 100_000:
                self._shared.clear()
            ok = h[0] >= n
            if ok:
                h[0] -= n
        if granted and self._sweeper is None:
            self._start_sweeper()
        return ok

    def give_back(self, key: str, rate: float, burst: int, n: int) -> None:
        """Tokens taken but not spent stay here and are spent next or returned with the lease."""
        if n <= 0:
            return
        with self._lock:
            h = self._held.get(key)
            if h is not None and h[2] == rate and h[3] == burst:
                h[0] += n
                h[1] = self._clock()
                return
        self._store.release(key, rate, burst, n)

    def available(self, key: str, rate: float, burst: int) -> float:
        """Held here plus what the shared bucket had left when we last asked (for messages)."""
        with self._lock:
            h = self._held.get(key)
            held = h[0] if h is not None and h[2] == rate and h[3] == burst else 0.0
            return held + self._shared.get(key, float(burst))

    def drop_all(self) -> None:
        """Forget every lease (the shared state is gone or unreachable): tokens are lost,
        which only ever refuses more, never admits more."""
        with self._lock:
            self._held.clear()

    def _start_sweeper(self) -> None:
        with self._lock:
            if self._sweeper is not None:
                return
            self._sweeper = threading.Thread(target=self._sweep_loop, name="state-leases",
                                             daemon=True)
        self._sweeper.start()

    def _sweep_loop(self) -> None:
        while not self._closed.wait(self._ttl / 2):
            self.return_expired()

    def return_expired(self, *, everything: bool = False) -> int:
        """Give back leases not spent within ``lease_seconds``; returns the tokens returned."""
        now = self._clock()
        expired = []
        with self._lock:
            for key, h in list(self._held.items()):
                if h[0] >= 1 and (everything or now - h[1] >= self._ttl):
                    expired.append((key, h[2], int(h[3]), int(h[0])))
                    h[0] -= int(h[0])
                if h[0] <= 0 and (everything or now - h[1] >= self._ttl):
                    del self._held[key]
        for key, rate, burst, n in expired:
            try:
                self._store.release(key, rate, burst, n)
            except StateUnavailable as err:  # lost tokens only refuse more, never admit more
                log.warning("leased tokens of %s not returned: %s", key, err)
        return sum(e[3] for e in expired)

    def close(self) -> None:
        self._closed.set()
        self.return_expired(everything=True)
