"""`gateway model profile`: a real ONNX model run by ONNX Runtime over reference data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gateway.cli import main
from gateway.monitor import InputProfile, Monitor, MonitorSettings, load_profile


def write_model(directory: Path, features: int = 4, classes: int = 3) -> Path:
    """A softmax classifier: probs = softmax(x @ W)."""
    w = np.random.default_rng(0).standard_normal((features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    return directory


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "models" / "clf" / "1")


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 4)) @ np.array([[1, .5, 0, 0], [0, 1, .5, 0],
                                                   [0, 0, 1, .5], [0, 0, 0, 1.]])
    path = tmp_path / "ref.npy"
    np.save(path, x.astype(np.float32))
    return path


def test_profile_writes_deterministic_signed_ready_json(model_dir, ref, capsys):
    assert main(["model", "profile", str(model_dir), "--data", str(ref),
                 "--fpr", "0.01,0.002", "--drift-window", "100"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "held-out FPR" in out and "re-sign" in out
    # Each calibrated target is printed beside the rate it achieved out of sample.
    table = {float(cols[0]): float(cols[1]) for cols in map(str.split, out.splitlines())
             if len(cols) >= 4 and cols[0][0].isdigit()}
    assert set(table) == {0.001, 0.002, 0.005, 0.01, 0.05}
    assert abs(table[0.01] - 0.01) <= 0.01 and abs(table[0.05] - 0.05) <= 0.015
    first = (model_dir / "profile.json").read_bytes()
    data = json.loads(first)
    assert data["features"] == 4 and data["output"]["kind"] == "class"
    assert data["output"]["classes"] == 3 and data["output"]["window"] == 100
    assert [f for f, _ in data["input_thresholds"]] == [0.001, 0.002, 0.005, 0.01, 0.05]
    # Same inputs, same bytes: a signature over the directory stays meaningful.
    assert main(["model", "profile", str(model_dir), "--data", str(ref),
                 "--fpr", "0.01,0.002", "--drift-window", "100"]) == 0
    assert (model_dir / "profile.json").read_bytes() == first
    assert not list(model_dir.glob("*.tmp"))
    profile = load_profile(model_dir)
    assert isinstance(profile, InputProfile) and profile.output is not None
    m = Monitor(MonitorSettings(metrics_listen="", input_fpr=0.002))
    attrs = m.score("clf/1", profile, "alice", np.load(ref)[:1])
    assert attrs["anomaly.input_threshold"] == profile.threshold(0.002)
    assert not attrs["anomaly.input_alarm"]


def test_profile_without_outputs(model_dir, ref, capsys):
    assert main(["model", "profile", str(model_dir), "--data", str(ref), "--no-outputs"]) == 0
    assert json.loads((model_dir / "profile.json").read_bytes())["output"] is None


@pytest.mark.parametrize(("setup", "message"), [
    ("missing-data", "no such file"),
    ("wrong-features", "expects"),
    ("nan", "NaN or infinite"),
    ("bad-fpr", "--fpr"),
    ("no-model", "no model file"),
    ("pickle", "not a numeric .npy array"),
])
def test_profile_errors_are_clear(model_dir, ref, tmp_path, capsys, setup, message):
    data, args = ref, []
    if setup == "missing-data":
        data = tmp_path / "absent.npy"
    elif setup == "wrong-features":
        data = tmp_path / "wide.npy"
        np.save(data, np.zeros((500, 5), dtype=np.float32))
    elif setup == "nan":
        x = np.load(ref)
        x[3, 1] = np.nan
        data = tmp_path / "nan.npy"
        np.save(data, x)
    elif setup == "bad-fpr":
        args = ["--fpr", "0.9"]
    elif setup == "no-model":
        (model_dir / "model.onnx").unlink()
    elif setup == "pickle":
        data = tmp_path / "obj.npy"
        np.save(data, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code = main(["model", "profile", str(model_dir), "--data", str(data), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (model_dir / "profile.json").exists()
