"""End to end on a real gateway process: Explain under its own policy action, audited with its
cost; hostile models (signed, so only the scanner stands in their way) refused at load while
the demo models keep serving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway._proto.gateway.v1 import explain_pb2, explain_pb2_grpc
from gateway.devenv import GatewayProcess, make_demo_env, start_gateway
from gateway.models.signing import sign_model

OPSET = [helper.make_opsetid("", 17)]


def _bomb() -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([1024, 1024, 1024], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)], "bomb", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])
    return helper.make_model(graph, opset_imports=OPSET)


def _custom() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Evil", ["x"], ["y"], domain="com.evil")], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[*OPSET, helper.make_opsetid("com.evil", 1)])


def _linear_external(d: Path, location: str) -> None:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    onnx.save_model(helper.make_model(graph, opset_imports=OPSET), d / "model.onnx",
                    save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = onnx.load_model(d / "model.onnx", load_external_data=False)
    model.graph.initializer[0].external_data[0].value = location
    (d / "model.onnx").write_bytes(model.SerializeToString())


W = np.array([0.5, -1.0, 0.0, 2.0], dtype=np.float32)  # feature 2 has zero weight
C = 0.125
X = np.array([1.0, 2.0, -3.0, 0.5], dtype=np.float32)


def _linear() -> onnx.ModelProto:
    """y = x·W + C: every attribution method must give W_i·(x_i - b_i)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Add", ["xw", "c"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(W.reshape(4, 1), "w"),
         numpy_helper.from_array(np.array([C], np.float32), "c")])
    return helper.make_model(graph, opset_imports=OPSET)


