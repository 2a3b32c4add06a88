"""Usage anomalies per caller: rate against the caller's own baseline, and extraction patterns.

Three extraction detectors run per (caller, model) on a bounded sample of each request's rows:

* **PRADA** (Juuti et al. 2019, EuroS&P, section IV): once the caller's memory of its last
  ``memory`` queries is full, each query's distance to the nearest of them (in the whitened
  space of the input score) joins a window of ``window`` distances; when a window fills,
  Shapiro-Wilk W is computed on it and the alarm is raised when W falls below the profile's
  calibrated threshold (calibrated on simulated benign streams seen the same way).
  Synthetic queries made by small steps from seeds give distances clustered at the step
  sizes (low W); natural queries give a smooth, nearly normal distribution. Exact repeats
  are skipped: a client resending the same input is not exploring the model. Windows do not
  overlap, so each test has the calibrated false-positive rate.
* **Uniform probing**: PRADA misses random probes (their distances look natural), but nearly
  every probe is out of distribution: alarm when at least ``k`` of the last ``probe_window``
  rows raised the input alarm, ``k`` being the binomial tail at the input FPR.
* **Single-feature sweeps**: consecutive rows that differ in exactly one feature; alarm when
  their count in the last ``sweep_window`` rows is improbable given how often held-out rows do.

The rate ratio compares two exponentially decayed request counts (short and long time
constants), each bias-corrected for the caller's age so a new caller starts at ratio ~1.
All state is in LRUs of ``max_callers`` entries, so memory is bounded whatever callers do.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._profile import InputProfile
from ._shapiro import shapiro_w

#: Whitened distance below which a query counts as a repeat (floating-point rounding).
_REPEAT = 1e-4


def binomial_alarm_count(trials: int, p: float, alpha: float) -> int:
    """Smallest k with P(Binomial(trials, p) >= k) <= alpha (at least 1)."""
    p = min(max(p, 0.0), 1.0)
    tail = 1.0
    for k in range(trials + 1):
        if tail <= alpha and k >= 1:
            return k
        tail -= math.comb(trials, k) * p**k * (1 - p) ** (trials - k)
    return trials + 1


class _Rate:
    __slots__ = ("first", "last", "long", "short")

    def __init__(self, now: float) -> None:
        self.first = self.last = now
        self.short = self.long = 0.0


class _Stream:
    """State of one caller on one model (fixed-size arrays: bounded memory)."""

    __slots__ = ("alarms", "dist_n", "distances", "last_w", "lock", "mem_n", "mem_pos",
                 "memory", "prev", "probe_n", "probe_pos", "probes", "profile", "sweep_n",
                 "sweep_pos", "sweeps")

    def __init__(self, profile: InputProfile, probe_window: int, sweep_window: int) -> None:
        dim = profile.projection.shape[1] if profile.projection is not None else profile.features
        self.profile = profile
        # One lock per stream: callers never wait for each other, only for themselves.
        self.lock = threading.Lock()
        self.memory = np.zeros((profile.usage_memory, dim))
        self.mem_n = self.mem_pos = 0
        self.distances = np.zeros(profile.usage_window)
        self.dist_n = 0  # distances in the current window
        self.probes = [False] * probe_window
        self.probe_pos = self.probe_n = 0  # ring position, True count
        self.sweeps = [False] * sweep_window
        self.sweep_pos = self.sweep_n = 0
        self.prev: np.ndarray | None = None
        self.alarms: dict[str, bool] = {"prada": False, "probe": False, "sweep": False}
        self.last_w = 1.0


def _window_d2(seq: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """Squared distances of ``rows[i]`` to ``seq[i:i + width]``, shape (len(rows), width).

    The windows overlap, so they are read as strided views of ``seq``, never copied. Rows of
    fewer than 8 features are done one feature at a time over contiguous columns, the sum
    of squares added column by column: bit for bit numpy's sum over the last axis (fewer
    than 8 terms are added in order), without its cost per output of a reduction over a
    short axis, the bulk of PRADA's time. Wider rows use that sum (pairwise beyond 8).
    """
    k, d = rows.shape
    if d >= 8 or d == 0:
        step, item = seq.strides
        windows = as_strided(seq, shape=(k, width, d), strides=(step, step, item),
                             writeable=False)
        diff = windows - rows[:, None, :]
        diff *= diff
        return diff.sum(axis=2)
    columns = np.ascontiguousarray(seq.T)
    item = columns.strides[1]
    total = np.empty((k, width))
    for j in range(d):
        diff = as_strided(columns[j], shape=(k, width), strides=(item, item),
                          writeable=False) - rows[:, j, None]
        diff *= diff
        if j:
            total += diff
        else:
            total[...] = diff
    return total


class UsageTracker:
    """Thread-safe per-caller usage state, in LRUs of ``max_callers`` entries."""

    def __init__(self, *, input_fpr: float, extraction_fpr: float, probe_window: int,
                 sweep_window: int, rows_per_request: int, rate_short_s: float,
                 rate_long_s: float, rate_floor: float, rate_ratio_alarm: float,
                 max_callers: int, clock: Callable[[], float]) -> None:
        self._extraction_fpr = extraction_fpr
        self._probe_window = probe_window
        self._sweep_window = sweep_window
        self._rows = rows_per_request
        self._short, self._long = rate_short_s, rate_long_s
        self._floor = rate_floor
        self._rate_alarm = rate_ratio_alarm
        self._max = max_callers
        self._clock = clock
        self._probe_k = binomial_alarm_count(probe_window, input_fpr, extraction_fpr)
        self._sweep_k: dict[float, int] = {}
        self._lock = threading.Lock()
        self._rates: OrderedDict[str, _Rate] = OrderedDict()
        self._streams: OrderedDict[tuple[str, str], _Stream] = OrderedDict()
        self._rng = np.random.default_rng()

    # --------------------------------------------------------------- rate

    def rate(self, caller: str, requests: int = 1) -> tuple[float, bool]:
        """Record ``requests`` requests arriving now (a batch scored together counts each);
        return (rate ratio, whether it just crossed the alarm ratio)."""
        now = self._clock()
        with self._lock:
            r = self._rates.get(caller)
            if r is None:
                r = self._rates[caller] = _Rate(now)
                if len(self._rates) > self._max:
                    self._rates.popitem(last=False)
            else:
                self._rates.move_to_end(caller)
            dt = max(0.0, now - r.last)
            before = self._ratio(r, now) if r.short > 0 else 0.0
            r.short = r.short * math.exp(-dt / self._short) + requests
            r.long = r.long * math.exp(-dt / self._long) + requests
            r.last = now
            ratio = self._ratio(r, now)
        return ratio, ratio >= self._rate_alarm > before

    def _ratio(self, r: _Rate, now: float) -> float:
        age = max(now - r.first, 1e-3)
        short = r.short / (self._short * (1 - math.exp(-age / self._short)))
        long = r.long / (self._long * (1 - math.exp(-age / self._long)))
        # Until the caller has been seen for a short window, both rates are noise.
        if age < self._short:
            return 1.0
        return short / max(long, self._floor)

    # --------------------------------------------------------------- extraction

    def observe(self, caller: str, model: str, profile: InputProfile, rows: np.ndarray,
                u: np.ndarray, row_alarms: np.ndarray
                ) -> tuple[bool, list[tuple[str, dict[str, int | str]]]]:
        """Update ``caller``'s detectors on ``model`` with in-bounds ``rows`` (``u``: whitened).

        Returns (any detector raised, detectors that just turned on, with details).
        """
        if len(rows) > self._rows:
            keep = np.sort(self._rng.choice(len(rows), size=self._rows, replace=False))
            rows, u, row_alarms = rows[keep], u[keep], row_alarms[keep]
        v = profile.usage_space(u)
        key = (caller, model)
        with self._lock:
            st = self._streams.get(key)
            if st is None or st.profile is not profile:
                st = _Stream(profile, self._probe_window, self._sweep_window)
                self._streams[key] = st
                if len(self._streams) > self._max:
                    self._streams.popitem(last=False)
            else:
                self._streams.move_to_end(key)
        with st.lock:
            before = dict(st.alarms)
            self._prada(st, v)
            self._probe(st, row_alarms)
            self._sweep(st, rows)
            raised = [(name, self._detail(st, name)) for name, on in st.alarms.items()
                      if on and not before[name]]
            return any(st.alarms.values()), raised

    def _prada(self, st: _Stream, v: np.ndarray) -> None:
        """Each row's distance to the nearest of the ``memory`` rows before it (earlier rows
        of the same batch included), for the whole batch in a few numpy calls: one call per
        row cost the background scoring thread most of its time, and each numpy call may
        hand the GIL to the RPC threads and back.

        The rows before a row are a window of ``memory`` consecutive rows of the sequence
        (memory in arrival order, then the batch), so the windows of a batch are read as one
        strided view of it: only the distances that count are computed, not a batch-by-
        sequence matrix masked afterwards, and the work grows with the batch, not with its
        square.
        """
        profile = st.profile
        full = len(st.memory)
        n = len(v)
        if n == 0:
            return
        # The memory in arrival order, oldest first, then this batch.
        if st.mem_n < full:
            past = st.memory[:st.mem_n]
        elif st.mem_pos:
            past = np.concatenate([st.memory[st.mem_pos:], st.memory[:st.mem_pos]])
        else:
            past = st.memory
        m = len(past)
        seq = np.concatenate([past, v])
        # Distances count only once the memory is full, as in the calibration: the batch's
        # rows from ``first`` on, each against the ``full`` rows just before it in seq.
        first = max(0, full - m)
        if first < n:
            dist = np.sqrt(_window_d2(seq[m + first - full:], v[first:], full).min(axis=1))
            self._window(st, profile, dist[dist >= _REPEAT])  # an exact repeat is not exploration
        tail = seq[-full:]
        st.memory[:len(tail)] = tail
        st.mem_n = len(tail)
        st.mem_pos = st.mem_n % full

    def _window(self, st: _Stream, profile: InputProfile, distances: np.ndarray) -> None:
        """Add distances to the current window; test each window that fills (Shapiro-Wilk)."""
        size = profile.usage_window
        while len(distances):
            take = distances[:size - st.dist_n]
            st.distances[st.dist_n:st.dist_n + len(take)] = take
            st.dist_n += len(take)
            distances = distances[len(take):]
            if st.dist_n == size:
                d = st.distances
                # Identical distances (one fixed step) are as non-normal as it gets.
                degenerate = d.std() <= 1e-9 * d.mean()
                st.last_w = 0.0 if degenerate else float(shapiro_w(d))
                st.alarms["prada"] = st.last_w < profile.prada_threshold(self._extraction_fpr)
                st.dist_n = 0

    def _probe(self, st: _Stream, row_alarms: np.ndarray) -> None:
        ring = st.probes
        for alarm in row_alarms.tolist():
            st.probe_n += alarm - ring[st.probe_pos]
            ring[st.probe_pos] = alarm
            st.probe_pos = (st.probe_pos + 1) % len(ring)
        st.alarms["probe"] = st.probe_n >= self._probe_k

    def _sweep(self, st: _Stream, rows: np.ndarray) -> None:
        # Counts as Python ints: the ring update below is per row, and numpy scalars there
        # cost more than the counting itself.
        changed: list[int]
        if st.prev is None:
            changed = (rows[1:] != rows[:-1]).sum(axis=1).tolist()
        elif len(rows) == 1:
            changed = [int(np.count_nonzero(rows[0] != st.prev))]
        else:
            seq = np.concatenate([st.prev[None, :], rows])
            changed = (seq[1:] != seq[:-1]).sum(axis=1).tolist()
        ring = st.sweeps
        for c in changed:
            single = c == 1
            st.sweep_n += single - ring[st.sweep_pos]
            ring[st.sweep_pos] = single
            st.sweep_pos = (st.sweep_pos + 1) % len(ring)
        st.prev = rows[-1].copy()
        st.alarms["sweep"] = st.sweep_n >= self._sweep_threshold(st.profile)

    def _sweep_threshold(self, profile: InputProfile) -> int:
        p = max(profile.single_change_rate, 1e-3)
        if p not in self._sweep_k:
            self._sweep_k[p] = binomial_alarm_count(self._sweep_window, p, self._extraction_fpr)
        return self._sweep_k[p]

    def _detail(self, st: _Stream, name: str) -> dict[str, int | str]:
        if name == "prada":
            return {"detector": "prada", "shapiro_w": f"{st.last_w:.6f}",
                    "w_threshold": f"{st.profile.prada_threshold(self._extraction_fpr):.6f}",
                    "window": st.profile.usage_window}
        if name == "probe":
            return {"detector": "probe", "alarmed_rows": st.probe_n,
                    "window": self._probe_window, "k": self._probe_k}
        return {"detector": "sweep", "single_feature_steps": st.sweep_n,
                "window": self._sweep_window, "k": self._sweep_threshold(st.profile)}
