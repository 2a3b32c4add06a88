"""End to end: every call, allowed or denied, is a durable audit record auditors can check."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.devenv import make_demo_env, run_cli, start_gateway
from gateway.identity import pki
from tests.conftest import channel_credentials


def _infer_request(request_id: str, rows: int = 1) -> pb.ModelInferRequest:
    x = np.ones((rows, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="demo-mlp", id=request_id,
                                   raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    return request


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A gateway of its own, a known series of calls, and what each caller saw."""
    env = make_demo_env(tmp_path_factory.mktemp("audited"))
    gw = start_gateway(env)
    seen = {}
    try:
        for identity in ("scorer", "intruder"):
            channel = grpc.secure_channel(gw.target, channel_credentials(env, identity))
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                _, call = stub.ModelInfer.with_call(_infer_request(f"req-{identity}"))
                seen[identity] = (grpc.StatusCode.OK, dict(call.trailing_metadata()))
            except grpc.RpcError as err:
                seen[identity] = (err.code(), dict(err.trailing_metadata() or ()))
            channel.close()
        channel = grpc.secure_channel(gw.target, channel_credentials(env, "scorer"))
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        bad = _infer_request("req-malformed")
        bad.raw_input_contents[0] = b"\0" * 3
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(bad)
        seen["malformed"] = (info.value.code(), {})
        channel.close()
        # The admin may read metadata of every model ("*"): a policy allow, then no model.
        channel = grpc.secure_channel(gw.target, channel_credentials(env, "admin"))
        with pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                pb.ModelMetadataRequest(name="no-such-model"))
        channel.close()
        ca = pki.load_pair(env.certs / "ca.pem", env.certs / "ca.key")
        two = pki.issue_client(ca, uris=["spiffe://demo.local/svc/a", "spiffe://demo.local/b"])
        two.write(env.root / "two.pem", env.root / "two.key")
        channel = grpc.secure_channel(gw.target, channel_credentials(
            env, cert=env.root / "two.pem", key=env.root / "two.key"))
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
        seen["unauthenticated"] = (info.value.code(), {})
        channel.close()
        yield env, gw, seen
    finally:
        gw.stop()


def _auditor(gw):
    channel = grpc.secure_channel(gw.target, channel_credentials(gw.env, "auditor"))
    return audit_pb2_grpc.AuditServiceStub(channel), channel


def _records(gw) -> list[dict]:
    stub, channel = _auditor(gw)
    size = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest()).size
    entries = []
    while len(entries) < size:  # the server may return fewer than asked
        got = stub.GetEntries(audit_pb2.GetEntriesRequest(start=len(entries), end=size)).entries
        assert got
        entries.extend(got)
    channel.close()
    return [json.loads(e) for e in entries]


def test_each_call_allowed_or_denied_has_its_record(audited):
    _, gw, seen = audited
    assert seen["scorer"][0] == grpc.StatusCode.OK
    assert seen["intruder"][0] == grpc.StatusCode.PERMISSION_DENIED
    records = _records(gw)
    decisions = [r for r in records if r["kind"] == "decision"]
    by_id = {r.get("request_id"): r for r in decisions}
    allowed = by_id["req-scorer"]
    assert allowed["decision"] == "allow" and allowed["status"] == "OK"
    assert allowed["caller"]["id"] == "spiffe://demo.local/svc/scorer"
    assert allowed["model"]["name"] == "demo-mlp" and len(allowed["model"]["digest"]) == 64
    assert allowed["policy"]["rule"].startswith("policy.csv:")
    assert allowed["payload"]["size"] == 16 and len(allowed["payload"]["hmac"]) == 64
    denied = by_id["req-intruder"]
    assert (denied["decision"], denied["reason"], denied["status"]) == \
        ("deny", "policy", "PERMISSION_DENIED")
    malformed = by_id["req-malformed"]
    assert (malformed["decision"], malformed["status"]) == ("allow", "INVALID_ARGUMENT")
    unknown = [r for r in decisions if r["rpc"] == "ModelMetadata"]
    assert [(r["decision"], r["reason"]) for r in unknown] == [("deny", "unknown-model")]
    unauthenticated = [r for r in decisions if r["status"] == "UNAUTHENTICATED"]
    assert len(unauthenticated) == 1 and unauthenticated[0]["caller"] is None
    # The records are a chain: sequence numbers without gaps from the first record on.
    assert [r["seq"] for r in records] == list(range(len(records)))


def test_calls_without_a_request_id_get_distinct_ones(audited):
    _, gw, _ = audited
    decisions = [r for r in _records(gw) if r["kind"] == "decision"]
    generated = [r["request_id"] for r in decisions if not r["request_id"].startswith("req-")]
    assert len(generated) >= 2  # the unknown-model metadata call and the refused ServerLive
    assert all(generated) and len(set(generated)) == len(generated)
    assert len({r["request_id"] for r in decisions}) == len(decisions)


def test_the_receipt_names_the_record_and_its_inclusion_proof_verifies(audited, tmp_path):
    env, gw, seen = audited
    receipt = seen["scorer"][1]
    index = int(receipt["gateway-audit-index"])
    stub, channel = _auditor(gw)
    entry = stub.GetEntries(audit_pb2.GetEntriesRequest(start=index, end=index + 1)).entries[0]
    channel.close()
    assert json.loads(entry)["request_id"] == "req-scorer"
    # An auditor checks it offline with the CLI, from the receipt's leaf hash alone.
    proof = run_cli("audit", "prove", str(index), "--config", str(env.config)).stdout
    (tmp_path / "proof").write_text(proof)
    vkey = run_cli("audit", "vkey", "--config", str(env.config)).stdout.strip()
    run_cli("audit", "verify-proof", str(tmp_path / "proof"), "--vkey", vkey,
            "--leaf-hash", receipt["gateway-audit-leaf-hash"])
    forged = ("00" if receipt["gateway-audit-leaf-hash"][:2] != "00" else "11") + \
        receipt["gateway-audit-leaf-hash"][2:]
    bad = run_cli("audit", "verify-proof", str(tmp_path / "proof"), "--vkey", vkey,
                  "--leaf-hash", forged, check=False)
    assert bad.returncode != 0


def test_the_audit_log_is_not_readable_without_audit_read(audited):
    _, gw, _ = audited
    channel = grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer"))
    with pytest.raises(grpc.RpcError) as info:
        audit_pb2_grpc.AuditServiceStub(channel).GetEntries(
            audit_pb2.GetEntriesRequest(start=0, end=1))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()


def test_verify_passes_and_one_changed_byte_is_named(audited, tmp_path):
    env, gw, _ = audited
    gw.stop()  # the final checkpoint covers every record
    ok = run_cli("audit", "verify", "--config", str(env.config), "--json", "--quiet")
    assert json.loads(ok.stdout)["ok"] is True
    copy = tmp_path / "log"
    shutil.copytree(env.audit, copy)
    segment = sorted((copy / "segments").iterdir())[0]
    data = bytearray(segment.read_bytes())
    lines = bytes(data).split(b"\n")
    target = 3  # flip one byte inside record 3
    offset = sum(len(line) + 1 for line in lines[:target]) + lines[target].index(b'"rpc"') + 2
    data[offset] ^= 0x01
    segment.write_bytes(bytes(data))
    bad = run_cli("audit", "verify", str(copy), "--config", str(env.config), "--json",
                  "--quiet", check=False)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert report["first_bad_index"] == target, report
