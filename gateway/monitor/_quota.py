"""Per-caller token buckets: ``rate`` tokens a second, at most ``burst`` banked, one per call.

A caller's bucket comes from the most specific rule: its identity, else the most generous of
its roles (``role:NAME``), else the default (``quota_rate``/``quota_burst``; rate 0 means no
quota). Buckets live in an LRU of ``max_callers``: an evicted caller comes back with a full
bucket, which only matters if more authenticated identities than that are active at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.errors import QuotaExceeded


@dataclass(frozen=True)
class QuotaRule:
    rate: float  # tokens per second
    burst: int  # bucket size
    source: str  # the configuration key it came from, for messages


class _Bucket:
    __slots__ = ("last", "rule", "tokens")

    def __init__(self, rule: QuotaRule, now: float) -> None:
        self.rule = rule
        self.tokens = float(rule.burst)
        self.last = now


class Quotas:
    """Thread-safe token buckets keyed by caller; ``clock`` is injectable for tests."""

    def __init__(self, rules: dict[str, QuotaRule], default: QuotaRule | None,
                 max_callers: int, clock: Callable[[], float]) -> None:
        self._rules = rules
        self._default = default
        self._max = max_callers
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def active(self) -> bool:
        return bool(self._rules) or self._default is not None

    def rule_for(self, caller: str, roles: Iterable[str] = ()) -> QuotaRule | None:
        if caller in self._rules:
            return self._rules[caller]
        matches = [self._rules[f"role:{r}"] for r in roles if f"role:{r}" in self._rules]
        if matches:
            return max(matches, key=lambda q: (q.rate, q.burst))
        return self._default

    def admit(self, caller: str, roles: Iterable[str] = ()) -> None:
        """Take one token from ``caller``'s bucket or raise :class:`QuotaExceeded`."""
        rule = self.rule_for(caller, roles)
        if rule is None:
            return
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is None or bucket.rule != rule:
                bucket = _Bucket(rule, now)
                self._buckets[caller] = bucket
                if len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(caller)
                elapsed = max(0.0, now - bucket.last)
                bucket.tokens = min(float(rule.burst), bucket.tokens + elapsed * rule.rate)
                bucket.last = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / rule.rate if rule.rate > 0 else float("inf")
        raise QuotaExceeded(
            f"quota exceeded for {caller}: {rule.rate:g} request(s)/s with a burst of "
            f"{rule.burst} (rule {rule.source}); retry in {wait:.2f} s")
