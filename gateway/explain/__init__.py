"""Explanations: per-feature attributions of one prediction, as a governed, budgeted action.

    from gateway.explain import explain
    res = explain(run, x, baseline, method="kernel_shap", seed=7)
    res.attributions        # one value per feature; sums to prediction - baseline_prediction

``run`` maps a batch of rows ``[n, features]`` to the explained scalar per row ``[n]``;
evaluations are batched. Methods: ``occlusion`` and ``kernel_shap`` (exact enumeration up
to 12 features, seeded sampling beyond), computed with numpy over ONNX Runtime only.

The server's Explainer servicer (:mod:`gateway.server._explain`) governs and budgets each
call with :class:`ExplainBudgets`; the default baseline is :func:`profile_baseline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.errors import InvalidRequest, QuotaExceeded
from gateway.explain import _methods
from gateway.explain._baseline import profile_baseline
from gateway.explain._budget import ExplainBudgets
from gateway.explain._methods import Run, planned_evaluations
from gateway.explain._settings import ExplainSettings

__all__ = ["ExplainBudgets", "ExplainResult", "ExplainSettings", "explain",
           "planned_evaluations", "profile_baseline"]

METHODS = ("occlusion", "kernel_shap")


@dataclass(frozen=True)
class ExplainResult:
    """Attributions (float64, one per feature) and what they were computed from."""

    attributions: np.ndarray
    prediction: float
    baseline_prediction: float
    evaluations: int
    method: str = ""


def explain(run: Run, x: np.ndarray, baseline: np.ndarray, *, method: str, samples: int = 0,
            seed: int = 0, budget: int | None = None, batch_size: int = 256) -> ExplainResult:
    """Attribute ``run(x) - run(baseline)`` to the features of ``x``.

    ``x`` and ``baseline`` are one row (any shape; flattened to features). ``samples`` is
    the KernelSHAP coalition count (0: exact up to 12 features, else 2048 + 2M);
    ``budget`` caps model evaluations: a call that would need more raises QuotaExceeded
    before evaluating anything.
    """
    if method not in METHODS:
        raise InvalidRequest(f"unknown explanation method {method!r}; use {' or '.join(METHODS)}")
    if samples < 0:
        raise InvalidRequest("samples must not be negative")
    x = np.asarray(x).reshape(-1)
    baseline = np.asarray(baseline).reshape(-1).astype(x.dtype)
    if baseline.size != x.size:
        raise InvalidRequest(f"baseline has {baseline.size} features, input has {x.size}")
    if x.size == 0:
        raise InvalidRequest("the input has no features")
    planned = planned_evaluations(method, x.size, samples)
    if budget is not None and planned > budget:
        raise QuotaExceeded(f"{method} on {x.size} features needs {planned} model evaluations; "
                            f"the budget allows {budget}")
    evaluate = _methods.Evaluator(run, batch_size)
    if method == "occlusion":
        phi, fx, fb = _methods.occlusion(evaluate, x, baseline)
    else:
        phi, fx, fb = _methods.kernel_shap(evaluate, x, baseline, samples, seed)
    return ExplainResult(np.asarray(phi, dtype=np.float64), fx, fb, evaluate.count, method)
