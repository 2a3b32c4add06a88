"""Per-caller budgets of model evaluations for explanations (token buckets)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gateway.errors import QuotaExceeded


class ExplainBudgets:
    """Each caller may spend ``limit`` model evaluations, refilled evenly over ``window``.

    Why evaluations: an explanation's cost (and what it reveals about the model) grows with
    the number of model runs it makes, not with the number of calls. A call reserves its
    planned evaluations before it runs, so a caller can never overspend, and gets back what
    it did not use.
    """

    def __init__(self, limit: int, window_seconds: float, *,
                 clock: Callable[[], float] = time.monotonic, max_callers: int = 100_000) -> None:
        if limit <= 0 or window_seconds <= 0:
            raise ValueError("budget limit and window must be positive")
        self.limit = limit
        self.window_seconds = window_seconds
        self._rate = limit / window_seconds
        self._clock = clock
        self._max_callers = max_callers
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def _tokens(self, caller: str, now: float) -> float:
        tokens, at = self._buckets.get(caller, (float(self.limit), now))
        return min(float(self.limit), tokens + (now - at) * self._rate)

    def remaining(self, caller: str) -> int:
        with self._lock:
            return int(self._tokens(caller, self._clock()))

    def reserve(self, caller: str, evaluations: int) -> None:
        """Take ``evaluations`` from the caller's budget or raise QuotaExceeded (taking none)."""
        with self._lock:
            now = self._clock()
            tokens = self._tokens(caller, now)
            if evaluations > tokens:
                wait = (evaluations - tokens) / self._rate
                raise QuotaExceeded(
                    f"explain budget exhausted: this explanation needs {evaluations} model "
                    f"evaluations and {int(tokens)} of {self.limit} per "
                    f"{self.window_seconds:g} s are left"
                    + (f" (enough in {wait:.0f} s)" if evaluations <= self.limit else
                       "; it is larger than the whole budget, ask for fewer samples"))
            self._buckets[caller] = (tokens - evaluations, now)
            if len(self._buckets) > self._max_callers:
                self._prune(now)

    def refund(self, caller: str, evaluations: int) -> None:
        """Give back evaluations reserved but not made."""
        if evaluations <= 0:
            return
        with self._lock:
            now = self._clock()
            self._buckets[caller] = (min(float(self.limit),
                                         self._tokens(caller, now) + evaluations), now)

    def _prune(self, now: float) -> None:
        # Full buckets carry no state: forget them first; then the oldest entries.
        full = [c for c in self._buckets if self._tokens(c, now) >= self.limit]
        for c in full:
            del self._buckets[c]
        excess = len(self._buckets) - self._max_callers
        if excess > 0:
            for c, _ in sorted(self._buckets.items(), key=lambda kv: kv[1][1])[:excess]:
                del self._buckets[c]
