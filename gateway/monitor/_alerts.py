"""Anomaly alerts: what the monitor detected, de-duplicated and queued for the audit log."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.monitor._metrics import Metrics


@dataclass(frozen=True)
class Alert:
    """One anomaly for the audit log (kind ``anomaly``); only str and int values, no floats.

    ``kind`` is what was detected: ``input``, ``bounds``, ``rate``, ``extraction``,
    ``output_drift``, ``latency`` or ``quota``. ``score``/``threshold`` are decimal strings.
    """

    kind: str
    caller: str
    model: str
    score: str
    threshold: str
    detail: dict[str, int | str] = field(default_factory=dict)

    def as_fields(self) -> dict[str, Any]:
        """The fields of its audit record (record kind ``anomaly``; ``alert`` says which)."""
        return {"alert": self.kind, "caller": self.caller, "model": self.model,
                "score": self.score, "threshold": self.threshold, "detail": dict(self.detail)}


def _dec(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


class AlertQueue:
    """Pending alerts for the server to drain, at most one per ``interval_s`` for each kind,
    detector, caller and model (the next one's ``suppressed`` says how many were folded in).

    Bounded: ``max_alerts`` pending (oldest dropped and counted), and the de-duplication
    table is pruned beyond four entries per tracked caller.
    """

    def __init__(self, metrics: Metrics, *, interval_s: float, max_alerts: int,
                 max_callers: int, clock: Callable[[], float]) -> None:
        self._metrics = metrics
        self._interval = interval_s
        self._max_alerts = max_alerts
        self._max_keys = 4 * max_callers
        self._clock = clock
        self._alerts: deque[Alert] = deque()
        self._last: dict[tuple[str, str, str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def drain(self) -> list[Alert]:
        """The pending alerts, removed from the queue."""
        with self._lock:
            out = list(self._alerts)
            self._alerts.clear()
        return out

    def add(self, kind: str, caller: str, model: str, score: float, threshold: float,
               detail: dict[str, int | str]) -> None:
        """Count a detection, and queue its alert unless one like it was queued lately."""
        self._metrics.detections.labels(kind, model).inc()
        now = self._clock()
        key = (kind, caller, model, str(detail.get("detector", "")))
        with self._lock:
            last, suppressed = self._last.get(key, (-math.inf, 0))
            if now - last < self._interval:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > self._max_keys:
                self._last = {k: v for k, v in self._last.items()
                              if now - v[0] < self._interval}
                if len(self._last) > self._max_keys:
                    self._last.clear()  # bounded memory beats perfect de-duplication
            if len(self._alerts) >= self._max_alerts:
                self._alerts.popleft()
                self._metrics.alerts_dropped.inc()
            self._alerts.append(Alert(kind, caller, model, _dec(score), _dec(threshold),
                                      {**detail, "suppressed": suppressed}))
        self._metrics.alerts.labels(kind, model).inc()
