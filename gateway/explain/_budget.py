"""Per-caller budgets of model evaluations for explanations (token buckets)."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.errors import QuotaExceeded
from gateway.state import Buckets, LocalBuckets


class ExplainBudgets:
    """Each caller may spend ``limit`` model evaluations, refilled evenly over ``window``.

    Why evaluations: an explanation's cost (and what it reveals about the model) grows with
    the number of model runs it makes, not with the number of calls. A call reserves its
    planned evaluations before it runs, so a caller can never overspend, and gets back what
    it did not use.
    """

    def __init__(self, limit: int, window_seconds: float, *,
                 clock: Callable[[], float] = time.monotonic, max_callers: int = 100_000,
                 buckets: Buckets | None = None) -> None:
        if limit <= 0 or window_seconds <= 0:
            raise ValueError("budget limit and window must be positive")
        self.limit = limit
        self.window_seconds = window_seconds
        self._rate = limit / window_seconds
        # This process's own buckets unless a shared state's are given (gateway.state).
        self._buckets = buckets if buckets is not None else \
            LocalBuckets(clock=clock, max_keys=max_callers)

    def remaining(self, caller: str) -> int:
        return int(self._buckets.available(_key(caller), self._rate, self.limit))

    def reserve(self, caller: str, evaluations: int) -> None:
        """Take ``evaluations`` from the caller's budget or raise QuotaExceeded (taking none)."""
        key = _key(caller)
        if self._buckets.take(key, self._rate, self.limit, evaluations):
            return
        tokens = self._buckets.available(key, self._rate, self.limit)
        wait = max(0.0, evaluations - tokens) / self._rate
        raise QuotaExceeded(
            f"explain budget exhausted: this explanation needs {evaluations} model "
            f"evaluations and {int(tokens)} of {self.limit} per "
            f"{self.window_seconds:g} s are left"
            + (f" (enough in {wait:.0f} s)" if evaluations <= self.limit else
               "; it is larger than the whole budget, ask for fewer samples"))

    def refund(self, caller: str, evaluations: int) -> None:
        """Give back evaluations reserved but not made."""
        if evaluations > 0:
            self._buckets.give_back(_key(caller), self._rate, self.limit, evaluations)


def _key(caller: str) -> str:
    return f"explain:{caller}"
