"""The reference profile of a model's inputs (and outputs), and the per-request input score.

    profile = InputProfile.fit(reference_rows, fprs=(0.01, 0.001), seed=0, outputs=model_outputs)
    profile.save(version_dir / "profile.json")     # deterministic JSON: covered by the signature
    scores = profile.score(rows)                      # surprise per row (-log10 tail probability)

What is stored, and why:

* per-feature mean, standard deviation and quantiles, with Gaussian tails fitted beyond the
  outer quantiles, so each feature maps to an unbounded normal score (see :mod:`._scorer`;
  a feature with tied quantiles, e.g. discrete, is standardised by mean and deviation);
* hard bounds with calibrated margins: beyond the outer knot an exponential tail is fitted to
  the fitting rows' excesses, and the bound sits where that tail leaves ``BOUND_TAIL`` of
  probability (never inside the reference range widened by ``bound_margin``), so a value far
  outside anything the reference held raises the alarm on its own;
* a shrunk inverse covariance of the normal scores, kept as its Cholesky factor so a row's
  distance is one matrix product. Shrinkage is Ledoit & Wolf (2004), "A well-conditioned
  estimator for large-dimensional covariance matrices", J. Multivariate Analysis 88:365-411,
  Lemmas 3.2-3.4 (target ``mu * I``, intensity ``min(b^2, d^2) / d^2``);
* the two score components' surprise maps and the score's thresholds at the configured
  false-positive rates, **calibrated on a held-out split** the covariance never saw, and the
  rates those thresholds achieve out of sample (two-fold: calibrated on one half of the
  held-out rows, measured on the other), which ``gateway model profile`` prints;
* for the usage detector: the PRADA threshold on Shapiro-Wilk W, calibrated by simulating benign
  callers drawing held-out rows, and how often two reference rows differ in a single feature;
* for output drift: the reference distribution of predictions (classes, or deciles of a value)
  and PSI thresholds calibrated on bootstrapped held-out windows of the configured size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import rfc8785

from gateway.errors import ModelUnavailable

from ._scorer import (
    Marginals,
    RowScorer,
    SurpriseMap,
    calibrate,
    components,
    knot_grid,
    tail_slopes,
)
from ._shapiro import shapiro_w

FORMAT = "gateway.monitor.profile/v2"
#: FPRs always calibrated besides the requested ones, so settings can pick among them.
STANDARD_FPRS = (0.05, 0.01, 0.005, 0.001)
#: Beyond this many features the covariance is taken diagonal (JSON size and per-row cost).
MAX_FULL_COVARIANCE = 512
#: PRADA distances are computed in at most this many (randomly projected) dimensions.
PROJECTION_DIM = 32
#: Probability, per feature and side, that a reference-like value falls beyond a hard bound
#: under the exponential tail fitted beyond the outer knot (heavier than a Gaussian's, so the
#: bound errs wide).
BOUND_TAIL = 1e-7
_NORMAL = NormalDist()
_ONE_IN_BOUNDS = np.ones(1, dtype=bool)
_ONE_IN_BOUNDS.flags.writeable = False
_PSI_SIMULATIONS = 4000
_PRADA_SIMULATIONS = 1000


class ProfileError(ModelUnavailable):
    """A reference profile cannot be built, read or applied (a model whose profile is
    malformed is not served: its thresholds are part of what policy decides on)."""


def _round(values: Any) -> Any:
    """10 significant digits: compact, deterministic JSON that round-trips exactly."""
    arr = np.asarray(values, dtype=np.float64)
    return [float(f"{v:.10g}") for v in arr.ravel()] if arr.ndim else float(f"{float(arr):.10g}")


def _matrix(values: np.ndarray) -> list[list[float]]:
    return [_round(row) for row in np.asarray(values, dtype=np.float64)]


def ledoit_wolf(z: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance of centred rows ``z`` (n, p) and the shrinkage intensity in [0, 1]."""
    n, p = z.shape
    s = z.T @ z / n
    mu = float(np.trace(s)) / p
    d2 = float(((s - mu * np.eye(p)) ** 2).sum()) / p
    # b̄² = (1/n²) Σ_k ||z_k z_kᵀ - S||²_F / p  =  (Σ_k ||z_k||⁴ - n ||S||²_F) / (n² p)
    row_sq = (z**2).sum(axis=1)
    b2_bar = float((row_sq**2).sum() - n * (s**2).sum()) / (n * n * p)
    b2 = min(max(b2_bar, 0.0), d2)
    shrinkage = b2 / d2 if d2 > 0 else 1.0
    return shrinkage * mu * np.eye(p) + (1 - shrinkage) * s, shrinkage


