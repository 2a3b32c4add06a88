"""The ``local`` backend: exact token buckets and a coordinator for this process alone."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from gateway.state._types import Applied, Handler


class LocalBuckets:
    """Exact token buckets in this process (thread-safe); ``clock`` is injectable for tests.

    A key's bucket starts full. When a key's rule (rate, burst) changes, the bucket keeps its
    tokens (capped at the new burst): a configuration change, or members configured apart
    during a rollout, never refill a bucket. At most ``max_keys`` buckets are kept (least
    recently used dropped first): a dropped key comes back with a full bucket.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max = max_keys
        self._lock = threading.Lock()
        # key -> [tokens, at, rate, burst]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def _level(self, key: str, rate: float, burst: int, now: float) -> list[float]:
        """The key's bucket refilled to ``now`` (created full); call with the lock held."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [float(burst), now, rate, float(burst)]
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return b
        self._buckets.move_to_end(key)
        # Refilled at the rate it had until now; then the rule of this call applies.
        b[0] = min(float(burst), b[0] + max(0.0, now - b[1]) * b[2])
        b[1], b[2], b[3] = now, rate, float(burst)
        return b

    def take(self, key: str, rate: float, burst: int, n: int = 1) -> bool:
        with self._lock:
            b = self._level(key, rate, burst, self._clock())
            if b[0] >= n:
                b[0] -= n
                return True
            return False

    def give_back(self, key: str, rate: float, burst: int, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            b = self._level(key, rate, burst, self._clock())
            b[0] = min(b[3], b[0] + n)

    def lease(self, key: str, rate: float, burst: int, need: int,
              want: int) -> tuple[int, float]:
        """Grant up to ``want`` whole tokens if at least ``need`` are there, else none.

        Returns (granted, tokens left): what the hub and the database do for leasing members.
        """
        with self._lock:
            b = self._level(key, rate, burst, self._clock())
            granted = min(want, int(b[0])) if b[0] >= need else 0
            b[0] -= granted
            return granted, b[0]

    def available(self, key: str, rate: float, burst: int) -> float:
        with self._lock:
            return self._level(key, rate, burst, self._clock())[0]

    def close(self) -> None:
        pass


class LocalCoordinator:
    """Applies a change in this process only: the one member is this process."""

    def __init__(self, member: str) -> None:
        self.member = member
        self._lock = threading.Lock()
        self._handlers: dict[str, list[Handler]] = {}
        self._desired: dict[str, dict[str, Mapping[str, object]]] = {}

    def subscribe(self, topic: str, handler: Handler) -> None:
        with self._lock:
            self._handlers.setdefault(topic, []).append(handler)
            current = list(self._desired.get(topic, {}).items())
        for key, payload in current:
            _apply(handler, key, payload)

    def apply_everywhere(self, topic: str, key: str, payload: Mapping[str, object],
                         timeout: float) -> list[Applied]:
        with self._lock:
            self._desired.setdefault(topic, {})[key] = dict(payload)
            handlers = list(self._handlers.get(topic, ()))
        answers = [_apply(h, key, payload) for h in handlers]
        return [Applied(self.member, error is None, error or "") for error in answers]

    def close(self) -> None:
        pass


def _apply(handler: Handler, key: str, payload: Mapping[str, object]) -> str | None:
    """Run a handler; an exception is that member's error, not the caller's."""
    try:
        return handler(key, payload)
    except Exception as err:  # the error is the answer this member gives
        return f"{type(err).__name__}: {err}"