#: hostile model name -> what its audited refusal must name (the repository's file reader
#: refuses hard links before the scanner sees them; the scanner would say
#: external-data-hardlink)
HOSTILE = {"bomb": "huge-allocation", "custom": "custom-op-domain",
           "dotdot": "external-data-outside", "hardlink": "hard links"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> GatewayProcess:
    env = make_demo_env(tmp_path_factory.mktemp("explain-e2e"))
    key = env.certs / "signing" / "demo-signer.key"
    outside = env.root / "outside.bin"
    outside.write_bytes(np.ones(12, np.float32).tobytes())
    for name in HOSTILE:
        d = env.models / name / "1"
        d.mkdir(parents=True)
        if name == "bomb":
            onnx.save(_bomb(), d / "model.onnx")
        elif name == "custom":
            onnx.save(_custom(), d / "model.onnx")
        elif name == "dotdot":
            _linear_external(d, "../../../outside.bin")
            (d / "weights.bin").unlink()
        else:
            _linear_external(d, "weights.bin")
        sign_model(d, key=key)  # validly signed: only the admission scanner refuses them
        if name == "hardlink":  # after signing: the one model reader refuses hard links
            (d / "weights.bin").unlink()
            os.link(outside, d / "weights.bin")
    linear = env.models / "linear" / "1"
    linear.mkdir(parents=True)
    onnx.save(_linear(), linear / "model.onnx")
    sign_model(linear, key=key)
    with (env.policies / "policy.csv").open("a") as fh:
        fh.write("\n# The security team may explain the linear test model too.\n"
                 "p, role:explainers, linear, explain, allow\n")
    gateway = start_gateway(env)
    yield gateway
    gateway.stop()


def _stub(gw: GatewayProcess, identity: str) -> explain_pb2_grpc.ExplainerStub:
    cert, key = gw.env.client_files(identity)
    creds = grpc.ssl_channel_credentials((gw.env.certs / "ca.pem").read_bytes(),
                                         key.read_bytes(), cert.read_bytes())
    channel = grpc.secure_channel(gw.target, creds)
    return explain_pb2_grpc.ExplainerStub(channel)


def _audit_records(gw: GatewayProcess) -> list[dict]:
    records = []
    for path in sorted(gw.env.audit.rglob("*")):
        if not path.is_file():
            continue
        for line in path.read_bytes().rstrip(b"\0").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _request(method: str = "kernel_shap") -> explain_pb2.ExplainRequest:
    x = np.array([0.5, -1.0, 2.0, 0.25], dtype="<f4")
    return explain_pb2.ExplainRequest(
        model_name="demo-mlp", method=method, output_index=1,
        input=explain_pb2.Tensor(name="input", datatype="FP32", shape=[1, 4], raw=x.tobytes()))


def _explain_records(gw: GatewayProcess, caller: str) -> list[dict]:
    return [r for r in _audit_records(gw) if r.get("rpc") == "Explain"
            and r.get("caller", {}).get("id") == caller]


def test_infer_permission_is_not_explain_permission(gw) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _stub(gw, "scorer").Explain(_request(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    (record,) = _explain_records(gw, "spiffe://demo.local/svc/scorer")
    assert record["decision"] == "deny" and record["action"] == "explain"


def test_explain_is_served_and_audited_with_its_cost(gw) -> None:
    res = _stub(gw, "admin").Explain(_request(), timeout=30)
    assert len(res.attributions) == 4 and res.evaluations == 16
    assert sum(res.attributions) == pytest.approx(res.prediction - res.baseline_prediction,
                                                  abs=1e-6)
    record = _explain_records(gw, "spiffe://demo.local/team/security/admin")[-1]
    assert record["decision"] == "allow" and record["status"] == "OK"
    assert record["cost"] == {"evaluations": 16}
    assert record["explain"]["method"] == "kernel_shap"


def test_hostile_models_are_refused_at_load_and_demo_models_serve(gw) -> None:
    refusals = {r["model"]["name"]: r.get("reason", "") for r in _audit_records(gw)
                if r.get("kind") == "model_refused"}
    for name, expected in HOSTILE.items():
        assert expected in refusals.get(name, ""), (name, refusals)
    res = _stub(gw, "admin").Explain(_request("occlusion"), timeout=30)
    assert res.evaluations == 6  # demo-mlp keeps serving next to the refused models


def test_the_explain_budget_is_enforced_and_audited(tmp_path) -> None:
    env = make_demo_env(tmp_path / "budget", explain={"budget_evaluations": 20})
    gateway = start_gateway(env)
    try:
        stub = _stub(gateway, "admin")
        assert stub.Explain(_request(), timeout=30).evaluations == 16
        with pytest.raises(grpc.RpcError) as caught:
            stub.Explain(_request(), timeout=30)  # 16 more would exceed the 20 budgeted
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        gateway.stop()
    records = _explain_records(gateway, "spiffe://demo.local/team/security/admin")
    assert [(r["decision"], r["status"]) for r in records] == \
        [("allow", "OK"), ("deny", "RESOURCE_EXHAUSTED")]
    assert records[-1]["reason"] == "quota"


def _linear_request(x: np.ndarray, method: str = "kernel_shap", **kw) -> explain_pb2.ExplainRequest:
    return explain_pb2.ExplainRequest(
        model_name="linear", model_version="1", method=method,
        input=explain_pb2.Tensor(name="x", datatype="FP32", shape=[1, 4],
                                 raw=x.astype("<f4").tobytes()), **kw)


@pytest.mark.parametrize("method", ["kernel_shap", "occlusion"])
def test_attributions_on_a_linear_model_through_the_gateway(gw, method) -> None:
    baseline = np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    res = _stub(gw, "admin").Explain(_linear_request(X, method, baseline=explain_pb2.Tensor(
        name="x", datatype="FP32", shape=[1, 4], raw=baseline.astype("<f4").tobytes())),
        timeout=30)
    np.testing.assert_allclose(res.attributions, W * (X - baseline), atol=1e-5)
    assert abs(res.attributions[2]) < 1e-9  # zero weight, zero attribution
    assert res.prediction == pytest.approx(float(W @ X + C), abs=1e-5)
    assert sum(res.attributions) == pytest.approx(res.prediction - res.baseline_prediction,
                                                  abs=1e-5)


def test_bad_explain_requests_are_invalid_argument(gw) -> None:
    bad = [
        _linear_request(X, method="lime"),
        explain_pb2.ExplainRequest(model_name="linear", method="occlusion",
                                   input=explain_pb2.Tensor(datatype="FP32", shape=[1, 4],
                                                            raw=b"\0" * 7)),
        explain_pb2.ExplainRequest(model_name="linear", method="occlusion",
                                   input=explain_pb2.Tensor(datatype="FP32", shape=[1, 5],
                                                            raw=b"\0" * 20)),
        _linear_request(np.array([np.nan, 0, 0, 0], np.float32)),
        _linear_request(X, output_name="nope"),
        _linear_request(X, output_index=3),
    ]
    stub = _stub(gw, "admin")
    for request in bad:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Explain(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