def _quantile(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q, method="linear"))


def _rows(x: np.ndarray) -> np.ndarray:
    """(batch, features) view of a request or reference tensor."""
    x = np.asarray(x)
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 fails on an empty batch


@dataclass(frozen=True)
class OutputProfile:
    """Reference distribution of one prediction summary per row, and PSI thresholds."""

    kind: str  # "class": argmax over outputs; "value": the single output value
    classes: int  # number of bins
    edges: tuple[float, ...]  # interior bin edges for "value"
    reference: np.ndarray  # bin proportions on the fitting split
    window: int
    psi_thresholds: tuple[tuple[float, float], ...]

    def bins(self, y: np.ndarray) -> np.ndarray:
        """Bin index of each row's prediction (rows whose shape does not fit are dropped)."""
        rows = _rows(y)
        if self.kind == "class":
            if rows.shape[1] != self.classes:
                return np.empty(0, dtype=np.int64)
            return np.argmax(rows, axis=1)
        if rows.shape[1] != 1:
            return np.empty(0, dtype=np.int64)
        values = rows[:, 0].astype(np.float64)
        values = values[np.isfinite(values)]
        return np.searchsorted(np.asarray(self.edges), values, side="right")

    def psi(self, counts: np.ndarray) -> np.ndarray:
        """Population stability index of window bin counts (..., classes) vs the reference."""
        return _psi(counts, self.reference)

    def threshold(self, fpr: float) -> float:
        return _pick(self.psi_thresholds, fpr)


