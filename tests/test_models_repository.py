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
