"""End to end: every call, allowed or denied, is a durable audit record auditors can check."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.audit._canonical import encode
from gateway.audit._store import list_segments, read_data, split_records
from gateway.devenv import DemoEnv, make_demo_env, run_cli, start_gateway
from gateway.identity import pki
from tests.conftest import channel_credentials
from tests.support.waiting import wait_for


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
    env, gw, seen = audited
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
    # Refused, yet the record names the certificate that was presented.
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    two = x509.load_pem_x509_certificate((env.root / "two.pem").read_bytes())
    assert len(unauthenticated) == 1 and unauthenticated[0]["caller"] == {
        "id": None, "cert_sha256": hashlib.sha256(two.public_bytes(Encoding.DER)).hexdigest(),
        "issuer": None, "serial": None}
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


# -- the log's promises, black-box: checkpoints on time, nothing forged adopted, no rollback --

def _infer(gw, rows: int = 1) -> tuple[grpc.StatusCode, dict[str, str]]:
    channel = grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer"))
    try:
        _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            _infer_request("req-promise", rows))
        return grpc.StatusCode.OK, dict(call.trailing_metadata())
    except grpc.RpcError as err:
        return err.code(), dict(err.trailing_metadata() or ())
    finally:
        channel.close()


def _signed_size(path: Path) -> int:
    try:
        return int(path.read_text().split("\n")[1])
    except (FileNotFoundError, IndexError):
        return -1


def _wait_for(predicate, what: str, timeout: float = 20) -> None:
    """The shared wait (tests/support/waiting.py), in this file's argument order."""
    wait_for(what, predicate, timeout)


def _disk_records(env: DemoEnv) -> list[bytes]:
    out: list[bytes] = []
    for _first, path in list_segments(env.audit):
        out.extend(split_records(read_data(path))[0])
    return out


def _refused_start(env: DemoEnv) -> str:
    """Start the gateway on ``env``, expecting it to refuse; return what it said."""
    try:
        gw = start_gateway(env)
    except AssertionError as err:
        return str(err)
    gw.stop()
    pytest.fail("the gateway started on an audit log it must refuse")


@pytest.fixture(scope="module")
def stopped_env(tmp_path_factory) -> DemoEnv:
    """A demo environment whose gateway served a few calls and stopped cleanly."""
    env = make_demo_env(tmp_path_factory.mktemp("stopped"), audit={"checkpoint_ms": 200})
    gw = start_gateway(env)
    try:
        assert all(_infer(gw)[0] == grpc.StatusCode.OK for _ in range(3))
    finally:
        assert gw.stop() == 0, "".join(gw.stderr_lines)
    return env


def _copy(env: DemoEnv, dest: Path) -> DemoEnv:
    shutil.copytree(env.root, dest)
    return DemoEnv(root=dest, config=dest / env.config.name, certs=dest / "certs" / "dev",
                   models=dest / "models", policies=dest / "policies", audit=dest / "audit")


def test_a_checkpoint_covers_each_idle_call_within_the_interval(stopped_env, tmp_path):
    env = _copy(stopped_env, tmp_path / "env")
    gw = start_gateway(env)
    try:
        for _ in range(3):
            code, receipt = _infer(gw)
            index = int(receipt["gateway-audit-index"])
            # No GetCheckpoint (it would sign on demand): the timer alone must publish it.
            _wait_for(lambda i=index: _signed_size(env.audit / "checkpoint") > i,
                      f"a checkpoint covering record {index}")
            assert code == grpc.StatusCode.OK
    finally:
        gw.stop()


@pytest.mark.parametrize("attack", ["forged-append", "rechained-rewrite"])
def test_a_tampered_log_is_refused_at_start(stopped_env, tmp_path, attack):
    env = _copy(stopped_env, tmp_path / "env")
    records = _disk_records(env)
    segment = list_segments(env.audit)[-1][1]
    if attack == "forged-append":
        # Chain-valid records after a clean stop, written without the gateway's keys.
        last = json.loads(records[-1])
        forged = encode({**last, "kind": "decision", "seq": len(records),
                         "prev": hashlib.sha256(b"\x00" + records[-1]).hexdigest()})
        data = segment.read_bytes().rstrip(b"\0")
        segment.write_bytes(data + forged + b"\n")
        expected = f"first unprovable record index {len(records)}"
    else:
        # History rewritten from record 0 and re-chained, the checkpoints deleted.
        prev, out = "0" * 64, []
        for r in records:
            obj = {**json.loads(r), "prev": prev}
            if obj.get("status") == "OK":
                obj["status"] = "PERMISSION_DENIED"
            out.append(encode(obj))
            prev = hashlib.sha256(b"\x00" + out[-1]).hexdigest()
        segment.write_bytes(b"".join(r + b"\n" for r in out))
        (env.audit / "checkpoint").unlink()
        (env.audit / "checkpoints.jsonl").unlink()
        expected = "no longer match the last commit tag"
    before = segment.read_bytes()
    assert expected in _refused_start(env)
    assert segment.read_bytes() == before  # nothing cut, nothing signed: left for inquiry


def test_a_rolled_back_log_directory_is_refused_at_start(stopped_env, tmp_path):
    env = _copy(stopped_env, tmp_path / "env")
    old = tmp_path / "old-audit"
    shutil.copytree(env.audit, old)
    old_size = _signed_size(env.audit / "checkpoint")
    gw = start_gateway(env)
    try:
        assert _infer(gw)[0] == grpc.StatusCode.OK
    finally:
        assert gw.stop() == 0
    new_size = _signed_size(env.root / "var" / "audit" / "witness" / "checkpoint")
    assert new_size == _signed_size(env.audit / "checkpoint") > old_size
    shutil.rmtree(env.audit)
    shutil.copytree(old, env.audit)
    said = _refused_start(env)
    assert "older than its witness copy" in said
    assert f"covers {old_size} records" in said and f"covers {new_size}" in said


def test_a_response_too_large_to_send_is_refused_and_audited_as_such(tmp_path):
    limit = 64 * 1024
    env = make_demo_env(tmp_path / "env", server={"max_message_bytes": limit})
    gw = start_gateway(env)
    try:
        # 3600 rows: 57,600 input bytes go in, 72,000 output bytes would come back.
        assert _infer_request("r", 3600).ByteSize() < limit
        code, receipt = _infer(gw, rows=3600)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "gateway-audit-index" in receipt, "refused by the transport after the audit"
        small_code, _ = _infer(gw, rows=100)
        assert small_code == grpc.StatusCode.OK
    finally:
        assert gw.stop() == 0
    record = json.loads(_disk_records(env)[int(receipt["gateway-audit-index"])])
    assert hashlib.sha256(b"\x00" + encode(record)).hexdigest() == \
        receipt["gateway-audit-leaf-hash"]
    assert (record["decision"], record["status"]) == ("allow", code.name)
