"""The standalone verifier (`gateway.audit.offline`) and the record schema, on a real gateway.

One gateway runs every kind of call an auditor will find in the log (allowed, denied,
unauthenticated, malformed, admin, policy install, model load/unload/refusal); the offline API
then verifies its export, the inclusion proofs of its receipts and the consistency of two of its
checkpoints, and fails on each tampering. Every record is validated against the JSON Schema.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from gateway._proto.gateway.v1 import admin_pb2, admin_pb2_grpc, audit_pb2, audit_pb2_grpc
from gateway.audit import RECORD_SCHEMA, export_log, offline
from gateway.config import load_config
from gateway.devenv import make_demo_env, start_gateway
from gateway.identity import pki
from tests.conftest import channel_credentials
from tests.e2e.test_gateway_audit import _infer_request

REPO = Path(__file__).resolve().parents[2]
# The shared public vectors sit beside the repository (../shared), as in CI.
_VECTOR_FILE = next((p for p in (REPO.parent / "shared", Path("/work/shared"))
                     if (p / "testdata").is_dir()), Path("/work/shared")) \
    / "testdata" / "tlog_vectors.json"
VECTORS = json.loads(_VECTOR_FILE.read_text())


def _call(gw, identity, rpc, request, *, cert=None):
    """One call; (status, trailing metadata) whatever the outcome."""
    creds = (channel_credentials(gw.env, identity) if cert is None else
             channel_credentials(gw.env, cert=cert[0], key=cert[1]))
    with grpc.secure_channel(gw.target, creds) as channel:
        stub_cls, method = rpc
        try:
            _, call = getattr(stub_cls(channel), method).with_call(request)
            return grpc.StatusCode.OK, dict(call.trailing_metadata())
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ())


INFER = (oip_grpc.GRPCInferenceServiceStub, "ModelInfer")
METADATA = (oip_grpc.GRPCInferenceServiceStub, "ModelMetadata")
LIVE = (oip_grpc.GRPCInferenceServiceStub, "ServerLive")
LOAD = (admin_pb2_grpc.ModelAdminStub, "LoadModel")
UNLOAD = (admin_pb2_grpc.ModelAdminStub, "UnloadModel")
RELOAD = (admin_pb2_grpc.PolicyAdminStub, "ReloadPolicy")
CHECKPOINT = (audit_pb2_grpc.AuditServiceStub, "GetCheckpoint")


def _checkpoint(gw) -> str:
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "auditor")) as channel:
        return audit_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(
            audit_pb2.GetCheckpointRequest()).signed_note.decode()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real gateway's log holding every kind of record, two checkpoints, a live export."""
    root = tmp_path_factory.mktemp("offline")
    env = make_demo_env(root / "env", models={"reverify_interval": 0.0})
    gw = start_gateway(env)
    seen: dict[str, tuple] = {}
    try:
        seen["allow"] = _call(gw, "scorer", INFER, _infer_request("req-allow"))
        seen["deny"] = _call(gw, "intruder", INFER, _infer_request("req-deny"))
        bad = _infer_request("req-malformed")
        bad.raw_input_contents[0] = b"\0" * 3
        seen["malformed"] = _call(gw, "scorer", INFER, bad)
        seen["unknown"] = _call(gw, "admin", METADATA, oip.ModelMetadataRequest(name="nope"))
        old_note = _checkpoint(gw)
        ca = pki.load_pair(env.certs / "ca.pem", env.certs / "ca.key")
        two = pki.issue_client(ca, uris=["spiffe://demo.local/svc/a", "spiffe://demo.local/b"])
        two.write(env.root / "two.pem", env.root / "two.key")
        seen["unauthenticated"] = _call(gw, None, LIVE, oip.ServerLiveRequest(),
                                        cert=(env.root / "two.pem", env.root / "two.key"))
        seen["unload"] = _call(gw, "admin", UNLOAD,
                               admin_pb2.UnloadModelRequest(name="demo-types", version="1"))
        seen["load"] = _call(gw, "admin", LOAD,
                             admin_pb2.LoadModelRequest(name="demo-types", version="1"))
        seen["refused"] = _call(gw, "admin", LOAD,
                                admin_pb2.LoadModelRequest(name="demo-types", version="9"))
        seen["reload"] = _call(gw, "admin", RELOAD, admin_pb2.ReloadPolicyRequest())
        seen["later"] = _call(gw, "scorer", INFER, _infer_request("req-later"))
        new_note = _checkpoint(gw)
        export = root / "export"
        export_log(load_config(env.config).audit, export)  # while the gateway runs
    finally:
        gw.stop()
    key = offline.load_verifier(export / "log.vkey")
    yield {"env": env, "seen": seen, "old": old_note, "new": new_note, "export": export,
           "key": key, "root": root}


