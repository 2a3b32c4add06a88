"""The per-request input score: how rare a row is among reference rows, in decimal digits.

    marginals = Marginals.fit(fit_rows)               # per feature: quantile knots, fitted tails
    z = marginals(rows)                                # normal scores, unbounded beyond the knots
    joint, single = components(z, whitening)           # Mahalanobis^2 and max_j z_j^2
    score = np.maximum(joint_map(joint), single_map(single))   # -log10 tail probability

Each feature is mapped to a normal score through its reference quantiles (a Gaussian-copula
view, so skewed and heavy-tailed features do not dominate). Inside the grid the map is
piecewise linear through the quantiles; **beyond it, it follows a Gaussian tail fitted to the
extreme order statistics** (a QQ-line through the outer knot, fitted by least squares to
every reference value within one normal unit of it and beyond), so a value ten standard
deviations out gets a normal score near ten, not the edge of the grid. The outer knot sits
where about ``MIN_BEYOND`` fitting rows lie beyond it, so it is itself a stable estimate.

Two components catch two kinds of departure:

* ``joint``: the squared Mahalanobis distance of the normal scores under a shrunk covariance
  (the Ledoit-Wolf estimate of :mod:`._profile`). It is the optimal test against a departure
  spread over many features (shifts, scale changes, broken correlations).
* ``single``: the largest squared normal score of any one feature. Against a departure in one
  feature of many, the distance dilutes the signal over all ``d`` degrees of freedom; the
  maximum does not, so it catches a one-feature shift much more often (power figures in
  bench/README.md).

Each component's value becomes a **surprise**, ``-log10`` of the fraction of held-out
reference rows at least as extreme (:class:`SurpriseMap`: empirical quantiles, then an
exponential tail fitted by peaks over threshold, so the surprise keeps growing), and the score
is the larger of the two: a min-p combination, whose alarm threshold is calibrated on held-out
data at the configured false-positive rate. The component that gave the larger surprise, and
the feature that contributed most to it, explain an alarm.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

#: Normal-score knots per feature.
KNOTS = 25
#: Fitting rows expected beyond the outermost knot on each side (sets the grid's reach).
MIN_BEYOND = 20
#: The grid never reaches beyond this normal score (the 0.135% / 99.865% quantiles).
MAX_KNOT = 3.0
#: The tail line is fitted to the order statistics within this many normal units of the
#: outer knot, and beyond it.
TAIL_SPAN = 0.5
#: Largest (rows x features x knots) block compared at once while scoring.
_BLOCK = 1 << 22
#: Fewest held-out rows beyond a threshold for its empirical quantile to be used as is.
MIN_TAIL = 10
#: Levels of a surprise map's table (geometric from 0.5 to the peaks-over-threshold level).
_LEVELS = 24

_N = NormalDist()


def normal_ppf(p: np.ndarray) -> np.ndarray:
    """Inverse normal CDF, element by element (fitting only: not on the request path)."""
    flat = np.asarray(p, dtype=np.float64).ravel()
    return np.array([_N.inv_cdf(float(v)) for v in flat]).reshape(np.shape(p))


def knot_grid(n_fit: int) -> np.ndarray:
    """Normal scores of the quantile knots for ``n_fit`` fitting rows."""
    reach = min(MAX_KNOT, _N.inv_cdf(1 - MIN_BEYOND / n_fit))
    return np.linspace(-reach, reach, KNOTS)


def tail_slopes(rows: np.ndarray, knots: np.ndarray, grid: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Normal-score slopes (dz/dx) beyond the lower and upper outer knots, per feature.

    A QQ-line through each outer knot, fitted by least squares to the order statistics
    against their Blom normal scores ``Phi^-1((i - 3/8) / (n + 1/4))``. A Gaussian feature
    gives its own 1/sd; a heavy tail gives a shallower slope, so its far values score less
    than a Gaussian's would (the held-out calibration sees the rest).
    """
    n = len(rows)
    reach = float(grid[-1])
    # Only the order statistics in the tails are used: their Blom scores, lowest m ranks.
    m = min(n, math.ceil(n * _N.cdf(-(reach - TAIL_SPAN))) + 2)
    blom = normal_ppf((np.arange(1, m + 1) - 0.375) / (n + 0.25))
    lowest = np.sort(np.partition(rows, m - 1, axis=0)[:m], axis=0)  # ascending
    highest = -np.sort(np.partition(-rows, m - 1, axis=0)[:m], axis=0)  # descending
    take = blom <= -reach + TAIL_SPAN
    slopes = []
    for sign, ordered, knot in ((-1.0, lowest, knots[:, 0]), (1.0, highest, knots[:, -1])):
        # The i-th largest has the Blom score of the i-th smallest, negated.
        dz = -sign * (blom[take] + reach)
        dx = ordered[take] - knot
        spread = (dx * dz[:, None]).sum(axis=0) / float((dz * dz).sum())  # dx/dz
        inner = (knots[:, -1] - knots[:, 0]) / (2 * reach)  # the grid's average dx/dz
        # A degenerate tail (ties at the knot) falls back to the grid's own slope.
        spread = np.where(spread > 1e-6 * np.maximum(inner, 1e-300), spread, inner)
        slopes.append(1.0 / spread)
    return slopes[0], slopes[1]


