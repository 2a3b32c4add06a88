"""Attribution methods: occlusion and KernelSHAP, over a batched model call.

Both explain one input ``x`` against one ``baseline`` (a single reference point), with
features "absent" meaning "set to the baseline value":

* Occlusion (Zeiler & Fergus 2014, feature ablation): phi_i = f(x) - f(x with x_i := b_i).
* KernelSHAP (Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions",
  Theorem 2): the Shapley values are the solution of a weighted least-squares problem over
  coalitions z in {0,1}^M, with the Shapley kernel
  pi(z) = (M - 1) / (C(M, |z|) * |z| * (M - |z|)), evaluated at h_x(z) = z*x + (1-z)*b,
  and the efficiency constraint sum(phi) = f(x) - f(b) enforced exactly (the empty and full
  coalitions have infinite weight). With few features every coalition is enumerated and the
  result is exact; otherwise coalition sizes are sampled in proportion to their total kernel
  weight, each drawn with its complement (paired sampling), and weighted equally.

For a linear model f(x) = w.x + c both give phi_i = w_i (x_i - b_i).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gateway.errors import InvalidRequest

Run = Callable[[np.ndarray], np.ndarray]

#: Enumerate every coalition up to this many features (2^12 - 2 = 4094 evaluations).
EXACT_MAX_FEATURES = 12
#: Coalition samples when not given and the features are too many to enumerate.
DEFAULT_SAMPLES = 2048


def kernel_shap_plan(m: int, samples: int) -> tuple[bool, int]:
    """(exact?, number of coalitions) KernelSHAP will evaluate for ``m`` features."""
    if m <= 1:
        return True, 0
    full = 2**m - 2 if m < 63 else math.inf
    if samples <= 0:
        if m <= EXACT_MAX_FEATURES:
            return True, int(full)
        samples = DEFAULT_SAMPLES + 2 * m
    if samples >= full:
        return True, int(full)
    return False, samples


def planned_evaluations(method: str, m: int, samples: int) -> int:
    """Model evaluations a call will cost at most (known before any is made)."""
    if method == "occlusion":
        return m + 2
    if method == "kernel_shap":
        return kernel_shap_plan(m, samples)[1] + 2
    raise InvalidRequest(f"unknown explanation method {method!r}; "
                         "use 'occlusion' or 'kernel_shap'")


class Evaluator:
    """Calls ``run`` on rows in batches and counts the evaluations."""

    def __init__(self, run: Run, batch_size: int) -> None:
        self._run = run
        self._batch = max(1, batch_size)
        self.count = 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        for start in range(0, len(rows), self._batch):
            chunk = rows[start:start + self._batch]
            y = np.asarray(self._run(chunk))
            if y.size != len(chunk):
                raise InvalidRequest(f"the explained output gave {y.size} values for "
                                     f"{len(chunk)} rows; it must be one scalar per row")
            out[start:start + len(chunk)] = y.reshape(-1)
            self.count += len(chunk)
        return out


def occlusion(evaluate: Evaluator, x: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float,
                                                                         float]:
    m = x.size
    rows = np.repeat(x[None, :], m + 2, axis=0)
    rows[1] = b
    idx = np.arange(m)
    rows[idx + 2, idx] = b  # row i+2: x with feature i set to the baseline
    y = evaluate(rows)
    return y[0] - y[2:], float(y[0]), float(y[1])


def _shapley_kernel(m: int, s: np.ndarray) -> np.ndarray:
    comb = np.array([math.comb(m, k) for k in range(m + 1)], dtype=np.float64)
    return (m - 1) / (comb[s] * s * (m - s))


def _all_coalitions(m: int) -> np.ndarray:
    """Every coalition but the empty and the full one: the bits of 1 .. 2^m - 2."""
    codes = np.arange(1, 2**m - 1, dtype=np.int64)
    return ((codes[:, None] >> np.arange(m, dtype=np.int64)) & 1).astype(bool)


def _sampled_coalitions(m: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired samples with sizes drawn by total kernel weight; returns (coalitions, counts)."""
    rng = np.random.default_rng(seed)
    sizes = np.arange(1, m)
    p = (m - 1) / (sizes * (m - sizes))
    p = p / p.sum()
    counts: dict[bytes, int] = {}
    order: list[np.ndarray] = []
    draws = 0
    while len(order) < samples and draws < 50 * samples:
        draws += 1
        z = np.zeros(m, dtype=bool)
        z[rng.choice(m, size=int(rng.choice(sizes, p=p)), replace=False)] = True
        for c in (z, ~z):
            key = np.packbits(c).tobytes()
            if key not in counts:
                if len(order) >= samples:
                    continue
                counts[key] = 0
                order.append(c)
            counts[key] += 1
    weights = np.array([counts[np.packbits(c).tobytes()] for c in order], dtype=np.float64)
    return np.array(order, dtype=bool), weights


def kernel_shap(evaluate: Evaluator, x: np.ndarray, b: np.ndarray, samples: int,
                seed: int) -> tuple[np.ndarray, float, float]:
    m = x.size
    exact, _n = kernel_shap_plan(m, samples)
    if m <= 1:
        y = evaluate(np.stack([x, b]))
        return np.array([y[0] - y[1]])[:m], float(y[0]), float(y[1])
    if exact:
        z = _all_coalitions(m)
        weights = _shapley_kernel(m, z.sum(axis=1))
    else:
        z, weights = _sampled_coalitions(m, _n, seed)
    rows = np.where(z, x[None, :], b[None, :]).astype(x.dtype, copy=False)
    y = evaluate(np.concatenate([np.stack([x, b]), rows]))
    fx, fb, fz = y[0], y[1], y[2:]
    delta = fx - fb
    # Eliminate phi_M with the constraint: y_z - z_M*delta = sum_{i<M} (z_i - z_M) phi_i.
    zf = z.astype(np.float64)
    design = zf[:, :-1] - zf[:, -1:]
    target = (fz - fb) - zf[:, -1] * delta
    head = _weighted_least_squares(design, target, weights)
    phi = np.append(head, delta - head.sum())
    return phi, float(fx), float(fb)


def _weighted_least_squares(a: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin_b sum w (y - a b)^2 by the normal equations (M-1 square: fast and, for the
    coalition designs here, well conditioned); SVD least squares if they are singular."""
    aw = a * w[:, None]
    gram = a.T @ aw
    try:
        if np.linalg.cond(gram) < 1e10:
            return np.linalg.solve(gram, aw.T @ y)
    except np.linalg.LinAlgError:
        pass
    sw = np.sqrt(w)
    return np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)[0]
