"""End to end: an unchanged tritonclient against a real gateway process over mutual TLS."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import (
    TEST_MAX_ELEMENTS,
    TEST_MAX_MESSAGE_BYTES,
    channel_credentials,
    triton_client,
)

TYPES = {  # name in demo-types -> (OIP datatype, numpy dtype)
    "bool": ("BOOL", np.bool_), "int8": ("INT8", np.int8), "int16": ("INT16", np.int16),
    "int32": ("INT32", np.int32), "int64": ("INT64", np.int64), "uint8": ("UINT8", np.uint8),
    "uint16": ("UINT16", np.uint16), "uint32": ("UINT32", np.uint32),
    "uint64": ("UINT64", np.uint64), "fp16": ("FP16", np.float16), "fp32": ("FP32", np.float32),
    "fp64": ("FP64", np.float64),
}


@pytest.fixture(scope="module")
def stub(gateway):
    """A raw OIP stub (tritonclient's generated code) for crafting requests by hand."""
    channel = grpc.secure_channel(gateway.target, channel_credentials(gateway.env, "scorer"))
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _mlp_input(batch: int = 2) -> np.ndarray:
    return np.linspace(-1, 1, batch * 4, dtype=np.float32).reshape(batch, 4)


def test_health_and_server_rpcs_for_a_valid_certificate(gateway):
    channel = grpc.secure_channel(gateway.target, channel_credentials(gateway.env, "intruder"))
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
        health_pb2.HealthCheckResponse.SERVING
    channel.close()
    client = triton_client(gateway, "intruder")  # server-level RPCs need only a certificate
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().name == "gateway"


def test_scorer_metadata_and_infer_with_tritonclient(gateway):
    client = triton_client(gateway, "scorer")
    assert client.is_model_ready("demo-mlp")
    meta = client.get_model_metadata("demo-mlp")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == \
        [("input", "FP32", [-1, 4])]
    assert {(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs} == \
        {("probabilities", "FP32", (-1, 3)), ("label", "INT64", (-1,))}
    x = _mlp_input()
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("demo-mlp", [inp])
    session = ort.InferenceSession(str(gateway.env.models / "demo-mlp/1/model.onnx"))
    probs, label = session.run(["probabilities", "label"], {"input": x})
    assert np.array_equal(result.as_numpy("probabilities"), probs)
    assert np.array_equal(result.as_numpy("label"), label)


def test_requested_outputs_are_honoured(gateway):
    client = triton_client(gateway, "scorer")
    x = _mlp_input()
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("demo-mlp", [inp], outputs=[tc.InferRequestedOutput("label")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["label"]


def _code(call) -> grpc.StatusCode:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def test_intruder_is_denied_and_unknown_models_look_the_same(gateway):
    intruder = triton_client(gateway, "intruder")
    x = _mlp_input()
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert _code(lambda: intruder.infer("demo-mlp", [inp])) == "StatusCode.PERMISSION_DENIED"
    assert _code(lambda: intruder.get_model_metadata("demo-mlp")) == \
        "StatusCode.PERMISSION_DENIED"
    scorer = triton_client(gateway, "scorer")
    with pytest.raises(InferenceServerException) as unknown:
        scorer.get_model_metadata("no-such-model")
    with pytest.raises(InferenceServerException) as forbidden:
        intruder.get_model_metadata("no-such-model")
    assert unknown.value.status() == forbidden.value.status() == "StatusCode.PERMISSION_DENIED"
    # Same text for "forbidden" and "absent": names cannot be probed.
    assert unknown.value.message() == forbidden.value.message()


def test_triton_extension_rpcs_are_unimplemented(gateway):
    client = triton_client(gateway, "scorer")
    assert _code(client.get_model_repository_index) == "StatusCode.UNIMPLEMENTED"
    assert _code(lambda: client.get_inference_statistics("demo-mlp")) == \
        "StatusCode.UNIMPLEMENTED"


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_every_datatype_round_trips_bit_exactly(gateway, kind):
    datatype, dtype = TYPES[kind]
    rng = np.random.default_rng(len(kind))
    if dtype is np.bool_:
        x = rng.integers(0, 2, (2, 3)).astype(np.bool_)
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)
    else:
        x = np.array([[np.nan, -np.inf, np.inf], [-0.0, np.finfo(dtype).tiny,
                                                   np.finfo(dtype).max]], dtype=dtype)
    session = ort.InferenceSession(str(gateway.env.models / "demo-types/1/model.onnx"))
    feeds = {f"in_{k}": np.zeros((2, 3), dtype=d) for k, (_, d) in TYPES.items()}
    feeds[f"in_{kind}"] = x
    inputs = []
    for name, array in feeds.items():
        inp = tc.InferInput(name, list(array.shape), TYPES[name[3:]][0])
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = triton_client(gateway, "scorer").infer(
        "demo-types", inputs, outputs=[tc.InferRequestedOutput(f"out_{kind}")])
    expected = session.run([f"out_{kind}"], feeds)[0]
    got = result.as_numpy(f"out_{kind}")
    assert got.dtype == expected.dtype
    assert got.tobytes() == expected.tobytes()
    assert result.get_response().outputs[0].datatype == datatype


def _raw_request(x: np.ndarray, *, datatype: str = "FP32", shape=None, raw=None):
    request = pb.ModelInferRequest(model_name="demo-mlp")
    request.inputs.add(name="input", datatype=datatype, shape=list(shape or x.shape))
    request.raw_input_contents.append(x.tobytes() if raw is None else raw)
    return request


def _typed_request(values, shape):
    request = pb.ModelInferRequest(model_name="demo-mlp")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values)
    return request


def test_typed_contents_are_accepted(stub):
    x = _mlp_input(1)
    response = stub.ModelInfer(_typed_request(x.ravel().tolist(), [1, 4]))
    assert [o.name for o in response.outputs] == ["probabilities", "label"]
    assert len(response.raw_output_contents) == 2  # outputs always go back raw
    assert len(response.raw_output_contents[0]) == 3 * 4


def _mixed_request():
    x = _mlp_input(1)
    request = _typed_request(x.ravel().tolist(), [1, 4])
    request.raw_input_contents.append(x.tobytes())
    return request


def _over_element_limit():
    rows = TEST_MAX_ELEMENTS // 4 + 1
    return _raw_request(np.zeros((rows, 4), dtype=np.float32))


MALFORMED = {
    "wrong datatype": lambda: _raw_request(_mlp_input().astype(np.float64), datatype="FP64"),
    "wrong rank": lambda: _raw_request(_mlp_input(), shape=[8]),
    "wrong feature dim": lambda: _raw_request(np.zeros((2, 5), np.float32)),
    "negative dim": lambda: _raw_request(_mlp_input(), shape=[-2, 4]),
    "short bytes": lambda: _raw_request(_mlp_input(), raw=_mlp_input().tobytes()[:-1]),
    "long bytes": lambda: _raw_request(_mlp_input(), raw=_mlp_input().tobytes() + b"\0"),
    "mixed raw and typed": _mixed_request,
    "typed count mismatch": lambda: _typed_request([1.0, 2.0], [1, 4]),
    "over element limit": _over_element_limit,
    "unknown input": lambda: _renamed_input(),
    "unknown output": lambda: _with_output("logits"),
    "shared memory": lambda: _shared_memory(),
}


def _renamed_input():
    request = _raw_request(_mlp_input())
    request.inputs[0].name = "x"
    return request


def _with_output(name):
    request = _raw_request(_mlp_input())
    request.outputs.add(name=name)
    return request


def _shared_memory():
    request = _raw_request(_mlp_input())
    request.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    return request


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_are_invalid_argument_and_the_server_keeps_serving(stub, case):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(MALFORMED[case]())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "Traceback" not in info.value.details()
    assert "input" in info.value.details() or "output" in info.value.details()
    assert stub.ModelInfer(_raw_request(_mlp_input())).outputs  # still serving


def test_message_over_the_size_limit_is_resource_exhausted(stub):
    big = np.zeros((TEST_MAX_MESSAGE_BYTES // 16 + 16, 4), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_raw_request(big))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ModelInfer(_raw_request(_mlp_input())).outputs


def test_infer_response_carries_an_audit_receipt(stub):
    _, call = stub.ModelInfer.with_call(_raw_request(_mlp_input()))
    trailers = dict(call.trailing_metadata())
    first = int(trailers["gateway-audit-index"])
    assert len(bytes.fromhex(trailers["gateway-audit-leaf-hash"])) == 32
    _, call = stub.ModelInfer.with_call(_raw_request(_mlp_input()))
    assert int(dict(call.trailing_metadata())["gateway-audit-index"]) > first
