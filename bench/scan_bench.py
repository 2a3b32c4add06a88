"""Admission scan and explanation cost, side by side with their plain baselines.

    python -m bench scan             (or `make bench`, which calls run())

- scan: ``scan_model`` (isolated child, the default; and in-process) on a model with
  256 MiB of external weights vs the baseline ``onnx.load`` + ``onnx.checker.check_model``
  of the same model in-process (what loading and checking costs anyway).
- scan (tiny model): the fixed cost of the contained child vs in-process.
- explain: KernelSHAP (exact, 12 features: 4094 coalitions) and occlusion on an MLP vs
  one plain ``session.run`` over the same number of rows (the model's own cost).
Best of REPEAT alternating runs of each.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gateway.explain import explain
from gateway.models.scan import ScanSettings, scan_model

REPEAT = 3


def _best(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _mlp(features: int, hidden: int, rows_of_weights: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(features, hidden)).astype(np.float32),
                                     "w1"),
             numpy_helper.from_array(rng.normal(size=(hidden, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"],
                                                                              ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    if rows_of_weights:
        inits.append(numpy_helper.from_array(
            np.ones((rows_of_weights, 1024), dtype=np.float32), "unused_weights"))
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scan_figures(tmp: Path) -> None:
    big = tmp / "big"
    big.mkdir()
    onnx.save_model(_mlp(16, 64, rows_of_weights=64 * 1024), big / "model.onnx",
                    save_as_external_data=True, location="weights.bin")
    mib = sum(p.stat().st_size for p in big.iterdir()) / 2**20
    settings = ScanSettings(memory_limit_bytes=2 * 1024**3)

    def baseline() -> None:
        model = onnx.load_model(big / "model.onnx")
        onnx.checker.check_model(model)

    t_base = _best(baseline)
    t_iso = _best(lambda: scan_model(big, settings))
    t_inproc = _best(lambda: scan_model(big, ScanSettings(memory_limit_bytes=2 * 1024**3,
                                                          isolate=False)))
    print(f"scan {mib:.0f} MiB model: isolated {t_iso * 1e3:.0f} ms, in-process "
          f"{t_inproc * 1e3:.1f} ms, load+check baseline {t_base * 1e3:.0f} ms "
          f"-> {t_iso / t_base:.2f}x / {t_inproc / t_base:.2f}x of the baseline")

    tiny = tmp / "tiny"
    tiny.mkdir()
    onnx.save(_mlp(4, 8), tiny / "model.onnx")
    t_iso = _best(lambda: scan_model(tiny))
    t_inproc = _best(lambda: scan_model(tiny, ScanSettings(isolate=False)))
    print(f"scan tiny model: isolated {t_iso * 1e3:.0f} ms vs in-process "
          f"{t_inproc * 1e3:.1f} ms -> the contained child costs {t_iso / t_inproc:.0f}x "
          f"({(t_iso - t_inproc) * 1e3:.0f} ms per model load)")


def _explain_figures() -> None:
    features = 12
    sess = ort.InferenceSession(_mlp(features, 64).SerializeToString(),
                                providers=["CPUExecutionProvider"])

    def run(rows: np.ndarray) -> np.ndarray:
        return sess.run(["y"], {"x": rows})[0][:, 0]

    rng = np.random.default_rng(1)
    x = rng.normal(size=features).astype(np.float32)
    b = np.zeros(features, np.float32)
    for method in ("kernel_shap", "occlusion"):
        res = explain(run, x, b, method=method)
        rows = rng.normal(size=(res.evaluations, features)).astype(np.float32)
        t_ours = _best(lambda m=method: explain(run, x, b, method=m))
        t_base = _best(lambda r=rows: sess.run(["y"], {"x": r}))
        print(f"explain {method} ({res.evaluations} evaluations): {t_ours * 1e3:.2f} ms vs "
              f"plain run of as many rows {t_base * 1e3:.2f} ms -> {t_ours / t_base:.1f}x")


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _scan_figures(Path(tmp))
    _explain_figures()


if __name__ == "__main__":
    run()
