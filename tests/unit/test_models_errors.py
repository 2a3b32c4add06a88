"""Every signing, trust, scan and load error is a gateway error with one status, and what a
caller reads of a model error names no server path and no ONNX Runtime internals."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import gateway.models
from gateway.errors import GatewayError, InvalidRequest, ModelUnavailable
from gateway.models import REFUSED, ModelRepository
from gateway.models._messages import ort_message, redact


def _error_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(gateway.models.__path__, "gateway.models."):
        module = importlib.import_module(info.name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, BaseException) and cls.__module__ == module.__name__]
    return found


def test_every_models_error_derives_from_model_unavailable():
    classes = _error_classes()
    names = {cls.__name__ for cls in classes}
    assert {"SignatureError", "TrustError", "ManifestError", "BundleError", "ModelRefused",
            "ModelFilesError", "ExternalDataError", "EncryptionError"} <= names
    for cls in classes:
        assert issubclass(cls, ModelUnavailable), cls
        assert cls.status == grpc.StatusCode.FAILED_PRECONDITION, cls
    assert issubclass(ModelUnavailable, GatewayError)


def test_caller_text_has_no_server_paths_or_runtime_source_locations():
    class OrtLike(Exception):
        pass

    located = OrtLike("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/"
                      "framework/execution_frame.cc:341 void onnxruntime::Init(int) oops")
    assert ort_message(located) == "ONNX Runtime error FAIL (details in the server log)"
    shaped = OrtLike("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions "
                     "for input: x\n index: 1 Got: 5 Expected: 4")
    assert ort_message(shaped).startswith("INVALID_ARGUMENT: Got invalid dimensions")
    assert redact("cannot read /srv/gw/certs/dev/ca.key: model 'a/b'") == \
        "cannot read <path>: model 'a/b'"


def test_a_refused_model_and_a_failing_run_tell_the_caller_no_internals(tmp_path):
    """An ONNX Runtime load failure and a runtime failure, through the repository."""
    repo = tmp_path / "models"
    bad = repo / "bad" / "1"
    bad.mkdir(parents=True)
    # Valid protobuf, but ONNX Runtime cannot build it (the node's input exists nowhere).
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    (bad / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    good = repo / "good" / "1"
    good.mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (good / "model.onnx").write_bytes(model.SerializeToString())
    models = ModelRepository(repo, session_options=ort.SessionOptions, verify=None)
    entry = models.load("bad", "1")
    assert entry.state == REFUSED and entry.reason.startswith("ONNX Runtime cannot load")
    assert str(tmp_path) not in entry.reason and ".cc:" not in entry.reason
    assert str(bad) in entry.detail or "ONNXRuntimeError" in entry.detail
    assert models.load("good", "1").model is not None
    with pytest.raises(InvalidRequest) as info:  # 4 elements cannot be shaped as 5
        models.get("good").run({"x": np.ones(4, np.float32), "s": np.array([5])}, [])
    message = str(info.value)
    assert ".h:" not in message and "onnxruntime_src" not in message, message
    assert "cannot be reshaped to the requested shape" in message, message
