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
