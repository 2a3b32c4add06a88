"""End to end: model and policy administration RPCs are governed actions."""

from __future__ import annotations

import json
import shutil
import threading

import grpc
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.devenv import make_demo_env, run_cli, start_gateway
from tests.conftest import channel_credentials, triton_client


@pytest.fixture(scope="module")
def admin_gateway(tmp_path_factory):
    """A gateway of its own: these tests change which models it serves."""
    env = make_demo_env(tmp_path_factory.mktemp("admin"), models={"reverify_interval": 0.0})
    gw = start_gateway(env)
    yield gw
    gw.stop()


def _stubs(gw, identity):
    channel = grpc.secure_channel(gw.target, channel_credentials(gw.env, identity))
    return pb_grpc.ModelAdminStub(channel), pb_grpc.PolicyAdminStub(channel), channel


def test_admin_lists_unloads_and_reloads_a_model(admin_gateway):
    models, _, channel = _stubs(admin_gateway, "admin")
    listed = {(m.name, m.version): m for m in models.ListModels(pb.ListModelsRequest()).models}
    assert listed[("demo-types", "1")].state == "LOADED"
    assert len(listed[("demo-types", "1")].digest) == 64
    scorer = triton_client(admin_gateway, "scorer")
    assert scorer.is_model_ready("demo-types")

    status = models.UnloadModel(pb.UnloadModelRequest(name="demo-types", version="1"))
    assert status.state == "UNLOADED"
    assert not scorer.is_model_ready("demo-types")
    assert scorer.is_model_ready("demo-mlp")  # the others keep serving
    with pytest.raises(InferenceServerException) as info:
        scorer.get_model_metadata("demo-types")
    assert info.value.status() == "StatusCode.FAILED_PRECONDITION"

    status = models.LoadModel(pb.LoadModelRequest(name="demo-types", version="1"))
    assert status.state == "LOADED", status.reason
    assert scorer.is_model_ready("demo-types")
    channel.close()


def test_callers_without_the_admin_actions_are_denied(admin_gateway):
    for identity in ("scorer", "intruder", "auditor"):
        models, policy, channel = _stubs(admin_gateway, identity)
        for call, request in ((models.UnloadModel, pb.UnloadModelRequest(name="demo-mlp",
                                                                          version="1")),
                              (models.LoadModel, pb.LoadModelRequest(name="demo-mlp",
                                                                     version="1")),
                              (policy.ReloadPolicy, pb.ReloadPolicyRequest())):
            with pytest.raises(grpc.RpcError) as info:
                call(request)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (identity, call)
        channel.close()
    assert triton_client(admin_gateway, "scorer").is_model_ready("demo-mlp")


def test_auditor_reads_the_policy_and_admin_reloads_it(admin_gateway):
    _, policy, channel = _stubs(admin_gateway, "auditor")
    current = policy.GetPolicy(pb.GetPolicyRequest())
    assert "role:scorers" in current.policy_csv and len(current.digest) == 64
    channel.close()
    _, policy, channel = _stubs(admin_gateway, "admin")
    result = policy.ReloadPolicy(pb.ReloadPolicyRequest())
    assert result.accepted, result.error
    assert result.new_digest == current.digest  # unchanged files, same digest
    channel.close()


