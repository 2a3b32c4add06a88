"""Shapiro-Wilk W statistic, numpy only (no p-value: callers calibrate thresholds on W).

Coefficients follow Royston's approximation, P. Royston (1992), "Approximating the
Shapiro-Wilk W-test for non-normality", Statistics and Computing 2:117-119, as implemented in
algorithm AS R94 (Royston 1995, Applied Statistics 44:547-551) for 6 <= n <= 5000:

    m_i = Phi^-1((i - 3/8) / (n + 1/4)),  c = m / ||m||,  u = 1/sqrt(n)
    a_n     = c_n     + 0.221157u - 0.147981u^2 - 2.071190u^3 + 4.434685u^4 - 2.706056u^5
    a_{n-1} = c_{n-1} + 0.042981u - 0.293762u^2 - 1.752461u^3 + 5.682633u^4 - 3.582633u^5
    a_i     = m_i / sqrt(phi) for the inner i, phi = (m'm - 2m_n^2 - 2m_{n-1}^2)
                                                     / (1 - 2a_n^2 - 2a_{n-1}^2)
    W = (sum a_i x_(i))^2 / sum (x_i - mean)^2

The gateway uses W the way PRADA does (Juuti et al. 2019, "PRADA: Protecting against DNN Model
Stealing Attacks", EuroS&P): a low W on a caller's nearest-neighbour query distances means the
distances are far from normal, the signature of synthetic, step-wise queries.
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import numpy as np

_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)


@functools.lru_cache(maxsize=64)
def _coefficients(n: int) -> np.ndarray:
    """The a_i of AS R94 for sample size n (antisymmetric, ascending order)."""
    if not 6 <= n <= 5000:
        raise ValueError(f"Shapiro-Wilk approximation needs 6 <= n <= 5000, got {n}")
    inv = NormalDist().inv_cdf
    m = np.array([inv((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)])
    mm = float(m @ m)
    c = m / np.sqrt(mm)
    u = 1.0 / np.sqrt(n)
    an = c[-1] + np.polyval(_C1[::-1], u)
    an1 = c[-2] + np.polyval(_C2[::-1], u)
    phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
    a = m / np.sqrt(phi)
    a[-1], a[-2] = an, an1
    a[0], a[1] = -an, -an1
    a.setflags(write=False)
    return a


def shapiro_w(x: np.ndarray) -> np.ndarray:
    """W for each row of ``x`` (shape (..., n)); 1.0 for constant rows (no evidence either way)."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    a = _coefficients(x.shape[-1])
    num = (x @ a) ** 2
    den = ((x - x.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return np.minimum(w, 1.0)
