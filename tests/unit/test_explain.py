"""Explain correctness on real ONNX Runtime models, and the evaluation budget."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway.errors import InvalidRequest, QuotaExceeded
from gateway.explain import ExplainBudgets, explain, planned_evaluations

OPSET = [helper.make_opsetid("", 17)]


def linear_session(w: np.ndarray, c: float, dtype: type = np.float32) -> ort.InferenceSession:
    """y = x @ w + c as an ONNX model (MatMul + Add), served by ONNX Runtime."""
    elem = TensorProto.FLOAT if dtype is np.float32 else TensorProto.DOUBLE
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "c"],
                                                                          ["y"])],
        "linear", [helper.make_tensor_value_info("x", elem, ["N", len(w)])],
        [helper.make_tensor_value_info("y", elem, ["N", 1])],
        [numpy_helper.from_array(w.reshape(-1, 1).astype(dtype), "w"),
         numpy_helper.from_array(np.array([c], dtype=dtype), "c")])
    model = helper.make_model(graph, opset_imports=OPSET)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def runner(sess: ort.InferenceSession, calls: list[int] | None = None):
    def run(rows: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(len(rows))
        return sess.run(["y"], {"x": rows})[0][:, 0]
    return run


@pytest.fixture
def linear_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(3)
    w = rng.normal(size=8).astype(np.float32)
    w[5] = 0.0  # a feature the model ignores
    x = rng.normal(size=8).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32) * 0.5
    return w, x, b, 0.25


@pytest.mark.parametrize("method", ["occlusion", "kernel_shap"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_model_attributions_are_w_times_delta(linear_case, method, dtype) -> None:
    w, x, b, c = linear_case
    sess = linear_session(w, c, dtype)
    res = explain(runner(sess), x.astype(dtype), b.astype(dtype), method=method)
    expected = w.astype(np.float64) * (x.astype(dtype).astype(np.float64) - b.astype(np.float64))
    np.testing.assert_allclose(res.attributions, expected, atol=1e-5, rtol=0)
    assert abs(res.attributions[5]) < 1e-6  # zero weight, zero attribution
    fx = float(sess.run(["y"], {"x": x.astype(dtype)[None]})[0][0, 0])
    fb = float(sess.run(["y"], {"x": b.astype(dtype)[None]})[0][0, 0])
    assert res.prediction == pytest.approx(fx) and res.baseline_prediction == pytest.approx(fb)
    expected_evals = 8 + 2 if method == "occlusion" else 2**8 - 2 + 2
    assert res.evaluations == expected_evals == planned_evaluations(method, 8, 0)


def test_kernel_shap_is_efficient(linear_case) -> None:
    w, x, b, c = linear_case
    res = explain(runner(linear_session(w, c)), x, b, method="kernel_shap")
    assert res.attributions.sum() == pytest.approx(res.prediction - res.baseline_prediction,
                                                   abs=1e-9)


def test_sampled_kernel_shap_many_features_is_seeded(linear_case) -> None:
    rng = np.random.default_rng(11)
    m = 40
    w = rng.normal(size=m).astype(np.float32)
    w[7] = 0.0
    x = rng.normal(size=m).astype(np.float32)
    b = np.zeros(m, dtype=np.float32)
    calls: list[int] = []
    sess = linear_session(w, -1.0)
    res = explain(runner(sess, calls), x, b, method="kernel_shap", samples=300, seed=5,
                  batch_size=64)
    np.testing.assert_allclose(res.attributions, w * x.astype(np.float64), atol=1e-5)
    assert abs(res.attributions[7]) < 1e-5
    assert res.attributions.sum() == pytest.approx(res.prediction - res.baseline_prediction,
                                                   abs=1e-9)
    assert res.evaluations == 302 == sum(calls) and max(calls) <= 64  # batched
    again = explain(runner(sess), x, b, method="kernel_shap", samples=300, seed=5)
    np.testing.assert_array_equal(again.attributions, res.attributions)  # reproducible
    # the default for many features is sampled, not 2^40 evaluations
    assert planned_evaluations("kernel_shap", m, 0) == 2048 + 2 * m + 2


def _shapley_by_definition(f, x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """phi_i = sum over S not containing i of |S|!(M-|S|-1)!/M! (f(S+i) - f(S))."""
    m = len(x)

    def value(subset: tuple[int, ...]) -> float:
        z = b.copy()
        z[list(subset)] = x[list(subset)]
        return float(f(z[None])[0])

    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for k in range(m):
            for subset in combinations(others, k):
                weight = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
                phi[i] += weight * (value((*subset, i)) - value(subset))
    return phi


def test_exact_kernel_shap_equals_shapley_values_of_a_nonlinear_model() -> None:
    def f(rows: np.ndarray) -> np.ndarray:
        return rows[:, 0] * rows[:, 1] + np.maximum(rows[:, 2], 0) - rows[:, 3] ** 2 \
            + 0.5 * rows[:, 1] * rows[:, 2] * rows[:, 4]

    x = np.array([1.5, -2.0, 0.7, 1.1, 3.0])
    b = np.array([0.1, 0.3, -0.4, 0.0, 1.0])
    res = explain(f, x, b, method="kernel_shap")
    np.testing.assert_allclose(res.attributions, _shapley_by_definition(f, x, b), atol=1e-9)


def test_budget_refuses_before_evaluating(linear_case) -> None:
    w, x, b, c = linear_case
    calls: list[int] = []
    with pytest.raises(QuotaExceeded, match="needs 256 model evaluations"):
        explain(runner(linear_session(w, c), calls), x, b, method="kernel_shap", budget=255)
    assert calls == []
    res = explain(runner(linear_session(w, c), calls), x, b, method="occlusion", budget=10)
    assert res.evaluations == 10


def test_bad_requests() -> None:
    def f(rows: np.ndarray) -> np.ndarray:
        return rows.sum(axis=1)

    with pytest.raises(InvalidRequest, match="unknown explanation method"):
        explain(f, np.ones(3), np.zeros(3), method="lime")
    with pytest.raises(InvalidRequest, match="baseline has 2 features"):
        explain(f, np.ones(3), np.zeros(2), method="occlusion")
    with pytest.raises(InvalidRequest, match="one scalar per row"):
        explain(lambda rows: rows, np.ones(3), np.zeros(3), method="occlusion")
    one = explain(f, np.array([2.0]), np.array([0.5]), method="kernel_shap")
    assert one.attributions.tolist() == [1.5] and one.evaluations == 2


def test_budgets_per_caller_refill_and_refund() -> None:
    now = [0.0]
    budgets = ExplainBudgets(100, 10.0, clock=lambda: now[0])
    budgets.reserve("spiffe://demo.local/a", 80)
    with pytest.raises(QuotaExceeded, match="20 of 100"):
        budgets.reserve("spiffe://demo.local/a", 30)
    budgets.reserve("spiffe://demo.local/b", 100)  # callers are independent
    budgets.refund("spiffe://demo.local/a", 5)
    assert budgets.remaining("spiffe://demo.local/a") == 25
    now[0] = 1.0  # 10 evaluations per second refill
    assert budgets.remaining("spiffe://demo.local/a") == 35
    budgets.reserve("spiffe://demo.local/a", 35)
    with pytest.raises(QuotaExceeded, match="larger than the whole budget"):
        budgets.reserve("spiffe://demo.local/c", 101)
    now[0] = 100.0
    assert budgets.remaining("spiffe://demo.local/a") == 100