def test_imports_only_the_standard_library_and_cryptography():
    code = ("import json, sys; before = set(sys.modules); import gateway.audit.offline; "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, env=env).stdout
    loaded = set(json.loads(out))
    assert not loaded & {"grpc", "onnxruntime", "numpy", "google", "onnx", "casbin"}
    third_party = {m for m in loaded if m not in sys.stdlib_module_names}
    # __mp_main__: the alias multiprocessing (stdlib) registers for the main module.
    assert third_party <= {"gateway", "cryptography", "_cffi_backend", "_openssl", "orjson",
                           "__mp_main__"}, \
        third_party


def test_without_orjson_the_verdicts_are_the_same(live, tmp_path):
    """The verifier on the standard library's json: the same export passes, damage fails."""
    damaged = tmp_path / "damaged"
    shutil.copytree(live["export"], damaged)
    seg = sorted((damaged / "segments").iterdir())[0]
    seg.write_bytes(seg.read_bytes().replace(b'"rpc":"ModelInfer"', b'"rpc": "ModelInfer"', 1))
    code = (
        "import sys; sys.modules['orjson'] = None\n"
        "from gateway.audit import offline, _canonical\n"
        "assert not _canonical.SCAN_ONLY_SUSPECTS\n"
        "good = offline.verify_log(sys.argv[1], jobs=1)\n"
        "bad = offline.verify_log(sys.argv[2], jobs=1)\n"
        "print(good.status, bad.status, [f.kind for f in bad.findings], good.records)\n")
    out = subprocess.run([sys.executable, "-c", code, str(live["export"]), str(damaged)],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout.split(" ", 2)
    assert out[:2] == ["0", "1"] and "edited" in out[2]


# -- the public vectors, through the offline API ------------------------------------------------

def test_rfc6962_hasher_and_proof_vectors():
    h = VECTORS["rfc6962_hasher"]
    assert offline.EMPTY_ROOT.hex() == h["empty_root"]
    for c in h["leaf_cases"]:
        assert offline.leaf_hash(bytes.fromhex(c["leaf_hex"])).hex() == c["leaf_hash"]
    for c in h["node_cases"]:
        assert offline.node_hash(bytes.fromhex(c["left_hex"]),
                                 bytes.fromhex(c["right_hex"])).hex() == c["node_hash"]
    for c in VECTORS["inclusion_probes"]["cases"]:
        args = (c["leaf_index"], c["tree_size"], bytes.fromhex(c["leaf_hash"]),
                [bytes.fromhex(p) for p in c["proof"]], bytes.fromhex(c["root"]))
        if c["expect_valid"]:
            offline.verify_inclusion_path(*args)
        else:
            with pytest.raises(offline.VerificationError):
                offline.verify_inclusion_path(*args)
    for c in VECTORS["consistency_probes"]["cases"]:
        args = (c["size1"], c["size2"], bytes.fromhex(c["root1"]), bytes.fromhex(c["root2"]),
                [bytes.fromhex(p) for p in c["proof"]])
        if c["expect_valid"]:
            offline.verify_consistency_path(*args)
        else:
            with pytest.raises(offline.VerificationError):
                offline.verify_consistency_path(*args)


def test_c2sp_note_and_checkpoint_vectors():
    for c in VECTORS["signed_notes"]["cases"]:
        note = c["note"] if "note" in c else bytes.fromhex(c["note_hex"])
        keys = [offline.parse_verifier(v) for v in c["vkeys"]]
        if c["expect_valid"]:
            assert list(offline.open_note(note, keys).verified) == c["expect_verified"]
        else:
            with pytest.raises(offline.VerificationError):
                offline.open_note(note, keys)
    for c in VECTORS["checkpoints_signed"]["cases"]:
        key, *others = [offline.parse_verifier(v) for v in c["vkeys"]]
        if c["expect_valid"]:
            cp = offline.open_checkpoint(c["note"], key, c["origin"], others)
            assert cp.size == c.get("expect_size", cp.size)
        else:
            with pytest.raises(offline.VerificationError):
                offline.open_checkpoint(c["note"], key, c["origin"], others)


# -- a live log ----------------------------------------------------------------------------------

def test_the_export_of_a_live_log_verifies_with_its_own_key(live):
    report = offline.verify_log(live["export"])
    assert report.status == offline.OK, report.summary()
    assert "log.vkey" in report.key and report.covered == report.records > 10


def test_receipts_prove_inclusion_offline(live):
    export, key = live["export"], live["key"]
    for name in ("allow", "deny", "later"):
        _status, receipt = live["seen"][name]
        index = int(receipt["gateway-audit-index"])
        leaf = bytes.fromhex(receipt["gateway-audit-leaf-hash"])
        proof = offline.prove_inclusion(export, index)
        got, cp = offline.verify_inclusion(proof, key, leaf=leaf)
        assert got == index and cp.size > index
        record = offline.parse_record(offline.read_entries(export, index, index + 1)[0])
        assert record["seq"] == index and record["kind"] == "decision"
        with pytest.raises(offline.VerificationError):
            offline.verify_inclusion(proof, key, leaf=offline.leaf_hash(b"forged"))


def test_consistency_between_two_live_checkpoints(live):
    export, key = live["export"], live["key"]
    old, new = (offline.open_checkpoint(live[k], key) for k in ("old", "new"))
    assert old.size < new.size
    proof = offline.prove_consistency(export, old.size, new.size)
    assert f"old {old.size}\nnew {new.size}\n" in proof
    a, b = offline.verify_consistency(live["old"], live["new"], proof, key)
    assert (a.size, b.size) == (old.size, new.size)
    lines = proof.splitlines(keepends=True)
    tampered = "".join([*lines[:3], lines[4], lines[3], *lines[5:]]) if len(lines) > 4 else \
        proof.replace(lines[3], lines[3][::-1].replace("=", "A") + "")
    for args in ((live["new"], live["old"], proof),        # swapped
                 (live["old"], live["new"], tampered)):    # reordered hashes
        with pytest.raises(offline.VerificationError):
            offline.verify_consistency(*args, key)
    forged = live["new"].replace(f"\n{new.size}\n", f"\n{new.size + 1}\n")
    with pytest.raises(offline.VerificationError, match="signature"):
        offline.verify_consistency(live["old"], forged, proof, key)
    with pytest.raises(offline.Error, match="no checkpoint of size"):
        offline.prove_consistency(export, old.size + 1, new.size)


@pytest.mark.parametrize("attack", ["edit", "append", "drop-checkpoints", "swap"])
def test_each_tampering_of_the_export_fails(live, tmp_path, attack):
    copy = tmp_path / "copy"
    shutil.copytree(live["export"], copy)
    seg = sorted((copy / "segments").iterdir())[-1]
    recs = seg.read_bytes().split(b"\n")[:-1]
    if attack == "edit":
        recs[3] = recs[3].replace(b'"kind":"decision"', b'"kind":"decisioN"')
    elif attack == "append":
        last = json.loads(recs[-1])
        recs.append(json.dumps({**last, "seq": last["seq"] + 1, "prev": offline.leaf_hash(
            recs[-1]).hex()}, sort_keys=True, separators=(",", ":")).encode())
    elif attack == "drop-checkpoints":
        (copy / "checkpoint").unlink()
        (copy / "checkpoints.jsonl").unlink()
    else:
        recs[4], recs[5] = recs[5], recs[4]
    seg.write_bytes(b"".join(r + b"\n" for r in recs))
    report = offline.verify_log(copy)
    assert report.status == (offline.NOT_COVERED if attack == "append" else offline.DAMAGED)
    assert len(report.findings) == (0 if attack == "append" else 1), report.summary()


# -- the record schema ---------------------------------------------------------------------------

def test_every_record_the_gateway_wrote_matches_the_schema(live):
    import jsonschema

    schema = json.loads(RECORD_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    records = [offline.parse_record(r) for r in
               offline.read_entries(live["env"].audit)]
    errors = [(r, f"{'/'.join(map(str, e.absolute_path))}: {e.message}")
              for r in records for e in validator.iter_errors(r)]
    assert not errors, errors
    kinds = {r["kind"] for r in records}
    assert kinds >= {"log_open", "log_close", "decision", "model_load", "model_unload",
                     "model_refused", "policy_reload"}, kinds
    statuses = {r["status"] for r in records if r["kind"] == "decision"}
    assert statuses >= {"OK", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNAUTHENTICATED"}
    # The schema is strict: an unknown field or a wrong type is refused.
    decision = next(r for r in records if r["kind"] == "decision")
    for bad in ({**decision, "extra": 1}, {**decision, "seq": "1"},
                {**decision, "decision": "maybe"}, {**decision, "kind": "nonsense"}):
        assert list(validator.iter_errors(bad))


def test_the_readme_schema_section_is_generated_from_the_schema():
    from gateway.audit import _schema_doc

    fresh = _schema_doc.render(json.loads(RECORD_SCHEMA.read_text()))
    readme = _schema_doc.README.read_text()
    assert _schema_doc.section(readme) == fresh, \
        "gateway/audit/README.md is stale: run `python -m gateway.audit._schema_doc`"
    # Every key of every kind is documented in it.
    schema = json.loads(RECORD_SCHEMA.read_text())
    for definition in schema["$defs"].values():
        for key in definition.get("properties", {}):
            assert f"`{key}`" in fresh, key


def test_the_standard_library_encoder_writes_what_orjson_writes():
    """The fallback canonical form equals orjson's for every string escape and key order."""
    from gateway.audit import _canonical

    points = [*range(0, 0x3000), *range(0x3000, 0xD800, 7), *range(0xE000, 0x110000, 13)]
    for cp in points:
        value = {"k": chr(cp), "a": [cp, None, True], "z": {"y": -cp}}
        assert _canonical._json_dumps(value) == _canonical.encode(value), hex(cp)
