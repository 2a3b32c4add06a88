"""End to end: request attributes cover the whole request, so a deny rule cannot be steered.

A gateway whose policy denies large requests (by ``request.input_bytes`` and by
``request.batch_size``) and anomalous ones on the multi-input model: each bypass found
before (typed contents uncounted, only the first input's batch read, no anomaly attributes
for multi-input models) is tried, and refused.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway._proto.gateway.v1 import explain_pb2, explain_pb2_grpc
from gateway.devenv import make_demo_env, start_gateway
from tests.conftest import channel_credentials

TYPES = {"bool": ("BOOL", np.bool_), "int8": ("INT8", np.int8), "int16": ("INT16", np.int16),
         "int32": ("INT32", np.int32), "int64": ("INT64", np.int64),
         "uint8": ("UINT8", np.uint8), "uint16": ("UINT16", np.uint16),
         "uint32": ("UINT32", np.uint32), "uint64": ("UINT64", np.uint64),
         "fp16": ("FP16", np.float16), "fp32": ("FP32", np.float32),
         "fp64": ("FP64", np.float64)}
RULES = """
# test rules: at most 64 input bytes on demo-mlp; at most 2 rows and no anomaly on demo-types
p, role:scorers, demo-mlp, infer, deny, request.input_bytes > 64
p, role:scorers, demo-types, infer, deny, request.batch_size > 2
p, role:scorers, demo-types, infer, deny, anomaly.bounds_violation
p, role:explainers, demo-mlp, explain, deny, request.input_bytes > 16
"""


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    env = make_demo_env(tmp_path_factory.mktemp("attributes"))
    with (env.policies / "policy.csv").open("a") as policy:
        policy.write(RULES)
    gw = start_gateway(env)
    channel = grpc.secure_channel(gw.target, channel_credentials(env, "scorer"))
    admin = grpc.secure_channel(gw.target, channel_credentials(env, "admin"))
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    stub.explainer = explain_pb2_grpc.ExplainerStub(admin)  # the admin holds role:explainers
    yield stub
    channel.close()
    admin.close()
    gw.stop()


def _code(stub, request) -> grpc.StatusCode:
    try:
        stub.ModelInfer(request, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def _mlp(rows: int, *, typed: bool) -> pb.ModelInferRequest:
    x = np.linspace(-1, 1, rows * 4, dtype=np.float32).reshape(rows, 4)
    request = pb.ModelInferRequest(model_name="demo-mlp")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[rows, 4])
    if typed:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        request.raw_input_contents.append(x.tobytes())
    return request


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_input_bytes_count_raw_and_typed_contents_alike(stub, typed):
    assert _code(stub, _mlp(4, typed=typed)) == grpc.StatusCode.OK  # 64 bytes
    assert _code(stub, _mlp(5, typed=typed)) == grpc.StatusCode.PERMISSION_DENIED  # 80


def _types(batches: dict[str, int], *, nan: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="demo-types")
    request.outputs.add(name="out_fp32")
    for kind, (datatype, dtype) in TYPES.items():
        rows = batches.get(kind, batches["*"])
        x = np.zeros((rows, 3), dtype=dtype)
        if nan and kind == "fp32":
            x[0, 0] = np.nan
        request.inputs.add(name=f"in_{kind}", datatype=datatype, shape=[rows, 3])
        request.raw_input_contents.append(x.tobytes())
    return request


def test_batch_size_is_read_from_every_input(stub):
    assert _code(stub, _types({"*": 2})) == grpc.StatusCode.OK
    assert _code(stub, _types({"*": 3})) == grpc.StatusCode.PERMISSION_DENIED
    # The bypass: a small first input in front of large ones.
    assert _code(stub, _types({"bool": 1, "*": 3})) == grpc.StatusCode.PERMISSION_DENIED


def test_inputs_disagreeing_on_a_tied_batch_dimension_are_invalid(stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_types({"bool": 1, "*": 2}), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "disagree on dimension 'batch'" in refused.value.details()


def test_a_zero_batch_is_invalid_argument_not_internal(stub):
    request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[b""])
    request.inputs.add(name="input", datatype="FP32", shape=[0, 4])
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch size 0" in refused.value.details()
    assert _code(stub, _types({"*": 0})) == grpc.StatusCode.INVALID_ARGUMENT


def test_anomaly_rules_apply_to_multi_input_models(stub):
    assert _code(stub, _types({"*": 1})) == grpc.StatusCode.OK
    assert _code(stub, _types({"*": 1}, nan=True)) == grpc.StatusCode.PERMISSION_DENIED


def test_explain_gets_the_request_attributes_too(stub):
    """A rule on request.input_bytes holds for explain, whose tensors arrive in another
    message: the input and baseline bytes both count (an absent attribute would make the
    deny rule's condition false and let the call through)."""
    x = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32).tobytes()
    tensor = explain_pb2.Tensor(name="input", datatype="FP32", shape=[1, 4], raw=x)
    request = explain_pb2.ExplainRequest(model_name="demo-mlp", method="occlusion",
                                         input=tensor, output_name="probabilities")
    assert stub.explainer.Explain(request, timeout=30).evaluations > 0  # 16 bytes
    request.baseline.CopyFrom(tensor)  # 32 bytes
    with pytest.raises(grpc.RpcError) as err:
        stub.explainer.Explain(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
