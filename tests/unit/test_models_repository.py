"""The model repository refuses model directories that lead outside it."""

from __future__ import annotations

import os

import onnxruntime as ort

from gateway.models import LOADED, REFUSED, ModelRepository
from gateway.models.demo import build_demo_repository


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def test_symlinked_model_directories_and_files_are_refused(tmp_path):
    outside = tmp_path / "outside"
    build_demo_repository(outside)
    repo = tmp_path / "models"
    build_demo_repository(repo)
    os.symlink(outside / "demo-mlp", repo / "linked-model")
    (repo / "linked-file" / "1").mkdir(parents=True)
    os.symlink(outside / "demo-mlp" / "1" / "model.onnx", repo / "linked-file" / "1" / "model.onnx")
    events = []
    models = ModelRepository(repo, session_options=_options, verify=None,
                             on_event=lambda kind, fields: events.append(kind))
    states = {(e.name, e.version): (e.state, e.reason) for e in models.load_all()}
    assert states[("demo-mlp", "1")][0] == LOADED
    assert states[("linked-model", "1")][0] == REFUSED
    assert "symbolic link" in states[("linked-model", "1")][1]
    assert states[("linked-file", "1")][0] == REFUSED
    assert models.get("linked-model") is None
    assert events.count("model_refused") == 2


def test_reverify_takes_a_changed_model_out_of_service_and_others_keep_serving(tmp_path):
    from gateway.models.signing import (
        SigningSettings,
        TrustRule,
        ensure_demo_signing_key,
        sign_model,
        verifier,
    )

    repo = tmp_path / "models"
    build_demo_repository(repo)
    key, pub = ensure_demo_signing_key(tmp_path / "keys")
    for directory in (repo / "demo-mlp" / "1", repo / "demo-types" / "1"):
        sign_model(directory, key=key)
    settings = SigningSettings(trust=(TrustRule(name="test", pubkey=pub),))
    models = ModelRepository(repo, session_options=_options, verify=verifier(settings))
    assert {e.state for e in models.load_all()} == {LOADED}
    assert models.reverify() == []  # nothing changed: nothing to do
    with open(repo / "demo-types" / "1" / "metadata.toml", "a") as f:
        f.write("# changed after signing\n")
    changed = models.reverify()
    assert [(e.name, e.state) for e in changed] == [("demo-types", REFUSED)]
    assert "metadata.toml" in changed[0].reason
    assert models.get("demo-types") is None
    assert models.get("demo-mlp") is not None


def test_a_large_external_weight_file_is_read_once_hashed_and_served_from_memory(tmp_path):
    """Above 64 MiB a file is read by one thread while another hashes it: the digest, the
    bytes and the served weights are those of the file."""
    import hashlib

    import numpy as np
    from onnx import TensorProto, helper

    from gateway.models._files import read_model_dir

    directory = tmp_path / "models" / "wide" / "1"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, (66 << 20) // 16)).astype(np.float32)  # 66 MiB
    (directory / "weights.bin").write_bytes(b"\0" * 64 + w.tobytes())  # offset 64
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(w.shape),
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "64"),
                       ("length", str(w.nbytes))):
        t.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [1, w.shape[1]])], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    read = read_model_dir(directory)
    raw = (directory / "weights.bin").read_bytes()
    assert read.digests["weights.bin"] == hashlib.sha256(raw).hexdigest()
    assert read.files["weights.bin"] == raw
    models = ModelRepository(tmp_path / "models", session_options=_options, verify=None)
    loaded = models.load("wide", "1").model
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    assert np.allclose(loaded.run({"x": x}, [])["y"], x @ w, rtol=1e-4, atol=1e-4)


def test_demo_signatures_made_before_subject_binding_are_dropped_for_re_signing(tmp_path):
    from gateway.models.signing import ensure_demo_signing_key, sign_model

    repo = tmp_path / "models"
    build_demo_repository(repo)
    key, _ = ensure_demo_signing_key(tmp_path / "keys")
    old, bound = repo / "demo-mlp" / "1", repo / "demo-types" / "1"
    sign_model(old, key=key, subject="1")  # as signatures were made before
    sign_model(bound, key=key)
    assert build_demo_repository(repo) == []  # nothing rebuilt...
    assert not (old / "model.sig").exists()  # ...but the stale signature goes
    assert (bound / "model.sig").exists()


def test_model_names_and_versions_are_matched_whole():
    """A trailing newline (which `$` would let through) or any other extra is refused: names
    and versions become paths, and LoadModel/UnloadModel and replicated changes name them."""
    import pytest

    from gateway.errors import ModelUnavailable
    from gateway.models._repository import check_name

    check_name("demo-mlp", "1")
    for name, version in (("demo-mlp\n", "1"), ("demo-mlp", "1\n"), ("../x", "1"),
                          ("demo-mlp", "1/../2"), ("", "1")):
        with pytest.raises(ModelUnavailable):
            check_name(name, version)


def test_reverify_of_an_unsigned_model_reloads_it_only_when_its_files_changed(tmp_path):
    """Re-verification reads without keeping the bytes; the unsigned digest it computes
    must be the load's, or every interval would reload every unsigned model."""
    repo = tmp_path / "models"
    build_demo_repository(repo)
    models = ModelRepository(repo, session_options=_options, verify=None)
    assert {e.state for e in models.load_all()} == {LOADED}
    assert models.reverify() == []
    with open(repo / "demo-types" / "1" / "metadata.toml", "a") as f:
        f.write("# changed\n")
    changed = models.reverify()
    assert [(e.name, e.state) for e in changed] == [("demo-types", LOADED)]
    assert models.reverify() == []
