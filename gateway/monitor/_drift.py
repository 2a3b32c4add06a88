"""Output drift and latency degradation, in tumbling windows per model.

Output drift: each window of ``OutputProfile.window`` predictions is binned like the
reference and compared with it by the population stability index; the alarm threshold is the
PSI quantile of bootstrapped held-out windows of the same size (see ``_profile``), so the
false-positive rate per window is the configured one rather than the folklore "PSI > 0.25".

Latency: the median of each window of ``latency_window`` total latencies is compared with a
slow moving baseline of earlier window medians; windows above the alarm ratio do not move the
baseline, so a lasting degradation stays visible instead of becoming the new normal.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

# np.median imports numpy.ma on its first call: done here, at start, not by the first window
# to close on a handler thread (an import holds the GIL and the import lock: a stall of
# every request, measured).
import numpy.ma

from ._profile import OutputProfile

_BASELINE_ALPHA = 0.1


class OutputDrift:
    """Per-model window counts; :meth:`observe` gives ``(psi, threshold)`` per closed window."""

    def __init__(self, fpr: float, max_models: int) -> None:
        self._fpr = fpr
        self._max = max_models
        self._lock = threading.Lock()
        self._state: OrderedDict[str, tuple[OutputProfile, np.ndarray]] = OrderedDict()

    def observe(self, model: str, profile: OutputProfile,
                y: np.ndarray) -> list[tuple[float, float]]:
        bins = profile.bins(y)
        if bins.size == 0:
            return []
        closed = []
        with self._lock:
            entry = self._state.get(model)
            if entry is None or entry[0] is not profile:
                entry = (profile, np.zeros(profile.classes + 1, dtype=np.int64))
                self._state[model] = entry
                if len(self._state) > self._max:
                    self._state.popitem(last=False)
            self._state.move_to_end(model)
            counts = entry[1]  # counts[-1] is the number of predictions in the window
            pos = 0
            while pos < len(bins):
                chunk = bins[pos:pos + profile.window - int(counts[-1])]
                counts[:-1] += np.bincount(chunk, minlength=profile.classes)
                counts[-1] += len(chunk)
                pos += len(chunk)
                if counts[-1] >= profile.window:
                    psi = float(profile.psi(counts[:-1]))
                    closed.append((psi, profile.threshold(self._fpr)))
                    counts[:] = 0
        return closed


class LatencyWatch:
    """Per (model, version) window medians against a baseline; returns closed-window ratios."""

    def __init__(self, window: int, alarm_ratio: float, max_models: int) -> None:
        self._window = window
        self._alarm = alarm_ratio
        self._max = max_models
        self._lock = threading.Lock()
        self._state: OrderedDict[tuple[str, str], list] = OrderedDict()

    def observe(self, key: tuple[str, str], seconds: float) -> float | None:
        with self._lock:
            st = self._state.get(key)
            if st is None:
                st = [np.empty(self._window), 0, None]  # samples, count, baseline median
                self._state[key] = st
                if len(self._state) > self._max:
                    self._state.popitem(last=False)
            self._state.move_to_end(key)
            st[0][st[1]] = seconds
            st[1] += 1
            if st[1] < self._window:
                return None
            median = float(np.median(st[0]))
            st[1] = 0
            if st[2] is None:
                st[2] = median
                return 1.0
            ratio = median / st[2] if st[2] > 0 else 1.0
            if ratio < self._alarm:
                st[2] = (1 - _BASELINE_ALPHA) * st[2] + _BASELINE_ALPHA * median
            return ratio