def test_a_model_tampered_on_disk_is_refused_on_reload_while_others_serve(admin_gateway):
    env = admin_gateway.env
    model = env.models / "demo-types" / "1" / "model.onnx"
    original = model.read_bytes()
    try:
        data = bytearray(original)
        data[-1] ^= 0x01
        model.write_bytes(bytes(data))
        models, _, channel = _stubs(admin_gateway, "admin")
        with pytest.raises(grpc.RpcError) as refused:
            models.LoadModel(pb.LoadModelRequest(name="demo-types", version="1"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model.onnx" in refused.value.details()  # names the changed file
        listed = {(m.name, m.version): m for m in models.ListModels(pb.ListModelsRequest()).models}
        assert listed[("demo-types", "1")].state == "REFUSED"
        channel.close()
        scorer = triton_client(admin_gateway, "scorer")
        assert not scorer.is_model_ready("demo-types")
        with pytest.raises(InferenceServerException) as info:
            scorer.infer("demo-types", [tc.InferInput("in_bool", [1, 3], "BOOL")])
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "model.onnx" in info.value.message()
        assert scorer.is_model_ready("demo-mlp")
    finally:
        model.write_bytes(original)


def test_unsigned_and_tampered_models_are_refused_at_start(tmp_path):
    env = make_demo_env(tmp_path / "gw")
    shutil.copytree(env.models / "demo-types", env.models / "unsigned")
    (env.models / "unsigned" / "1" / "model.sig").unlink()
    shutil.copytree(env.models / "demo-types", env.models / "tampered")
    with open(env.models / "tampered" / "1" / "metadata.toml", "a") as f:
        f.write("# an extra line\n")
    gw = start_gateway(env)
    try:
        scorer = triton_client(gw, "admin")
        assert scorer.is_model_ready("demo-mlp")
        assert not scorer.is_model_ready("unsigned")
        assert not scorer.is_model_ready("tampered")
        with pytest.raises(InferenceServerException) as info:
            scorer.get_model_metadata("unsigned")
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "unsigned" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            scorer.get_model_metadata("tampered")
        assert "metadata.toml" in info.value.message()
    finally:
        gw.stop()
    entries = run_cli("audit", "verify", "--config", str(env.config), "--json").stdout
    assert entries  # the log of refusals verifies (details in test_gateway_audit)


def test_a_broken_policy_reloaded_under_load_leaves_the_old_one_serving(tmp_path):
    """Clients infer at full speed while a broken policy is pushed and reloaded: the reload
    is rejected, audited, and not one call fails or is decided differently meanwhile."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as oip
    from tritonclient.grpc import service_pb2_grpc as oip_grpc

    env = make_demo_env(tmp_path / "gw", policy={"directory": "policies", "watch": False})
    gw = start_gateway(env)
    x = np.zeros((1, 4), dtype=np.float32)
    request = oip.ModelInferRequest(model_name="demo-mlp", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    stop = threading.Event()
    outcomes: dict[str, list] = {"scorer": [], "intruder": []}

    def client(identity: str) -> None:
        with grpc.secure_channel(gw.target, channel_credentials(env, identity)) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ModelInfer(request, timeout=30)
                    outcomes[identity].append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    outcomes[identity].append(err.code())

    threads = [threading.Thread(target=client, args=(who,)) for who in
               ("scorer", "scorer", "intruder")]
    for t in threads:
        t.start()
    policy_csv = env.policies / "policy.csv"
    good = policy_csv.read_text()
    try:
        _, admin, channel = _stubs(gw, "admin")
        before = admin.GetPolicy(pb.GetPolicyRequest()).digest
        policy_csv.write_text(good + "p, role:scorers, *, infer, allow, ) || (\n")
        result = admin.ReloadPolicy(pb.ReloadPolicyRequest())
        assert not result.accepted and "policy.csv" in result.error
        assert admin.GetPolicy(pb.GetPolicyRequest()).digest == before
        policy_csv.write_text(good)
        assert admin.ReloadPolicy(pb.ReloadPolicyRequest()).accepted
        channel.close()
    finally:
        stop.set()
        for t in threads:
            t.join()
        gw.stop()
    assert outcomes["scorer"] and set(outcomes["scorer"]) == {grpc.StatusCode.OK}
    assert outcomes["intruder"] and \
        set(outcomes["intruder"]) == {grpc.StatusCode.PERMISSION_DENIED}
    report = run_cli("audit", "verify", "--config", str(env.config), "--json", "--quiet")
    assert json.loads(report.stdout)["ok"] is True
    reloads = [json.loads(line) for path in sorted((env.audit / "segments").iterdir())
               for line in path.read_bytes().rstrip(b"\0").splitlines() if b"policy_reload" in line]
    assert [r["accepted"] for r in reloads if r["kind"] == "policy_reload"] == [False, True]
