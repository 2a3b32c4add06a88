"""End to end over mutual TLS: the demo model is profiled and signed at set-up, and a policy
rule on ``anomaly.input_alarm`` refuses far-out inputs while normal ones are served."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.devenv import make_demo_env, run_cli, start_gateway
from gateway.models.demo import demo_reference
from gateway.monitor import InputProfile
from tests.conftest import channel_credentials

SCORER = "spiffe://demo.local/svc/scorer"
RULE = ("\n# Sensitive models refuse inputs their reference profile calls anomalous.\n"
        "p, role:scorers, *, infer, deny, "
        "model.labels.sensitivity == 'high' && anomaly.input_alarm\n")


def _infer(gw, x: np.ndarray) -> grpc.StatusCode:
    request = pb.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[
        np.asarray(x, dtype=np.float32).tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(np.shape(x)))
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer")) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_demo_env(tmp_path_factory.mktemp("anomaly-demo"))


def test_demo_init_profiles_and_signs_the_demo_model(env, tmp_path):
    version = env.models / "demo-mlp" / "1"
    profile = InputProfile.load(version / "profile.json")
    assert profile.features == 4 and profile.meta["n_fit"] + profile.meta["n_holdout"] == 4000
    # Fitted on the seeded demo reference: the same data gives the same bytes.
    again = InputProfile.fit(demo_reference(), fprs=(0.01, 0.001), seed=0)
    assert again.thresholds == profile.thresholds
    pubkey = str(env.certs / "signing" / "demo-signer.pub")
    proc = run_cli("model", "verify", str(version), "--pubkey", pubkey)
    assert "3 file(s)" in proc.stdout  # model.onnx, metadata.toml and profile.json
    # The signature covers the profile: loosening its thresholds breaks verification.
    copy = tmp_path / "demo-mlp" / "1"
    shutil.copytree(version, copy)
    data = json.loads((copy / "profile.json").read_bytes())
    data["input_thresholds"] = [[f, 1e9] for f, _ in data["input_thresholds"]]
    (copy / "profile.json").write_text(json.dumps(data))
    assert run_cli("model", "verify", str(copy), "--pubkey", pubkey, check=False).returncode != 0


def test_policy_rule_denies_far_out_inputs_end_to_end(env):
    with open(env.policies / "policy.csv", "a") as f:
        f.write(RULE)
    gw = start_gateway(env)
    try:
        normal = demo_reference(rows=10, seed=11)
        assert [_infer(gw, row[None, :]) for row in normal] == [grpc.StatusCode.OK] * 10
        # One feature far beyond anything the reference held: the hard bound alone.
        assert _infer(gw, [[0.0, 0.0, 9.0, 0.0]]) == grpc.StatusCode.PERMISSION_DENIED
        # In bounds, but every feature shifted: the joint distance.
        assert _infer(gw, [[3.0, 3.0, 3.0, 3.0]]) == grpc.StatusCode.PERMISSION_DENIED
        assert _infer(gw, [[0.0, np.nan, 0.0, 0.0]]) == grpc.StatusCode.PERMISSION_DENIED
        # A batch is refused if any of its rows alarms.
        batch = np.concatenate([normal[:3], [[0.0, -12.0, 0.0, 0.0]]])
        assert _infer(gw, batch) == grpc.StatusCode.PERMISSION_DENIED
        assert _infer(gw, normal[:1]) == grpc.StatusCode.OK
    finally:
        gw.stop()
    proc = run_cli("audit", "verify", "--config", str(env.config), "--json", "--quiet")
    assert json.loads(proc.stdout)["ok"] is True
    records = [json.loads(line) for path in sorted((env.audit / "segments").iterdir())
               for line in path.read_bytes().rstrip(b"\0").splitlines() if line.strip()]
    infers = [r for r in records if r.get("rpc") == "ModelInfer"]
    assert [r["decision"] for r in infers] == ["allow"] * 10 + ["deny"] * 4 + ["allow"]
    alerts = [r for r in records if r["kind"] == "anomaly" and r["caller"] == SCORER]
    bounds = next(a for a in alerts if a["alert"] == "bounds")
    assert bounds["detail"]["component"] == "bounds" and bounds["detail"]["feature"] == 2
    joint = next(a for a in alerts if a["alert"] == "input")
    assert joint["detail"]["component"] == "joint"


def test_anomaly_rules_hold_for_explain_on_input_and_baseline(tmp_path):
    """Explain runs the model on data the caller chose (its input, and every point between it
    and its baseline): an anomaly.* deny rule on explain decides on both, as on ModelInfer."""
    from gateway._proto.gateway.v1 import explain_pb2, explain_pb2_grpc

    env = make_demo_env(tmp_path / "env")
    with open(env.policies / "policy.csv", "a") as f:
        f.write("\np, role:explainers, *, explain, deny, "
                "model.labels.sensitivity == 'high' && anomaly.input_alarm\n")

    def tensor(row) -> explain_pb2.Tensor:
        raw = np.asarray([row], dtype="<f4").tobytes()
        return explain_pb2.Tensor(name="input", datatype="FP32", shape=[1, 4], raw=raw)

    normal = demo_reference(rows=1, seed=11)[0]
    far = [0.0, 0.0, 9.0, 0.0]
    gw = start_gateway(env)
    try:
        with grpc.secure_channel(gw.target, channel_credentials(env, "admin")) as channel:
            stub = explain_pb2_grpc.ExplainerStub(channel)

            def explain(**kw) -> grpc.StatusCode:
                try:
                    stub.Explain(explain_pb2.ExplainRequest(model_name="demo-mlp", **kw),
                                 timeout=60)
                    return grpc.StatusCode.OK
                except grpc.RpcError as err:
                    return err.code()

            assert explain(input=tensor(normal)) == grpc.StatusCode.OK
            assert explain(input=tensor(far)) == grpc.StatusCode.PERMISSION_DENIED
            assert explain(input=tensor(normal), baseline=tensor(far)) == \
                grpc.StatusCode.PERMISSION_DENIED
    finally:
        gw.stop()
    records = [json.loads(line) for line in run_cli(
        "audit", "entries", "--config", str(env.config)).stdout.splitlines()]
    explains = [(r["decision"], r["reason"], r["status"]) for r in records
                if r.get("rpc") == "Explain"]
    assert explains == [("allow", "policy", "OK"), ("deny", "anomaly", "PERMISSION_DENIED"),
                        ("deny", "anomaly", "PERMISSION_DENIED")]
