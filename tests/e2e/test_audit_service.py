"""gateway.v1.AuditService over real gRPC on loopback.

The server's Guard (mTLS identity, policy, audit of the read) lives in ``gateway.server``, which
this process must not import; a small stand-in guard keeps the same contract: it admits or
refuses by caller, and turns a ``GatewayError`` raised in the block into that status.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from gateway._proto.gateway.v1 import audit_pb2, audit_pb2_grpc
from gateway.audit import AuditLog, AuditSettings, ensure_keys
from gateway.audit._keys import load_signer
from gateway.audit._merkle import verify_consistency, verify_inclusion
from gateway.audit._note import open_checkpoint, parse_vkey
from gateway.errors import GatewayError
from gateway.server._audit import AuditServicer


class _StandInGuard:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def call(self, context, *, rpc: str, action: str, model: str = "", version: str = ""):
        self.calls.append((rpc, action))
        caller = dict(context.invocation_metadata()).get("x-caller")
        if caller != "auditor":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller} may not {action}")
        try:
            yield self
        except GatewayError as err:
            context.abort(err.status, str(err))


@pytest.fixture
def served(tmp_path: Path):
    s = AuditSettings(directory=tmp_path / "log", signing_key=tmp_path / "k" / "log.skey",
                      payload_key=tmp_path / "k" / "p.key", name="svc.test/audit",
                      checkpoint_records=10, checkpoint_ms=60_000)
    ensure_keys(s)
    log = AuditLog.open(s, instance_id="svc")
    receipts = [log.append("decision", {"request_id": str(i)}) for i in range(25)]
    guard = _StandInGuard()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    AuditServicer(log, guard).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    yield stub, log, receipts, guard, parse_vkey(load_signer(s.signing_key).vkey)
    channel.close()
    server.stop(None)
    log.close()


AUDITOR = (("x-caller", "auditor"),)


def test_checkpoint_entries_and_proofs(served):
    stub, log, receipts, guard, vkey = served
    cp_msg = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=AUDITOR)
    cp, _ = open_checkpoint(cp_msg.signed_note, vkey, "svc.test/audit")
    assert (cp.size, cp.root) == (cp_msg.size, cp_msg.root_hash)
    assert cp.size >= 10

    entries = stub.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=cp.size),
                              metadata=AUDITOR).entries
    assert len(entries) == cp.size
    r = receipts[5]
    assert hashlib.sha256(b"\x00" + entries[r.index]).digest() == r.leaf_hash

    proof = stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(index=r.index),
                                   metadata=AUDITOR)
    pcp, _ = open_checkpoint(proof.signed_note, vkey, "svc.test/audit")
    assert proof.tree_size == pcp.size
    verify_inclusion(r.index, pcp.size, r.leaf_hash, list(proof.hashes), pcp.root)

    first = 5
    cons = stub.GetConsistencyProof(
        audit_pb2.GetConsistencyProofRequest(first_size=first, second_size=cp.size),
        metadata=AUDITOR)
    verify_consistency(first, cp.size, log.root(first), cp.root, list(cons.hashes))
    assert {a for _, a in guard.calls} == {"audit.read"}
    assert {rpc for rpc, _ in guard.calls} == {"GetCheckpoint", "GetEntries",
                                                "GetInclusionProof", "GetConsistencyProof"}
    assert base64.b64encode(cp.root).decode() in cp_msg.signed_note.decode()


def test_refused_and_bad_requests(served):
    stub, log, _receipts, _guard, _vkey = served
    with pytest.raises(grpc.RpcError) as info:
        stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=(("x-caller", "intruder"),))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        stub.GetEntries(audit_pb2.GetEntriesRequest(start=10_000, end=10_001), metadata=AUDITOR)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    beyond = log.size + 5
    with pytest.raises(grpc.RpcError) as info:
        stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(index=beyond),
                               metadata=AUDITOR)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        stub.GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(first_size=0,
                                                                      second_size=3),
                                 metadata=AUDITOR)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
