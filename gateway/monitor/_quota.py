"""Per-caller token buckets: ``rate`` tokens a second, at most ``burst`` banked, one per call.

A caller's bucket comes from the most specific rule: its identity, else the most generous of
its roles (``role:NAME``), else the default (``quota_rate``/``quota_burst``; rate 0 means no
quota). Local buckets live in an LRU of ``max_callers``: an evicted caller comes back with a full
bucket, which only matters if more authenticated identities than that are active at once.
Shared buckets (:mod:`gateway.state`, backend ``host`` or ``postgresql``) hold a caller's
quota across processes and replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.errors import QuotaExceeded
from gateway.state import Buckets, LocalBuckets


@dataclass(frozen=True)
class QuotaRule:
    rate: float  # tokens per second
    burst: int  # bucket size
    source: str  # the configuration key it came from, for messages


class Quotas:
    """Token buckets keyed by caller, kept in a :class:`~gateway.state.Buckets`.

    By default the buckets are this process's own (exact; ``clock`` injectable for tests);
    given the buckets of a shared state, a caller's quota holds across every worker process
    or replica, within the bound :mod:`gateway.state` documents.
    """

    def __init__(self, rules: dict[str, QuotaRule], default: QuotaRule | None,
                 max_callers: int, clock: Callable[[], float],
                 buckets: Buckets | None = None) -> None:
        self._rules = rules
        self._default = default
        self._buckets = buckets if buckets is not None else \
            LocalBuckets(clock=clock, max_keys=max_callers)

    @property
    def active(self) -> bool:
        return bool(self._rules) or self._default is not None

    def rule_for(self, caller: str, roles: Iterable[str] = ()) -> QuotaRule | None:
        if not self._rules:  # only a default (or none): no per-call role names to build
            return self._default
        if caller in self._rules:
            return self._rules[caller]
        matches = [self._rules[f"role:{r}"] for r in roles if f"role:{r}" in self._rules]
        if matches:
            return max(matches, key=lambda q: (q.rate, q.burst))
        return self._default

    def admit(self, caller: str, roles: Iterable[str] = ()) -> None:
        """Take one token from ``caller``'s bucket or raise :class:`QuotaExceeded`
        (:class:`~gateway.errors.StateUnavailable` when shared buckets cannot be reached)."""
        rule = self.rule_for(caller, roles)
        if rule is None:
            return
        key = f"quota:{caller}"
        if self._buckets.take(key, rule.rate, rule.burst):
            return
        tokens = self._buckets.available(key, rule.rate, rule.burst)
        wait = max(0.0, 1.0 - tokens) / rule.rate if rule.rate > 0 else float("inf")
        raise QuotaExceeded(
            f"quota exceeded for {caller}: {rule.rate:g} request(s)/s with a burst of "
            f"{rule.burst} (rule {rule.source}); retry in {wait:.2f} s")