class Marginals:
    """``z = a[j, i] + b[j, i] * x`` where ``i`` counts the knots of feature ``j`` below x.

    Segment 0 and K are the fitted tail lines, 1..K-1 the segments between knots: seven numpy
    operations per call and no clipping, which matters on the request path. NaN stays NaN.
    """

    def __init__(self, grid: np.ndarray, knots: np.ndarray, low_slope: np.ndarray,
                 high_slope: np.ndarray) -> None:
        d, k = knots.shape
        slope = np.diff(grid)[None, :] / np.diff(knots, axis=1)  # (d, k-1)
        inner = grid[None, :-1] - knots[:, :-1] * slope
        low_a = grid[0] - knots[:, :1] * low_slope[:, None]
        high_a = grid[-1] - knots[:, -1:] * high_slope[:, None]
        self.a = np.concatenate([low_a, inner, high_a], axis=1).ravel()
        self.b = np.concatenate([low_slope[:, None], slope, high_slope[:, None]], axis=1).ravel()
        self.knots = knots
        self.offsets = np.arange(d) * (k + 1)
        self.k = k

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        n, d = rows.shape
        step = max(1, _BLOCK // max(1, d * self.k))
        if n > step:
            return np.concatenate([self(rows[i:i + step]) for i in range(0, n, step)])
        i = (rows[:, :, None] > self.knots).sum(axis=2) + self.offsets
        return self.a[i] + self.b[i] * rows


class RowScorer:
    """The score of one row in plain Python, for the request path.

    Inside the gateway's handler, between gRPC, policy and audit work, each numpy call on a
    handful of numbers runs cold and costs a few microseconds; scoring one row takes about
    twenty of them. The same arithmetic on Python floats is a fraction of that. It computes
    exactly what :class:`Marginals`, :func:`components` and :meth:`SurpriseMap.one` do
    (tests check both agree), and gives up (None) on a row out of bounds or not finite, which
    the numpy path handles.
    """

    #: Up to this many features the whitening product is done in Python too.
    PYTHON_MATVEC = 8

    def __init__(self, marginals: Marginals, low: np.ndarray, high: np.ndarray,
                 whitening: np.ndarray, joint: SurpriseMap, single: SurpriseMap) -> None:
        d, k = marginals.knots.shape
        self.bounds = list(zip(low.tolist(), high.tolist(), strict=True))
        self.knots = marginals.knots.tolist()
        self.a = marginals.a.reshape(d, k + 1).tolist()
        self.b = marginals.b.reshape(d, k + 1).tolist()
        self.diagonal = whitening.ndim == 1
        self.columns: list[list[float]] = [] if self.diagonal else whitening.T.tolist()
        self.whitening = whitening
        self.small = d <= self.PYTHON_MATVEC
        self.joint, self.single = joint, single

    def __call__(self, row: list[float]) -> tuple[float, list[float] | np.ndarray] | None:
        z = []
        for (lo, hi), knots, a, b, v in zip(self.bounds, self.knots, self.a, self.b, row,
                                            strict=True):
            if not lo <= v <= hi:  # NaN fails this too
                return None
            i = bisect_left(knots, v)  # knots below v, as Marginals counts them
            z.append(a[i] + b[i] * v)
        if self.diagonal:
            u: list[float] | np.ndarray = z
            joint = sum(x * x for x in z)
        elif self.small:
            u = [sum(x * w for x, w in zip(z, col, strict=True)) for col in self.columns]
            joint = sum(x * x for x in u)
        else:
            w = np.array(z) @ self.whitening
            u, joint = w, float(w @ w)
        single = max(x * x for x in z)
        return max(self.joint.one(joint), self.single.one(single)), u


def components(z: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(joint, single) per row: squared norm of the whitened ``u``, largest squared ``z``.

    Plain ufuncs on purpose: einsum, take and searchsorted release and re-take the GIL even on
    a handful of numbers, and with many RPC threads that contention tripled scoring's CPU.
    """
    zz = z * z
    return (u * u).sum(axis=1), zz.max(axis=1, initial=0.0)


@dataclass(frozen=True)
class SurpriseMap:
    """``-log10 P(T >= t)`` for a component ``T``, estimated on held-out reference rows.

    Between ``values[0]`` (the median) and ``values[-1]`` it interpolates the empirical
    quantiles; beyond, the tail is exponential (peaks over threshold: excesses of a squared
    distance over a high quantile are close to exponential, its chi-square-like tail), so
    the surprise grows linearly without bound.
    """

    values: np.ndarray  # held-out quantiles of T at decreasing tail levels
    surprise: np.ndarray  # -log10 of those levels
    rate: float  # surprise per unit of T beyond values[-1]
    # ``values`` and ``surprise`` as lists, for :meth:`one` (set in __post_init__).
    _xs: list[float] = field(init=False, repr=False, compare=False)
    _ys: list[float] = field(init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, t: np.ndarray) -> SurpriseMap:
        n = len(t)
        p_u = min(0.05, 3 * MIN_TAIL / n)
        levels = np.geomspace(0.5, p_u, _LEVELS)
        values = np.quantile(t, 1 - levels)
        excess = t[t > values[-1]] - values[-1]
        scale = float(excess.mean()) if len(excess) else 0.0
        scale = max(scale, 1e-9 * max(1.0, abs(float(values[-1]))))
        return cls(values=values, surprise=-np.log10(levels), rate=1 / (scale * math.log(10)))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_xs", self.values.tolist())
        object.__setattr__(self, "_ys", self.surprise.tolist())

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return (np.interp(t, self.values, self.surprise)
                + np.maximum(t - self.values[-1], 0.0) * self.rate)

    def one(self, t: float) -> float:
        """``self(t)`` for one finite value, in plain Python: a single-row request pays a
        microsecond here instead of seven numpy calls (tests check both agree)."""
        xs, ys = self._xs, self._ys
        if t >= xs[-1]:
            return ys[-1] + (t - xs[-1]) * self.rate
        if t <= xs[0]:
            return ys[0]
        i = bisect_right(xs, t)
        x0, x1 = xs[i - 1], xs[i]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (t - x0) / (x1 - x0) if x1 > x0 else ys[i]

    def to_dict(self, rnd: Any) -> dict[str, Any]:
        return {"values": rnd(self.values), "surprise": rnd(self.surprise),
                "rate": rnd(self.rate)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurpriseMap:
        values = np.asarray(data["values"], dtype=np.float64)
        surprise = np.asarray(data["surprise"], dtype=np.float64)
        rate = float(data["rate"])
        if (values.ndim != 1 or values.shape != surprise.shape or len(values) < 2
                or not (np.diff(values) >= 0).all() or not (np.diff(surprise) > 0).all()
                or not rate > 0):
            raise ValueError("a surprise map needs increasing values and surprises, rate > 0")
        return cls(values=values, surprise=surprise, rate=rate)


def calibrate(scores: np.ndarray, fprs: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    """Score thresholds at ``fprs`` from held-out scores.

    Where at least ``MIN_TAIL`` held-out rows lie beyond it, the threshold is the empirical
    quantile. Further out it is extrapolated by peaks over threshold (Pickands-Balkema-de
    Haan): a surprise is ``-log10`` of a tail probability, so its excesses over a high
    quantile ``u`` are close to exponential and ``t = u + beta * ln(p_u / fpr)`` with
    ``beta`` their mean.
    """
    n = len(scores)
    p_u = min(0.05, 3 * MIN_TAIL / n)
    u = float(np.quantile(scores, 1 - p_u))
    excess = scores[scores > u] - u
    beta = float(excess.mean()) if len(excess) else 0.0
    out = []
    for f in fprs:
        if n * f >= MIN_TAIL:
            out.append((f, float(np.quantile(scores, 1 - f))))
        else:
            out.append((f, u + beta * math.log(p_u / f)))
    return tuple(out)
