"""Shadow mode: a candidate policy decided beside the live one on real traffic.

Answers always follow the live policy. Every decision is also taken by the candidate, and
every disagreement is counted three ways:

- in totals (decisions, grants: the candidate would allow what live denies, revokes: the
  reverse), lock-free (``itertools.count``);
- by (live rule, shadow rule, change): the Prometheus counter
  ``gateway_policy_shadow_disagreements_total{live_rule, shadow_rule, change}``, which is
  bounded by the number of rule pairs, not by traffic;
- by request (subject, model, action, rules): what ``gateway policy shadow-report`` shows as
  who would gain or lose what. At most ``MAX_REQUESTS`` distinct requests are kept; the
  disagreements of further ones are counted in totals and by rule only (``dropped``).

The audit log gets aggregates, not one record per disagreement: a ``policy_shadow`` record
when the shadow is set, every ``summary_interval`` seconds while there are new
disagreements, and a final one when it is cleared or replaced. Each holds the cumulative
totals and the ``TOP_PAIRS`` most frequent (live rule, shadow rule) pairs since the shadow was
set, so the log proves what the candidate would have done without growing with traffic.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypedDict

from prometheus_client.metrics_core import Metric

from gateway.policy._condition import Attributes
from gateway.policy._engine import Decision, Snapshot

log = logging.getLogger("gateway.policy")

MAX_REQUESTS = 10_000
TOP_PAIRS = 50


class ShadowStats(TypedDict):
    """Totals since the shadow was set."""

    shadow_digest: str
    directory: str
    since: int
    decisions: int
    disagreements: int
    shadow_allows_live_denies: int
    shadow_denies_live_allows: int
    dropped_requests: int


class RulePair(TypedDict):
    """Disagreements of one (live rule, shadow rule, change)."""

    live_rule: str
    shadow_rule: str
    change: str
    count: int


class RequestRow(TypedDict):
    """Disagreements of one request: who would gain or lose which access."""

    subject: str
    model: str
    action: str
    live_rule: str
    shadow_rule: str
    change: str
    count: int


class ShadowSummary(ShadowStats):
    """A ``policy_shadow`` audit record's fields."""

    live_digest: str
    final: bool
    by_rule: list[RulePair]
    rule_pairs: int


def _peek(counter: itertools.count) -> int:
    """The next value, without advancing: ``repr`` is ``count(N)`` (``__reduce__``, the other
    way to read it, is deprecated since Python 3.12 and gone in 3.14)."""
    return int(repr(counter)[6:-1])


class Shadow:
    """One candidate policy under observation (see the module docstring)."""

    def __init__(self, snapshot: Snapshot, directory: Path) -> None:
        self.snapshot = snapshot
        self.directory = directory
        self.started = time.time()
        self._decisions = itertools.count()
        self._grants = itertools.count()   # live denies, shadow allows
        self._revokes = itertools.count()  # live allows, shadow denies
        self._dropped = itertools.count()
        # (live rule, shadow rule, shadow allows) -> count; key -> count per request.
        self._pairs: dict[tuple[str, str, bool], itertools.count] = {}
        self._requests: dict[tuple[str, str, str, str, str, bool], itertools.count] = {}
        self._lock = threading.Lock()  # only taken to add a new key, never per decision
        self.reported = 0  # disagreements covered by the last audit summary

    def observe(self, live: Decision, subject: str, model: str, action: str,
                attributes: Attributes | None) -> None:
        other = self.snapshot.decide(subject, model, action, attributes)
        if self.snapshot.retired:
            return  # replaced while deciding: not a meaningful comparison
        next(self._decisions)
        if other.allowed == live.allowed:
            return
        next(self._grants if other.allowed else self._revokes)
        pair = (live.rule, other.rule, other.allowed)
        counter = self._pairs.get(pair)
        if counter is None:
            with self._lock:
                counter = self._pairs.setdefault(pair, itertools.count())
            log.warning("shadow policy %s disagrees: %s %s %s: live %s by %s, shadow %s by %s",
                        self.snapshot.digest[:12], subject, action, model or "(gateway)",
                        "allow" if live.allowed else "deny", live.rule,
                        "allow" if other.allowed else "deny", other.rule)
        next(counter)
        key = (subject, model, action, live.rule, other.rule, other.allowed)
        counter = self._requests.get(key)
        if counter is None:
            with self._lock:
                if len(self._requests) >= MAX_REQUESTS:
                    next(self._dropped)
                    return
                counter = self._requests.setdefault(key, itertools.count())
        next(counter)

    @property
    def disagreements(self) -> int:
        return _peek(self._grants) + _peek(self._revokes)

    def pairs(self) -> list[RulePair]:
        """Disagreements by (live rule, shadow rule, change), most frequent first."""
        rows: list[RulePair] = [{"live_rule": live, "shadow_rule": shadow,
                 "change": "grant" if allows else "revoke", "count": _peek(counter)}
                for (live, shadow, allows), counter in list(self._pairs.items())]
        return sorted(rows, key=lambda r: (-r["count"], r["live_rule"]))

    def requests(self) -> list[RequestRow]:
        """Disagreements by request: who would gain or lose which access, and how often."""
        rows: list[RequestRow] = [
            {"subject": s, "model": m, "action": a, "live_rule": lr, "shadow_rule": sr,
             "change": "grant" if allows else "revoke", "count": _peek(counter)}
                for (s, m, a, lr, sr, allows), counter in list(self._requests.items())]
        return sorted(rows, key=lambda r: (r["change"], r["subject"], r["model"], r["action"]))

    def stats(self) -> ShadowStats:
        grants, revokes = _peek(self._grants), _peek(self._revokes)
        return {"shadow_digest": self.snapshot.digest, "directory": str(self.directory),
                "since": int(self.started), "decisions": _peek(self._decisions),
                "disagreements": grants + revokes, "shadow_allows_live_denies": grants,
                "shadow_denies_live_allows": revokes, "dropped_requests": _peek(self._dropped)}

    def summary(self, live_digest: str, final: bool) -> ShadowSummary:
        """The audit record's fields (cumulative since the shadow was set)."""
        pairs = self.pairs()
        return {**self.stats(), "live_digest": live_digest, "final": final,
                "by_rule": pairs[:TOP_PAIRS], "rule_pairs": len(pairs)}


class ShadowCollector:
    """Prometheus collector of the store's shadow counters (register it on a registry)."""

    def __init__(self, shadow_of: Callable[[], Shadow | None]) -> None:
        self._shadow_of = shadow_of

    def describe(self) -> list[Metric]:
        return []  # collected lazily: the label sets depend on traffic

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        shadow = self._shadow_of()
        active = GaugeMetricFamily("gateway_policy_shadow_active",
                                   "1 while a shadow policy is decided beside the live one.")
        active.add_metric([], 0 if shadow is None else 1)
        yield active
        decisions = CounterMetricFamily("gateway_policy_shadow_decisions",
                                        "Decisions taken by the shadow policy.")
        disagreements = CounterMetricFamily(
            "gateway_policy_shadow_disagreements",
            "Decisions where the shadow policy disagrees with the live one, by deciding rule "
            "of each; change=grant: shadow allows what live denies, revoke: the reverse.",
            labels=["live_rule", "shadow_rule", "change"])
        if shadow is not None:
            decisions.add_metric([], float(shadow.stats()["decisions"]))
            for row in shadow.pairs():
                disagreements.add_metric([row["live_rule"], row["shadow_rule"], row["change"]],
                                         row["count"])
        yield decisions
        yield disagreements
