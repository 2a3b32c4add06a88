"""Admission scanner: a corpus of hostile and broken models, each refused with its finding.

Every model here is built with onnx.helper in a temporary directory; none is ever run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway.cli import _model_scan
from gateway.errors import GatewayError
from gateway.models.scan import ModelRefused, ScanSettings, scan_model

OPSET = [helper.make_opsetid("", 17)]


def _linear(weights: np.ndarray | None = None) -> onnx.ModelProto:
    w = numpy_helper.from_array(
        weights if weights is not None else np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    return helper.make_model(graph, opset_imports=OPSET)


def _save_external(model: onnx.ModelProto, d: Path, location: str = "weights.bin") -> None:
    """Save with every initializer in ``location`` (as `onnx.save_model` would)."""
    (d / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, d / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)


def _point_external(d: Path, location: str) -> None:
    """Rewrite model.onnx so its external data names ``location`` (keeping offsets)."""
    model = onnx.load_model(d / "model.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    (d / "model.onnx").write_bytes(model.SerializeToString())


def _save(model: onnx.ModelProto, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(model.SerializeToString())
    return d


def _high_codes(d: Path, **settings: object) -> set[str]:
    report = scan_model(d, ScanSettings(**settings))  # type: ignore[arg-type]
    assert report.refused, report.to_json()
    return {f.code for f in report.findings if f.severity == "high"}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `gateway model ...` through this verb family's parser, as gateway.cli.main does."""
    parser = argparse.ArgumentParser(prog="gateway")
    groups = parser.add_subparsers(dest="command", required=True)
    verbs = groups.add_parser("model").add_subparsers(dest="model_command", required=True)
    _model_scan.register(verbs)
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except GatewayError as err:
        print(f"gateway: error: {err.diagnostics()}")
        code = 2
    return code, capsys.readouterr().out


# --- the hostile corpus -------------------------------------------------------------------


def _outside_file(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.arange(12, dtype=np.float32).tobytes())
    return outside


