"""The Explain RPC over real gRPC with mutual TLS, real ONNX Runtime, policy and budget.

The gateway's own Guard lives in gateway.server, which this pytest process must not import;
``_Guard`` below follows its contract (authenticate from the client certificate's SPIFFE ID,
default-deny policy per action, an audit record per call with ``call.fields``) so the
servicer is exercised exactly as the server will drive it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from onnx import TensorProto, helper, numpy_helper

from gateway._proto.gateway.v1 import explain_pb2, explain_pb2_grpc
from gateway.errors import GatewayError, PermissionDenied, Unauthenticated
from gateway.explain import ExplainBudgets, ExplainServicer

W = np.array([0.5, -1.0, 0.0, 2.0], dtype=np.float32)
C = 0.125


# --- a development PKI ----------------------------------------------------------------------

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, san: list[x509.GeneralName] | None,
          ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: bytes
    server: tuple[bytes, bytes]
    clients: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key = _key()
    ca = _cert("test ca", ca_key, None, ca_key, None, ca=True)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    skey = _key()
    server = _cert("localhost", skey, ca, ca_key,
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    out = Pki(pem(ca), (pem(server), _pem_key(skey)))
    for who in ("analyst", "app", "spender"):
        k = _key()
        cert = _cert(who, k, ca, ca_key,
                     [x509.UniformResourceIdentifier(f"spiffe://demo.local/{who}")])
        out.clients[who] = (pem(cert), _pem_key(k))
    return out


# --- the guard contract and a model repository ----------------------------------------------

@dataclass
class _Call:
    identity: str
    fields: dict[str, Any] = field(default_factory=dict)


class _Guard:
    """Authenticate by SPIFFE ID, allow (identity, action) pairs only, audit every call."""

    def __init__(self, allowed: set[tuple[str, str]]) -> None:
        self.allowed = allowed
        self.audit: list[dict[str, Any]] = []

    @contextmanager
    def call(self, context: grpc.ServicerContext, *, rpc: str, action: str, model: str,
             version: str) -> Iterator[_Call]:
        record: dict[str, Any] = {"rpc": rpc, "action": action, "model": model,
                                  "version": version, "identity": None}
        call: _Call | None = None
        try:
            record["identity"] = self._identity(context)
            if (record["identity"], action) not in self.allowed:
                raise PermissionDenied(f"{record['identity']} may not {action} {model}")
            call = _Call(record["identity"])
            yield call
        except GatewayError as err:
            record.update(decision="deny" if call is None else "allow", status=err.status.name,
                          error=str(err), fields=call.fields if call else {})
            self.audit.append(record)
            context.abort(err.status, str(err))
        else:
            record.update(decision="allow", status="OK", fields=call.fields)
            self.audit.append(record)

    @staticmethod
    def _identity(context: grpc.ServicerContext) -> str:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise Unauthenticated("no client certificate")
        cert = x509.load_pem_x509_certificate(pems[0])
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
        return uris[0]


@dataclass
class _Spec:
    name: str
    datatype: str
    shape: list[int]


class _Loaded:
    def __init__(self) -> None:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "c"], ["y"])], "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
            [numpy_helper.from_array(W.reshape(4, 1), "w"),
             numpy_helper.from_array(np.array([C], np.float32), "c")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        self._sess = ort.InferenceSession(model.SerializeToString(),
                                          providers=["CPUExecutionProvider"])
        self.name, self.version = "linear", "1"
        self.inputs = [_Spec("x", "FP32", [-1, 4])]
        self.outputs = [_Spec("y", "FP32", [-1, 1])]
        # the verified profile.json beside the model, as `gateway model profile` writes it
        self.extras = {"profile.json": json.dumps({"features": 4, "mean": [1.0, 1.0, 1.0, 1.0]})
                       .encode()}

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(output_names, self._sess.run(output_names, feeds), strict=True))


class _Models:
    def __init__(self) -> None:
        self._model = _Loaded()

    def get(self, name: str, version: str) -> _Loaded:
        if name != "linear" or version not in ("", "1"):
            raise PermissionDenied(f"no model {name!r} version {version!r} for you")
        return self._model


# --- the server -------------------------------------------------------------------------------

@pytest.fixture
def served(pki: Pki) -> Iterator[tuple[_Guard, dict[str, explain_pb2_grpc.ExplainerStub]]]:
    guard = _Guard({("spiffe://demo.local/analyst", "explain"),
                    ("spiffe://demo.local/app", "infer"),
                    ("spiffe://demo.local/spender", "explain")})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ExplainServicer(guard, _Models(), ExplainBudgets(40, 3600.0)).add_to_server(server)
    creds = grpc.ssl_server_credentials([(pki.server[1], pki.server[0])], pki.ca,
                                        require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    stubs, channels = {}, []
    for who, (cert, key) in pki.clients.items():
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
            pki.ca, key, cert), options=[("grpc.ssl_target_name_override", "localhost")])
        grpc.channel_ready_future(channel).result(timeout=10)
        channels.append(channel)
        stubs[who] = explain_pb2_grpc.ExplainerStub(channel)
    yield guard, stubs
    for channel in channels:
        channel.close()
    server.stop(grace=None).wait()


def _request(x: np.ndarray, method: str = "kernel_shap", **kw: Any) -> explain_pb2.ExplainRequest:
    return explain_pb2.ExplainRequest(
        model_name="linear", model_version="1", method=method,
        input=explain_pb2.Tensor(name="x", datatype="FP32", shape=[1, 4],
                                 raw=x.astype("<f4").tobytes()), **kw)


X = np.array([1.0, 2.0, -3.0, 0.5], dtype=np.float32)


def test_explain_allowed_caller_gets_attributions_and_is_audited(served) -> None:
    guard, stubs = served
    res = stubs["analyst"].Explain(_request(X), timeout=10)
    b = np.ones(4)  # the reference profile's mean is the default baseline
    np.testing.assert_allclose(res.attributions, W * (X - b), atol=1e-5)
    assert res.prediction == pytest.approx(float(W @ X + C), abs=1e-5)
    assert res.baseline_prediction == pytest.approx(float(W @ b + C), abs=1e-5)
    assert res.evaluations == 2**4 - 2 + 2 and res.method == "kernel_shap"
    (record,) = guard.audit
    assert record["decision"] == "allow" and record["action"] == "explain"
    assert record["identity"] == "spiffe://demo.local/analyst"
    assert record["fields"]["cost"] == {"evaluations": 16}
    assert record["fields"]["explain"]["baseline"] == "profile"


def test_supplied_baseline_and_occlusion(served) -> None:
    _, stubs = served
    zero = explain_pb2.Tensor(name="x", datatype="FP32", shape=[1, 4],
                              raw=np.zeros(4, "<f4").tobytes())
    res = stubs["analyst"].Explain(_request(X, "occlusion", baseline=zero), timeout=10)
    np.testing.assert_allclose(res.attributions, W * X, atol=1e-5)
    assert res.attributions[2] == 0.0 and res.evaluations == 6


def test_infer_permission_does_not_grant_explain(served) -> None:
    guard, stubs = served
    with pytest.raises(grpc.RpcError) as caught:
        stubs["app"].Explain(_request(X), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    (record,) = guard.audit
    assert record["decision"] == "deny" and record["identity"] == "spiffe://demo.local/app"


def test_budget_is_enforced_per_caller(served) -> None:
    guard, stubs = served
    stubs["spender"].Explain(_request(X), timeout=10)  # 16 of 40
    stubs["spender"].Explain(_request(X), timeout=10)  # 32 of 40
    with pytest.raises(grpc.RpcError) as caught:
        stubs["spender"].Explain(_request(X), timeout=10)  # needs 16, 8 left
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "explain budget exhausted" in caught.value.details()
    assert guard.audit[-1]["status"] == "RESOURCE_EXHAUSTED"
    assert guard.audit[-1]["fields"]["cost"] == {"evaluations": 0}
    # occlusion (6 evaluations) still fits; another caller's budget is untouched
    assert stubs["spender"].Explain(_request(X, "occlusion"), timeout=10).evaluations == 6
    stubs["analyst"].Explain(_request(X), timeout=10)


def test_bad_requests_are_invalid_argument(served) -> None:
    _, stubs = served
    bad = [
        _request(X, method="lime"),
        explain_pb2.ExplainRequest(model_name="linear", method="occlusion",
                                   input=explain_pb2.Tensor(datatype="FP32", shape=[1, 4],
                                                            raw=b"\0" * 7)),
        explain_pb2.ExplainRequest(model_name="linear", method="occlusion",
                                   input=explain_pb2.Tensor(datatype="FP32", shape=[1, 5],
                                                            raw=b"\0" * 20)),
        _request(np.array([np.nan, 0, 0, 0], np.float32)),
        _request(X, output_name="nope"),
        _request(X, output_index=3),
    ]
    for request in bad:
        with pytest.raises(grpc.RpcError) as caught:
            stubs["analyst"].Explain(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    with pytest.raises(grpc.RpcError) as caught:
        stubs["analyst"].Explain(explain_pb2.ExplainRequest(model_name="secret"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


