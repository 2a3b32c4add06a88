"""`gateway model test`: edge inputs in a contained child, determinism, limits, JSON report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway.cli import _model_scan
from gateway.models import robustness
from gateway.models.robustness import RobustnessSettings

OPSET = [helper.make_opsetid("", 17)]
FAST = RobustnessSettings(time_limit=5.0, memory_limit_bytes=256 << 20)


def _save(model: onnx.ModelProto, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, d / "model.onnx")
    return d


def mlp(d: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"],
                                                                          ["h2"]),
         helper.make_node("Relu", ["h2"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["l"]),
         helper.make_node("Softmax", ["l"], ["y"], axis=-1)], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return _save(helper.make_model(graph, opset_imports=OPSET), d)


def unseeded_random(d: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("RandomUniformLike", ["x"], ["noise"]),
         helper.make_node("Add", ["x", "noise"], ["y"])], "noisy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return _save(helper.make_model(graph, opset_imports=OPSET), d)


def hangs(d: Path) -> Path:
    """A Loop of 2^40 iterations: passes the scanner, never finishes."""
    body = helper.make_graph(
        [helper.make_node("Add", ["v", "one"], ["v2"]), helper.make_node("Identity", ["c"],
                                                                        ["co"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("co", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v2", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)], "hang",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(1 << 40, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond")])
    return _save(helper.make_model(graph, opset_imports=OPSET), d)


def memory_hungry(d: Path) -> Path:
    """Tile x [N, 4] by 2^19: 8 MiB per row, 512 MiB at the largest batch (64)."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "reps"], ["t"]),
         helper.make_node("ReduceSum", ["t"], ["y"], keepdims=0)], "hungry",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array([1, 1 << 19], np.int64), "reps")])
    return _save(helper.make_model(graph, opset_imports=OPSET), d)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="gateway")
    verbs = parser.add_subparsers(dest="command").add_parser("model").add_subparsers(
        dest="model_command")
    _model_scan.register(verbs)
    args = parser.parse_args(argv)
    return args.func(args), capsys.readouterr().out


def test_a_normal_mlp_passes(tmp_path: Path) -> None:
    report = robustness.run_model_tests(mlp(tmp_path / "mlp"), FAST)
    assert report["passed"], report["failures"]
    statuses = {c["case"]: c["status"] for c in report["cases"]}
    assert statuses == {"load": "ok", "zeros": "ok", "random": "ok", "nan": "ok", "+inf": "ok",
                        "-inf": "ok", "min": "ok", "max": "ok", "batch": "ok"}
    batch = next(c for c in report["cases"] if c["case"] == "batch")
    assert batch["outputs"][0]["shape"] == [64, 3]
    nan = next(c for c in report["cases"] if c["case"] == "nan")
    assert nan["outputs"][0]["nonfinite"] == 3  # NaN in, NaN out: reported, not a failure
    assert report["determinism"] == {"checked_cases": 2, "deterministic": True}
    sens = report["sensitivity"]
    assert sens["perturbations"] == 8 and 0 < sens["max_gain"] < 100


def test_non_deterministic_model_fails(tmp_path: Path) -> None:
    report = robustness.run_model_tests(unseeded_random(tmp_path / "noisy"), FAST)
    assert not report["passed"]
    assert any("non-deterministic" in f for f in report["failures"])
    assert report["determinism"]["deterministic"] is False


def test_hang_is_killed_at_the_time_limit(tmp_path: Path) -> None:
    report = robustness.run_model_tests(hangs(tmp_path / "hang"),
                                        RobustnessSettings(time_limit=1.0))
    assert not report["passed"]
    assert report["failures"][0].startswith("zeros: timeout")
    assert {c["status"] for c in report["cases"] if c["case"] != "load"} == {"timeout",
                                                                             "not-run"}


def test_memory_limit_is_enforced(tmp_path: Path) -> None:
    d = memory_hungry(tmp_path / "hungry")
    report = robustness.run_model_tests(d, FAST)  # 256 MiB cap < 512 MiB at batch 64
    assert not report["passed"]
    assert [c["status"] for c in report["cases"] if c["case"] == "batch"] == ["memory"]
    assert report["failures"] == [f for f in report["failures"] if f.startswith("batch:")]


def test_runtime_death_is_contained_and_fails(tmp_path: Path) -> None:
    """An address space too small for the runtime kills the child; the parent reports it."""
    report = robustness.run_model_tests(mlp(tmp_path / "mlp"),
                                        RobustnessSettings(address_space_bytes=48 << 20))
    assert not report["passed"]
    assert report["cases"][0]["status"] == "crash"
    assert "the runtime died" in report["failures"][0]


def test_refused_model_is_never_run(tmp_path: Path) -> None:
    shape = numpy_helper.from_array(np.array([1024, 1024, 1024], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], "bomb", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])
    d = _save(helper.make_model(graph, opset_imports=OPSET), tmp_path / "bomb")
    report = robustness.run_model_tests(d, FAST)
    assert not report["passed"] and report["cases"] == []
    assert "huge-allocation" in report["failures"][0]


def test_cli_writes_json_report_and_exit_status(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[robustness]\ntime_limit = 5.0\nmemory_limit_bytes = 268435456\n")
    out_file = tmp_path / "report.json"
    status, out = _cli(["model", "test", str(mlp(tmp_path / "mlp")), "--report", str(out_file),
                        "--config", str(config)], capsys)
    assert status == 0 and "passed" in out and "sensitivity" in out
    doc = json.loads(out_file.read_text())
    assert doc["passed"] is True and doc["limits"]["memory_limit_bytes"] == 268435456
    status, out = _cli(["model", "test", str(unseeded_random(tmp_path / "noisy")), "--report",
                        str(out_file), "--config", str(config)], capsys)
    assert status == 1 and "FAILED" in out and "non-deterministic" in out
    assert json.loads(out_file.read_text())["passed"] is False


def test_demo_models_pass(tmp_path: Path) -> None:
    from gateway.models.demo import build_demo_repository

    for d in build_demo_repository(tmp_path / "models"):
        report = robustness.run_model_tests(d, FAST)
        assert report["passed"], (d, report["failures"])