def corpus(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (version dir, the high finding code it must be refused with)."""
    made: dict[str, tuple[Path, str]] = {}
    outside = _outside_file(tmp_path)

    d = tmp_path / "dotdot" / "1"
    _save_external(_linear(), d)
    _point_external(d, "../../outside.bin")
    made["dotdot"] = (d, "external-data-outside")

    d = tmp_path / "absolute" / "1"
    _save_external(_linear(), d)
    _point_external(d, str(outside))
    made["absolute"] = (d, "external-data-outside")

    d = tmp_path / "symlink" / "1"
    _save_external(_linear(), d)
    (d / "weights.bin").unlink()
    (d / "weights.bin").symlink_to(outside)
    made["symlink"] = (d, "model-file-link")

    d = tmp_path / "hardlink" / "1"
    _save_external(_linear(), d)
    (d / "weights.bin").unlink()
    os.link(outside, d / "weights.bin")
    made["hardlink"] = (d, "model-file-link")

    node = helper.make_node("Evil", ["x"], ["y"], domain="com.evil")
    graph = helper.make_graph([node], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[*OPSET, helper.make_opsetid("com.evil", 1)])
    made["custom-domain"] = (_save(model, tmp_path / "custom" / "1"), "custom-op-domain")

    made["gigabytes"] = (_save(_bomb(), tmp_path / "bomb" / "1"), "huge-allocation")
    made["gigabytes-expand"] = (_save(_expand_bomb(), tmp_path / "expand" / "1"),
                                "huge-allocation")

    node = helper.make_node("Relu", ["nowhere"], ["y"])  # input defined by nothing
    graph = helper.make_graph([node], "invalid",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=OPSET)
    made["invalid-graph"] = (_save(model, tmp_path / "invalid" / "1"), "checker")

    model = _linear()
    model.opset_import[0].version = 3
    made["old-opset"] = (_save(model, tmp_path / "opset" / "1"), "opset-out-of-range")
    return made


def _bomb() -> onnx.ModelProto:
    """ConstantOfShape of a constant [1024, 1024, 1024] float: a tiny file asking for 4 GiB."""
    shape = numpy_helper.from_array(np.array([1024, 1024, 1024], dtype=np.int64), "shape")
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=fill),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], "bomb",
        [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])
    return helper.make_model(graph, opset_imports=OPSET)


def _expand_bomb() -> onnx.ModelProto:
    """Expand x to [32768, 32768, N] through a shape computed by Shape+Concat (data propagation)."""
    c = numpy_helper.from_array(np.array([1 << 15], dtype=np.int64), "c")
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["sx"]),
         helper.make_node("Concat", ["c", "c", "sx"], ["shape"], axis=0),
         helper.make_node("Expand", ["x", "shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], "expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [c])
    return helper.make_model(graph, opset_imports=OPSET)


def test_corpus_is_refused_each_with_its_finding(tmp_path: Path) -> None:
    for name, (d, code) in corpus(tmp_path).items():
        codes = _high_codes(d)
        assert code in codes, (name, codes)


def test_gigabyte_bomb_is_a_tiny_file(tmp_path: Path) -> None:
    d = _save(_bomb(), tmp_path / "bomb" / "1")
    assert (d / "model.onnx").stat().st_size < 300
    report = scan_model(d)
    (finding,) = [f for f in report.findings if f.code == "huge-allocation"]
    assert "4294967296" in finding.message and "'big'" in finding.message


def test_corpus_is_refused_at_the_cli_with_json(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for name, (d, code) in corpus(tmp_path).items():
        status, out = _cli(["model", "scan", str(d), "--json"], capsys)
        assert status == 1, name
        doc = json.loads(out)
        assert doc["refused"] is True
        (model,) = doc["models"]
        assert model["refused"] is True
        assert code in {f["code"] for f in model["findings"] if f["severity"] == "high"}, name


def test_cli_text_output_and_clean_model(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _save_external(_linear(), tmp_path / "repo" / "lin" / "1")
    _save(_bomb(), tmp_path / "repo" / "bomb" / "1")
    status, out = _cli(["model", "scan", str(tmp_path / "repo" / "lin" / "1")], capsys)
    assert status == 0 and out.strip().endswith(": ok")
    status, out = _cli(["model", "scan", str(tmp_path / "repo")], capsys)  # whole repository
    assert status == 1
    assert "bomb/1: REFUSED" in out and "lin/1: ok" in out and "huge-allocation" in out


def test_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _cli(["model", "scan", str(tmp_path / "missing")], capsys)
    assert status == 2 and "not a directory" in out
    status, out = _cli(["model", "scan", str(tmp_path)], capsys)
    assert status == 2 and "no model.onnx" in out
    bad = tmp_path / "gateway.toml"
    bad.write_text("[scan]\nmax_batch = 'lots'\n")
    _save(_linear(), tmp_path / "m" / "1")
    status, out = _cli(["model", "scan", str(tmp_path / "m" / "1"), "--config", str(bad)], capsys)
    assert status == 2 and "max_batch" in out


def test_clean_model_with_external_data_passes(tmp_path: Path) -> None:
    d = tmp_path / "lin" / "1"
    _save_external(_linear(), d)
    report = scan_model(d)
    assert not report.refused, report.to_json()
    assert report.findings == []
    assert report.figures["declared_tensor_bytes"] == 48
    # subdirectories inside the model directory are fine
    d2 = tmp_path / "lin" / "2"
    _save_external(_linear(), d2, location="data/weights.bin")
    assert not scan_model(d2).refused


def test_verified_bytes_are_scanned_not_the_disk(tmp_path: Path) -> None:
    d = tmp_path / "lin" / "1"
    _save_external(_linear(), d)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    # The disk changes after verification: what was verified is still what is scanned.
    (d / "model.onnx").write_bytes(_bomb().SerializeToString())
    (d / "weights.bin").write_bytes(b"")
    assert not scan_model(d, files=files).refused
    # ...and hostile verified bytes are refused even though the disk now looks clean.
    clean = _linear().SerializeToString()
    (d / "model.onnx").write_bytes(clean)
    report = scan_model(d, files={"model.onnx": _bomb().SerializeToString()})
    assert "huge-allocation" in report.codes()


def test_verified_bytes_must_include_external_data(tmp_path: Path) -> None:
    d = tmp_path / "lin" / "1"
    _save_external(_linear(), d)
    files = {"model.onnx": (d / "model.onnx").read_bytes()}
    assert "external-data-missing" in scan_model(d, files=files).codes()
    files["weights.bin"] = b"\0" * 8  # too short for the 48 bytes declared
    assert "external-data-range" in scan_model(d, files=files).codes()
    assert "model-missing" in scan_model(d, files={}).codes()


def test_symlinked_directory_component_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    d = tmp_path / "m" / "1"
    _save_external(_linear(), d, location="data/weights.bin")
    (d / "data" / "weights.bin").unlink()
    (d / "data").rmdir()
    (d / "data").symlink_to(elsewhere, target_is_directory=True)
    assert "model-file-link" in _high_codes(d)


def test_hard_links_are_refused_even_inside_the_directory(tmp_path: Path) -> None:
    """The one reader refuses every hard-linked file: the serving path always did."""
    d = tmp_path / "m" / "1"
    _save_external(_linear(), d)
    os.link(d / "weights.bin", d / "copy.bin")
    assert "model-file-link" in _high_codes(d)


def test_model_file_itself_may_not_be_a_link(tmp_path: Path) -> None:
    real = _save(_linear(), tmp_path / "real")
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    (d / "model.onnx").symlink_to(real / "model.onnx")
    assert "model-file-link" in _high_codes(d)
    d2 = tmp_path / "m" / "2"
    d2.mkdir(parents=True)
    os.link(real / "model.onnx", d2 / "model.onnx")
    assert "model-file-link" in _high_codes(d2)


def test_broken_files(tmp_path: Path) -> None:
    d = tmp_path / "garbage" / "1"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"\xff\xff\xff\xff not a protobuf")
    assert "parse-error" in _high_codes(d)
    assert "model-missing" in _high_codes(tmp_path / "garbage")
    big = _save(_linear(), tmp_path / "big" / "1")
    assert "file-too-large" in _high_codes(big, max_file_bytes=64)


def test_opset_above_range_and_ml_domain(tmp_path: Path) -> None:
    model = _linear()
    model.opset_import[0].version = 17
    assert "opset-out-of-range" in _high_codes(_save(model, tmp_path / "a"), max_opset=16)
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 9))
    assert "opset-out-of-range" in _high_codes(_save(model, tmp_path / "b"))


def test_allow_lists(tmp_path: Path) -> None:
    d, _ = corpus(tmp_path)["custom-domain"]
    report = scan_model(d, ScanSettings(allowed_domains=("com.evil",)))
    assert "custom-op-domain" not in report.codes()
    lin = _save(_linear(), tmp_path / "lin")
    assert not scan_model(lin, ScanSettings(allowed_operators=("MatMul",))).refused
    assert "operator-not-allowed" in _high_codes(lin, allowed_operators=("Gemm",))


def test_custom_domain_inside_a_subgraph_is_found(tmp_path: Path) -> None:
    inner = helper.make_graph(
        [helper.make_node("Evil", ["x"], ["z"], domain="com.evil")], "then", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["w"])], "else", [],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=other)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=OPSET)
    assert "custom-op-domain" in _high_codes(_save(model, tmp_path / "m"))


def test_declared_initializer_over_the_limit(tmp_path: Path) -> None:
    model = _linear(np.zeros((4, 3), dtype=np.float32))
    assert "huge-allocation" in _high_codes(_save(model, tmp_path / "m"), memory_limit_bytes=16)
    # a tensor whose inline bytes disagree with its declared shape
    model.graph.initializer[0].dims[:] = [4000, 3000]
    assert "initializer-size" in _high_codes(_save(model, tmp_path / "n"))


def test_symbolic_batch_is_taken_at_max_batch(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1024, 1024])])
    d = _save(helper.make_model(graph, opset_imports=OPSET), tmp_path / "m")
    assert not scan_model(d, ScanSettings(max_batch=8)).refused  # 32 MiB per value
    report = scan_model(d, ScanSettings(max_batch=512))  # 2 GiB per value
    assert "huge-allocation" in report.codes()


def test_data_dependent_shape_is_medium(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["s"], ["y"])], "g",
        [helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])])
    d = _save(helper.make_model(graph, opset_imports=OPSET), tmp_path / "m")
    report = scan_model(d)
    assert not report.refused
    assert [f.severity for f in report.findings if f.code == "data-dependent-shape"] == ["medium"]


def test_analysis_child_is_contained(tmp_path: Path) -> None:
    """A checker/inference child that runs out of its memory limit is a finding, not a crash."""
    d = _save(_linear(), tmp_path / "m")
    report = scan_model(d, ScanSettings(analysis_memory_bytes=32 * 1024 * 1024))
    assert "analysis-failed" in report.codes() and report.refused
    # the same analysis in-process agrees with the isolated one on a clean model
    assert scan_model(d, ScanSettings(isolate=False)).findings == scan_model(d).findings
    d2 = _save(_bomb(), tmp_path / "bomb")
    assert "huge-allocation" in scan_model(d2, ScanSettings(isolate=False)).codes()


def test_refusal_error_names_the_findings(tmp_path: Path) -> None:
    d, _ = corpus(tmp_path)["dotdot"]
    report = scan_model(d)
    with pytest.raises(ModelRefused) as caught:
        report.raise_if_refused()
    err = caught.value
    assert err.status.name == "FAILED_PRECONDITION"
    assert "external-data-outside" in str(err) and "'..'" in err.diagnostics()
    scan_model(_save(_linear(), tmp_path / "ok")).raise_if_refused()  # no error


def test_console_script_refuses_the_corpus_and_keeps_the_demo_models(tmp_path: Path) -> None:
    """The installed `gateway model scan` over a repository: each hostile model refused."""
    from gateway.models.demo import build_demo_repository

    made = corpus(tmp_path / "repo")
    demo = build_demo_repository(tmp_path / "repo")
    script = Path(sys.executable).parent / "gateway"
    proc = subprocess.run([str(script), "model", "scan", str(tmp_path / "repo"), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    by_path = {m["path"]: m for m in doc["models"]}
    for name, (d, code) in made.items():
        high = {f["code"] for f in by_path[str(d)]["findings"] if f["severity"] == "high"}
        assert code in high, (name, high)
    for d in demo:
        assert by_path[str(d)]["refused"] is False, by_path[str(d)]


def test_external_data_inside_attributes_and_subgraphs_is_checked(tmp_path: Path) -> None:
    """A Constant node's tensor and a Loop-body initializer can name external files too."""
    value = numpy_helper.from_array(np.ones(4, np.float32), "value")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    for key, val in (("location", "../../../etc/passwd"), ("offset", "0"), ("length", "16")):
        value.external_data.add(key=key, value=val)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=value),
         helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    d = _save(helper.make_model(graph, opset_imports=OPSET), tmp_path / "attr")
    assert "external-data-outside" in _high_codes(d)

    big = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 12])
    big.data_location = TensorProto.EXTERNAL
    big.external_data.add(key="location", value="nowhere.bin")
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["co"]), helper.make_node("Identity", ["v"],
                                                                       ["v2"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("co", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v2", TensorProto.FLOAT, [1])], [big])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], "g",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    d = _save(helper.make_model(graph, opset_imports=OPSET), tmp_path / "loop")
    codes = _high_codes(d)
    assert {"external-data-missing", "huge-allocation"} <= codes, codes