def _psi(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    k = counts.shape[-1]
    # Half-count smoothing so that an empty bin is a large but finite contribution.
    p = (counts + 0.5) / (counts.sum(axis=-1, keepdims=True) + 0.5 * k)
    return ((p - reference) * np.log(p / reference)).sum(axis=-1)


def _pick(table: tuple[tuple[float, float], ...], fpr: float) -> float:
    """Threshold at ``fpr``: exact, else the nearest stricter (lower FPR), else the strictest."""
    exact = [t for f, t in table if math.isclose(f, fpr)]
    if exact:
        return exact[0]
    stricter = [(f, t) for f, t in table if f < fpr]
    if stricter:
        return max(stricter)[1]
    return min(table)[1]


@dataclass(frozen=True)
class InputProfile:
    """A model's reference profile; immutable, so it is shared freely across threads."""

    features: int
    mean: np.ndarray
    std: np.ndarray
    grid: np.ndarray  # (K,) normal scores of the quantile knots
    knots: np.ndarray  # (features, K) quantiles at those normal-score levels
    tail_slopes: np.ndarray  # (features, 2) normal-score slope below / above the outer knots
    low: np.ndarray  # hard bounds
    high: np.ndarray
    whitening: np.ndarray  # (features, features) Cholesky factor of the precision, or (features,)
    joint: SurpriseMap | None  # surprise of the Mahalanobis component (None: a draft)
    single: SurpriseMap | None  # surprise of the one-feature component
    thresholds: tuple[tuple[float, float], ...]  # (fpr, score threshold)
    prada_thresholds: tuple[tuple[float, float], ...]  # (fpr, W threshold: alarm below)
    usage_window: int
    usage_memory: int
    projection: np.ndarray | None  # (features, PROJECTION_DIM) or None: whitened space as is
    single_change_rate: float
    output: OutputProfile | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    marginals: Marginals = field(init=False, repr=False, compare=False)

    row_scorer: RowScorer | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        marginals = Marginals(self.grid, self.knots, self.tail_slopes[:, 0],
                              self.tail_slopes[:, 1])
        object.__setattr__(self, "marginals", marginals)
        object.__setattr__(self, "row_scorer", None if self.joint is None or self.single is None
                           else RowScorer(marginals, self.low, self.high, self.whitening,
                                          self.joint, self.single))

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        ref: np.ndarray,
        *,
        fprs: tuple[float, ...] = (0.01, 0.001),
        seed: int = 0,
        holdout: float = 0.5,
        bound_margin: float = 0.25,
        outputs: np.ndarray | None = None,
        drift_window: int = 256,
        usage_window: int = 64,
        usage_memory: int = 128,
    ) -> InputProfile:
        """Fit on a random ``1 - holdout`` of ``ref``'s rows; calibrate thresholds on the rest.

        ``outputs`` (the model's predictions on ``ref``, same row order) adds the output-drift
        reference. The result is exactly what :meth:`load` returns for the saved file.
        """
        rows = _rows(ref).astype(np.float64)
        n, d = rows.shape
        if not all(0 < f < 0.5 for f in fprs):
            raise ProfileError(f"false-positive rates must be in (0, 0.5): {fprs}")
        if not 0.05 <= holdout <= 0.9:
            raise ProfileError(f"holdout fraction must be in [0.05, 0.9], got {holdout}")
        if not np.isfinite(rows).all():
            bad = int((~np.isfinite(rows)).any(axis=1).sum())
            raise ProfileError(f"reference data has {bad} row(s) with NaN or infinite values")
        n_hold = round(n * holdout)
        if n_hold < usage_memory + usage_window or n - n_hold < max(2 * d, 50):
            raise ProfileError(
                f"reference data too small: {n} rows of {d} features; need at least "
                f"{max(2 * d, 50)} fitting rows and {usage_memory + usage_window} held-out rows")
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        fit_idx, hold_idx = np.sort(order[n_hold:]), np.sort(order[:n_hold])
        a, b = rows[fit_idx], rows[hold_idx]
        warnings: list[str] = []

        mean = a.mean(axis=0)
        std = a.std(axis=0)
        constant = std <= 1e-12 * np.maximum(1.0, np.abs(mean))
        if constant.any():
            warnings.append(f"{int(constant.sum())} constant feature(s): any change is anomalous")
        std = np.where(constant, np.maximum(1e-9, 1e-9 * np.abs(mean)), std)
        grid = np.asarray(_round(knot_grid(len(a))))
        knots = np.quantile(a, [_NORMAL.cdf(float(v)) for v in grid], axis=0).T
        tied = ~(np.diff(knots, axis=1) > 0).all(axis=1)
        # Tied quantiles (discrete or constant features): the linear map (x - mean) / std.
        knots[tied] = mean[tied, None] + std[tied, None] * grid[None, :]
        knots = np.asarray(_matrix(knots))
        low_slope, high_slope = tail_slopes(a, knots, grid)
        low_slope[tied] = high_slope[tied] = 1 / std[tied]
        tails = np.stack([low_slope, high_slope], axis=1)
        z = Marginals(grid, knots, low_slope, high_slope)(a)
        if d <= MAX_FULL_COVARIANCE:
            cov, shrinkage = ledoit_wolf(z)
            precision = np.linalg.inv(cov)
            whitening = np.linalg.cholesky((precision + precision.T) / 2)
        else:
            shrinkage = 1.0
            whitening = np.ones(d)
            warnings.append(f"{d} features > {MAX_FULL_COVARIANCE}: diagonal covariance used")
        low, high = _bounds(a, rows, knots, grid, bound_margin)
        projection = None
        if d > PROJECTION_DIM:
            projection = rng.standard_normal((d, PROJECTION_DIM)) / math.sqrt(PROJECTION_DIM)

        draft = cls(features=d, mean=mean, std=std, grid=grid, knots=knots, tail_slopes=tails,
                    low=low, high=high, whitening=whitening, joint=None, single=None,
                    thresholds=(), prada_thresholds=(), usage_window=usage_window,
                    usage_memory=usage_memory, projection=projection, single_change_rate=0.0)
        # Score with exactly the stored (rounded) values.
        draft = cls.from_dict(draft.to_dict(), complete=False)

        all_fprs = tuple(sorted(set(STANDARD_FPRS) | {float(f) for f in fprs}))
        joint_t, single_t = draft._components(b)
        achieved = _cross_check(joint_t, single_t, all_fprs, rng)
        scored = cls.from_dict(replace(draft, joint=SurpriseMap.fit(joint_t),
                                       single=SurpriseMap.fit(single_t)).to_dict(),
                               complete=False)
        thresholds = calibrate(scored.score(b), all_fprs)
        for f in all_fprs:
            if n_hold * f < 1:
                warnings.append(f"fewer than one held-out row expected beyond the {f} "
                                "threshold: it is extrapolated; give more data")
        prada = _calibrate_prada(draft, b, all_fprs, rng)
        pair = rng.integers(0, n_hold, size=(min(20000, n_hold * 4), 2))
        changed = (np.abs(b[pair[:, 0]] - b[pair[:, 1]]) > 0).sum(axis=1)
        single_change_rate = float((changed == 1).mean())

        output = None
        if outputs is not None:
            out_rows = _rows(outputs)
            if out_rows.shape[0] != n:
                raise ProfileError(f"outputs have {out_rows.shape[0]} rows, inputs {n}")
            output = _fit_output(out_rows[fit_idx], out_rows[hold_idx], drift_window,
                                 all_fprs, rng)
        meta = {
            "n_fit": int(n - n_hold), "n_holdout": int(n_hold), "seed": int(seed),
            "shrinkage": float(shrinkage), "bound_margin": float(bound_margin),
            "discrete_features": int(tied.sum()),
            "heldout_fpr": [[f, r] for f, r in achieved],
        }
        final = replace(scored, thresholds=thresholds, prada_thresholds=prada,
                        single_change_rate=single_change_rate, output=output, meta=meta)
        return replace(cls.from_dict(final.to_dict()), warnings=tuple(warnings))

    # ------------------------------------------------------------------ scoring

    def standardise(self, rows: np.ndarray) -> np.ndarray:
        """Rows mapped to the whitened space, where in-distribution data is about N(0, I)."""
        z = self.marginals(rows)
        return z if self.whitening.ndim == 1 else z @ self.whitening

    def _components(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = self.marginals(rows)
        return components(z, z if self.whitening.ndim == 1 else z @ self.whitening)

    def _surprise(self, joint: np.ndarray, single: np.ndarray) -> np.ndarray:
        if self.joint is None or self.single is None:
            raise ProfileError("the profile has no score calibration")
        return np.maximum(self.joint(joint), self.single(single))

    def score(self, x: np.ndarray) -> np.ndarray:
        """Per row, the score the alarm compares with :meth:`threshold`: ``inf`` out of bounds."""
        rows = _rows(x).astype(np.float64, copy=False)
        if rows.shape[1] != self.features:
            raise ProfileError(f"input has {rows.shape[1]} features per row, "
                               f"the profile {self.features}")
        return self.assess(rows)[0]

    def out_of_bounds(self, x: np.ndarray) -> np.ndarray:
        """Per row: any NaN, infinity, or value outside the hard bounds."""
        rows = _rows(x)
        with np.errstate(invalid="ignore"):
            ok = (rows >= self.low) & (rows <= self.high)
        return np.asarray(~ok.all(axis=1))

    def threshold(self, fpr: float) -> float:
        """Score threshold at ``fpr`` (exact if calibrated, else the nearest stricter)."""
        return _pick(self.thresholds, fpr)

    def prada_threshold(self, fpr: float) -> float:
        return _pick(self.prada_thresholds, fpr)

    def assess(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pass for the request path: (score, whitened row, within bounds) per row.

        A row out of bounds (NaN, infinity, beyond a hard bound) scores ``inf``: it raises the
        alarm whatever the rest of it looks like. An empty batch gives empty arrays.
        """
        if len(rows) == 1 and self.row_scorer is not None:
            # One row (most requests): the same score in plain Python (see RowScorer).
            scored = self.row_scorer(rows[0].tolist())
            if scored is not None:
                return np.array([scored[0]]), np.array([scored[1]]), _ONE_IN_BOUNDS
        in_bounds = np.asarray(((rows >= self.low) & (rows <= self.high)).all(axis=1))
        if in_bounds.all():  # the common case: finite, so no floating-point warnings
            z = self.marginals(rows)
            u = z if self.whitening.ndim == 1 else z @ self.whitening
            return self._surprise(*components(z, u)), u, in_bounds
        with np.errstate(invalid="ignore", over="ignore"):
            z = self.marginals(rows)
            u = z if self.whitening.ndim == 1 else z @ self.whitening
            scores = self._surprise(*components(z, u))
        scores[~in_bounds | ~np.isfinite(scores)] = np.inf
        return scores, u, in_bounds

    def explain(self, row: np.ndarray) -> tuple[str, int]:
        """What drove one row's score: (``bounds``, ``joint`` or ``single``, feature index).

        ``bounds``: the first feature outside its hard bounds (or not finite). ``single``: the
        feature with the largest normal score. ``joint``: the feature contributing most to the
        squared distance ``z' P z = sum_j z_j (P z)_j``.
        """
        row = np.asarray(row, dtype=np.float64).reshape(1, self.features)
        with np.errstate(invalid="ignore"):
            out = ~((row >= self.low) & (row <= self.high))[0]
        if out.any():
            return "bounds", int(np.argmax(out))
        z = self.marginals(row)
        if self.whitening.ndim == 1:
            contribution = z * z
        else:
            contribution = z * ((z @ self.whitening) @ self.whitening.T)
        joint, single = self._components(row)
        if self.single is not None and self.joint is not None \
                and self.single(single)[0] >= self.joint(joint)[0]:
            return "single", int(np.argmax(z * z))
        return "joint", int(np.argmax(contribution))

    def heldout_fpr(self, fpr: float) -> float | None:
        """The false-positive rate the ``fpr`` threshold achieved out of sample at fitting."""
        for f, rate in self.meta.get("heldout_fpr", ()):
            if math.isclose(f, fpr):
                return float(rate)
        return None

    def usage_space(self, u: np.ndarray) -> np.ndarray:
        """Whitened rows ``u`` as PRADA sees them (randomly projected for wide inputs).

        Raw or per-feature standardised distances would let a few heavy-tailed features make
        benign callers' distances far from normal too.
        """
        return u if self.projection is None else u @ self.projection

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> dict[str, Any]:
        out = None
        if self.output is not None:
            o = self.output
            out = {"kind": o.kind, "classes": o.classes, "edges": _round(o.edges),
                   "reference": _round(o.reference), "window": o.window,
                   "psi_thresholds": [_round(p) for p in o.psi_thresholds]}
        score = None
        if self.joint is not None and self.single is not None:
            score = {"joint": self.joint.to_dict(_round), "single": self.single.to_dict(_round)}
        return {
            "format": FORMAT,
            "features": self.features,
            "mean": _round(self.mean), "std": _round(self.std),
            "quantiles": {"normal_scores": _round(self.grid), "values": _matrix(self.knots),
                          "tail_slopes": _matrix(self.tail_slopes)},
            "bounds": {"low": _round(self.low), "high": _round(self.high)},
            "whitening": (_matrix(self.whitening) if self.whitening.ndim == 2
                          else _round(self.whitening)),
            "score": score,
            "input_thresholds": [_round(p) for p in self.thresholds],
            "usage": {"window": self.usage_window, "memory": self.usage_memory,
                      "prada_thresholds": [_round(p) for p in self.prada_thresholds],
                      "single_change_rate": _round(self.single_change_rate),
                      "projection": (None if self.projection is None
                                     else _matrix(self.projection))},
            "output": out,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, complete: bool = True) -> InputProfile:
        """Parse and check a profile (``complete=False``: a draft without calibration)."""
        try:
            if data.get("format") != FORMAT:
                raise ProfileError(f"not a {FORMAT} profile (format {data.get('format')!r}); "
                                   "re-run `gateway model profile` and re-sign the model")
            d = int(data["features"])
            vec = lambda v: np.asarray(v, dtype=np.float64).reshape(d)  # noqa: E731
            whitening = np.asarray(data["whitening"], dtype=np.float64)
            if whitening.shape not in ((d, d), (d,)):
                raise ProfileError(f"whitening has shape {whitening.shape}, expected ({d}, {d})")
            usage = data["usage"]
            projection = usage.get("projection")
            out = data.get("output")
            output = None
            if out is not None:
                output = OutputProfile(
                    kind=str(out["kind"]), classes=int(out["classes"]),
                    edges=tuple(float(e) for e in out["edges"]),
                    reference=np.asarray(out["reference"], dtype=np.float64),
                    window=int(out["window"]),
                    psi_thresholds=tuple((float(f), float(t)) for f, t in out["psi_thresholds"]))
                if output.kind not in ("class", "value") or len(output.reference) != output.classes:
                    raise ProfileError("output section is inconsistent")
            std = vec(data["std"])
            if not (std > 0).all():
                raise ProfileError("std must be positive")
            quantiles = data["quantiles"]
            grid = np.asarray(quantiles["normal_scores"], dtype=np.float64)
            knots = np.asarray(quantiles["values"], dtype=np.float64).reshape(d, -1)
            if grid.ndim != 1 or len(grid) < 2 or knots.shape[1] != len(grid) \
                    or not (np.diff(grid) > 0).all():
                raise ProfileError("quantile levels must be increasing, one per knot")
            if not (np.diff(knots, axis=1) > 0).all():
                raise ProfileError("quantiles must be strictly increasing")
            tails = np.asarray(quantiles["tail_slopes"], dtype=np.float64).reshape(d, 2)
            if not (np.isfinite(tails) & (tails > 0)).all():
                raise ProfileError("tail slopes must be positive")
            score = data.get("score")
            joint = single = None
            if score is not None:
                joint = SurpriseMap.from_dict(score["joint"])
                single = SurpriseMap.from_dict(score["single"])
            thresholds = tuple((float(f), float(t)) for f, t in data["input_thresholds"])
            if complete and (score is None or not thresholds):
                raise ProfileError("the profile has no calibrated score thresholds")
            return cls(
                features=d, mean=vec(data["mean"]), std=std, grid=grid, knots=knots,
                tail_slopes=tails,
                low=vec(data["bounds"]["low"]), high=vec(data["bounds"]["high"]),
                whitening=whitening, joint=joint, single=single, thresholds=thresholds,
                prada_thresholds=tuple((float(f), float(t))
                                       for f, t in usage["prada_thresholds"]),
                usage_window=int(usage["window"]), usage_memory=int(usage["memory"]),
                projection=(None if projection is None
                            else np.asarray(projection, dtype=np.float64).reshape(d, -1)),
                single_change_rate=float(usage["single_change_rate"]),
                output=output, meta=dict(data.get("meta") or {}))
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ProfileError(f"malformed profile: {type(err).__name__}: {err}") from err

    def to_json(self) -> bytes:
        """RFC 8785 canonical JSON: the same profile always gives the same bytes (signable)."""
        return rfc8785.dumps(self.to_dict()) + b"\n"

    def save(self, path: Path) -> None:
        """Write ``path`` atomically (temp file, fsync, rename)."""
        from gateway._atomic import write_atomic

        write_atomic(Path(path), self.to_json())

    @classmethod
    def from_json(cls, raw: bytes, source: str = "profile.json") -> InputProfile:
        """Parse profile bytes, e.g. the very bytes whose signature was verified (no re-read,
        so no window between verification and use)."""
        import json

        try:
            data = json.loads(raw)
        except ValueError as err:
            raise ProfileError(f"{source}: unreadable profile: {err}") from err
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: a profile is a JSON object")
        try:
            return cls.from_dict(data)
        except ProfileError as err:
            raise ProfileError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: Path) -> InputProfile:
        """Read a profile; :class:`ProfileError` names the file and what is wrong."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise ProfileError(f"{path}: no such profile") from err
        except OSError as err:
            raise ProfileError(f"{path}: unreadable profile: {err}") from err
        return cls.from_json(raw, str(path))


def _bounds(fit: np.ndarray, every: np.ndarray, knots: np.ndarray, grid: np.ndarray,
            margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Hard bounds per feature, with margins calibrated on the tails of the fitting rows.

    Beyond each outer knot (tail probability ``p``) the excesses of the fitting rows are taken
    as exponential with their mean ``beta`` (a heavier tail than a Gaussian's), and the bound is
    where that tail leaves ``BOUND_TAIL``: ``knot + beta * ln(p / BOUND_TAIL)``. A bound never
    lies inside the whole reference range (``every``) widened by ``margin`` of itself, so every
    reference row is in bounds and a discrete feature keeps some slack.
    """
    spread = math.log(_NORMAL.cdf(-float(grid[-1])) / BOUND_TAIL)

    def mean_excess(values: np.ndarray, knot: np.ndarray) -> np.ndarray:
        beyond = values > knot
        return np.where(beyond, values - knot, 0.0).sum(axis=0) / np.maximum(beyond.sum(0), 1)

    lo, hi = every.min(axis=0), every.max(axis=0)
    span = hi - lo
    high = np.maximum(knots[:, -1] + mean_excess(fit, knots[:, -1]) * spread, hi + margin * span)
    low = np.minimum(knots[:, 0] - mean_excess(-fit, -knots[:, 0]) * spread, lo - margin * span)
    # Stored with 10 significant digits: widen past the rounding, so a constant feature's
    # own value stays in bounds.
    slack = 1e-9 * np.maximum(np.abs(low), np.abs(high))
    return low - slack, high + slack


def _cross_check(joint: np.ndarray, single: np.ndarray, fprs: tuple[float, ...],
                 rng: np.random.Generator) -> list[tuple[float, float]]:
    """False-positive rates achieved out of sample, per target: two-fold on the held-out rows.

    Surprise maps and thresholds are calibrated on one half and the rate is measured on the
    other, then the halves swap; the mean of the two is what ``gateway model profile``
    prints beside each target (the profile's own thresholds use all held-out rows).
    """
    order = rng.permutation(len(joint))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    rates = np.zeros(len(fprs))
    for cal, test in (halves, halves[::-1]):
        jm, sm = SurpriseMap.fit(joint[cal]), SurpriseMap.fit(single[cal])
        table = calibrate(np.maximum(jm(joint[cal]), sm(single[cal])), fprs)
        scores = np.maximum(jm(joint[test]), sm(single[test]))
        rates += [float((scores > t).mean()) for _, t in table]
    return [(f, round(float(r) / 2, 6)) for f, r in zip(fprs, rates, strict=True)]


def _min_prior_distances(u: np.ndarray, memory: int) -> np.ndarray:
    """For each query i >= 1 of a stream, its distance to the nearest of the ``memory`` before.

    The monitor records distances only once a caller's memory is full, which is what the
    calibration stream's last ``window`` distances see too.
    """
    sq = (u**2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * u @ u.T, 0.0)
    i, j = np.indices(d2.shape)
    d2[(j >= i) | (i - j > memory)] = np.inf
    return np.sqrt(d2[1:].min(axis=1))


def _calibrate_prada(profile: InputProfile, held: np.ndarray, fprs: tuple[float, ...],
                     rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    """W thresholds from simulated benign callers, each sending held-out rows in random order.

    log(1 - W) is close to normal (Royston's normalising transform), so a normal fit to the
    simulated values gives a tail quantile at small FPRs that 300 simulations alone cannot.
    """
    length = profile.usage_memory + profile.usage_window
    u_all = profile.usage_space(profile.standardise(held))
    stats = []
    for _ in range(_PRADA_SIMULATIONS):
        pick = rng.choice(len(held), size=length + 1, replace=False)
        dist = _min_prior_distances(u_all[pick], profile.usage_memory)
        stats.append(dist[-profile.usage_window:])
    w = shapiro_w(np.array(stats))
    t = np.log(np.maximum(1 - w, 1e-12))
    mu, sd = float(t.mean()), float(t.std(ddof=1))
    out = []
    for f in fprs:
        if len(w) * f >= 10:  # enough simulated windows in the tail: empirical quantile
            out.append((f, _quantile(w, f)))
        else:
            out.append((f, 1 - math.exp(mu + NormalDist().inv_cdf(1 - f) * sd)))
    return tuple(out)


def _fit_output(fit_rows: np.ndarray, hold_rows: np.ndarray, window: int,
                fprs: tuple[float, ...], rng: np.random.Generator) -> OutputProfile:
    edges: tuple[float, ...]
    if fit_rows.shape[1] > 1:
        kind, classes, edges = "class", fit_rows.shape[1], ()
    else:
        kind = "value"
        qs = np.quantile(fit_rows[:, 0].astype(np.float64), np.linspace(0.1, 0.9, 9))
        edges = tuple(float(e) for e in np.unique(_round(qs)))
        classes = len(edges) + 1
    draft = OutputProfile(kind, classes, edges, np.ones(classes) / classes, window, ())
    ref_counts = np.bincount(draft.bins(fit_rows), minlength=classes).astype(np.float64)
    reference = (ref_counts + 0.5) / (ref_counts.sum() + 0.5 * classes)
    reference = np.asarray(_round(reference))
    hold_bins = draft.bins(hold_rows)
    p_hold = np.bincount(hold_bins, minlength=classes) / len(hold_bins)
    windows = rng.multinomial(window, p_hold, size=_PSI_SIMULATIONS)
    psi = _psi(windows, reference)
    thresholds = tuple((f, _quantile(psi, 1 - f)) for f in fprs)
    return OutputProfile(kind, classes, edges, reference, window, thresholds)
