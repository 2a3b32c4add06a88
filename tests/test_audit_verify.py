"""`gateway audit ...` verbs and tamper detection: each kind of damage is found and named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.audit import AuditLog, AuditSettings, ensure_keys
from gateway.audit._keys import vkey_path
from gateway.audit._store import list_segments, split_records
from gateway.cli import main

GATEWAY = str(Path(sys.executable).with_name("gateway"))


@pytest.fixture
def logdir(tmp_path: Path):
    """A closed log of 40 records with checkpoints every 8, and its config file."""
    (tmp_path / "gw.toml").write_text(
        '[audit]\ndirectory = "log"\nsigning_key = "keys/log.skey"\n'
        'payload_key = "keys/payload.key"\nname = "test.local/audit"\ncheckpoint_records = 8\n')
    from gateway.config import load_config
    s = load_config(tmp_path / "gw.toml").audit
    ensure_keys(s)
    with AuditLog.open(s, instance_id="t") as log:
        for i in range(38):
            log.append("decision", {"request_id": f"r{i:03d}", "decision": "allow"})
    return tmp_path, s


def _cli(capsysbinary, *argv: str) -> tuple[int, bytes, str]:
    code = main(list(argv))
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def _records(s: AuditSettings) -> tuple[Path, list[bytes]]:
    (_first, seg), = list_segments(s.directory)
    return seg, split_records(seg.read_bytes())[0]


def _rewrite(seg: Path, records: list[bytes]) -> None:
    seg.write_bytes(b"".join(r + b"\n" for r in records))


def _verify_json(capsysbinary, tmp: Path, *extra: str) -> tuple[int, dict]:
    code, out, _ = _cli(capsysbinary, "audit", "verify", "--config", str(tmp / "gw.toml"),
                        "--json", "--quiet", *extra)
    return code, json.loads(out)


def test_clean_log_verifies(logdir, capsysbinary):
    tmp, _s = logdir
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 0 and rep["ok"] and rep["records"] == 40 and rep["checkpoints"] >= 3


def test_edit_one_byte_is_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[17] = recs[17].replace(b'"r016"', b'"r916"')  # still canonical; hash differs
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 17
    assert rep["findings"][0]["kind"] == "edited"


def test_edit_breaking_encoding_is_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[9] = recs[9].replace(b'"decision":"allow"', b'"decision": "allow"')
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 9
    assert "canonical" in rep["findings"][0]["message"]


def test_deleted_record_is_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    del recs[12]
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 12
    assert rep["findings"][0]["kind"] == "deleted"


def test_swapped_records_are_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[20], recs[21] = recs[21], recs[20]
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 20
    assert {f["kind"] for f in rep["findings"]} >= {"deleted", "reordered"} or \
        rep["findings"][0]["kind"] in ("reordered", "deleted")


def test_truncated_tail_is_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    _rewrite(seg, recs[:35])
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 35
    assert rep["findings"][0]["kind"] == "truncated"


def test_appended_forgery_is_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    import hashlib

    from gateway.audit._canonical import encode
    last = json.loads(recs[-1])
    forged = encode({"v": 1, "seq": 40, "time_ms": last["time_ms"] + 1, "kind": "decision",
                     "instance": "t", "prev": hashlib.sha256(b"\x00" + recs[-1]).hexdigest(),
                     "request_id": "forged", "decision": "allow"})
    _rewrite(seg, [*recs, forged])  # a perfect chain link: only the checkpoints catch it
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 40
    assert rep["findings"][0]["kind"] == "forged"
    code, rep = _verify_json(capsysbinary, tmp, "--allow-unsigned-tail")
    assert code == 0


def test_fork_is_detected(logdir, capsysbinary, tmp_path):
    tmp, s = logdir
    archived = tmp / "archived.cp"
    archived.write_bytes((s.directory / "checkpoint").read_bytes())
    # The operator (holding the key) rebuilds a different history and signs it.
    fork = replace(s, directory=tmp / "fork", witness=tmp / "fork-witness")  # no rollback check
    with AuditLog.open(fork, instance_id="t") as log:
        for i in range(45):
            log.append("decision", {"request_id": f"x{i:03d}", "decision": "deny"})
    code, rep = _verify_json(capsysbinary, tmp, "--dir", str(fork.directory), "--since",
                             str(archived))
    assert code == 1 and any(f["kind"] == "fork" for f in rep["findings"])
    code, rep = _verify_json(capsysbinary, tmp, "--since", str(archived))
    assert code == 0 and rep["since"] == 40
    # Two signed checkpoints of one size with different roots in the history: a fork.
    from gateway.audit._keys import load_signer
    from gateway.audit._note import Checkpoint
    hist = s.directory / "checkpoints.jsonl"
    size = _signed_sizes(s)[0]
    other = load_signer(s.signing_key).sign(Checkpoint(s.name, size, bytes(32)).text())
    hist.write_text(hist.read_text() + json.dumps(other) + "\n")
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["findings"][0]["kind"] == "fork"
    assert rep["first_bad_index"] == size - 1


def _signed_sizes(s: AuditSettings) -> list[int]:
    notes = map(json.loads, (s.directory / "checkpoints.jsonl").read_text().splitlines())
    return sorted(int(n.split("\n")[1]) for n in notes)


def test_forged_checkpoint_signature_is_reported(logdir, capsysbinary):
    tmp, s = logdir
    cp = s.directory / "checkpoint"
    cp.write_text(cp.read_text().replace("\n40\n", "\n41\n"))
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["findings"][-1]["kind"] == "bad-checkpoint"


def test_wrong_vkey_fails(logdir, capsysbinary):
    tmp, _s = logdir
    from gateway.audit._note import Signer
    code, rep = _verify_json(capsysbinary, tmp, "--vkey", Signer.generate("test.local/audit").vkey)
    assert code == 1 and not rep["ok"]


def test_entry_prove_and_verify_proof(logdir, capsysbinary, tmp_path):
    tmp, s = logdir
    cfg = str(tmp / "gw.toml")
    _seg, recs = _records(s)
    code, entry, _ = _cli(capsysbinary, "audit", "entry", "7", "--config", cfg)
    assert code == 0 and entry == recs[7]
    code, note, _ = _cli(capsysbinary, "audit", "checkpoint", "--config", cfg)
    assert note == (s.directory / "checkpoint").read_bytes()
    code, proof, _ = _cli(capsysbinary, "audit", "prove", "7", "--config", cfg)
    lines = proof.decode().split("\n")
    assert lines[:2] == ["c2sp.org/tlog-proof@v1", "index 7"]
    assert proof.decode().endswith(note.decode())
    (tmp_path / "p").write_bytes(proof)
    (tmp_path / "e").write_bytes(entry)
    (tmp_path / "bad").write_bytes(recs[8])
    vkey = str(vkey_path(s.signing_key))
    code, out, _ = _cli(capsysbinary, "audit", "verify-proof", str(tmp_path / "p"),
                        "--vkey", vkey, "--entry", str(tmp_path / "e"))
    assert code == 0 and b"record 7" in out
    code, _, err = _cli(capsysbinary, "audit", "verify-proof", str(tmp_path / "p"),
                        "--vkey", vkey, "--entry", str(tmp_path / "bad"))
    assert code == 2 and "does not verify" in err
    # An older signed size, and a size the log never signed.
    older = next(n for n in _signed_sizes(s) if 7 < n < 40)
    code, proof_old, _ = _cli(capsysbinary, "audit", "prove", "7", "--size", str(older),
                              "--config", cfg)
    assert code == 0 and f"\n{older}\n".encode() in proof_old
    (tmp_path / "p_old").write_bytes(proof_old)
    code, _, _ = _cli(capsysbinary, "audit", "verify-proof", str(tmp_path / "p_old"),
                      "--vkey", vkey, "--entry", str(tmp_path / "e"))
    assert code == 0
    never = next(n for n in range(8, 40) if n not in _signed_sizes(s))
    code, _, err = _cli(capsysbinary, "audit", "prove", "7", "--size", str(never),
                        "--config", cfg)
    assert code == 2 and f"no checkpoint of size {never}" in err


def test_prove_consistency_matches_tree(logdir, capsysbinary):
    tmp, s = logdir
    import base64
    import hashlib

    from gateway.audit._merkle import Tree, verify_consistency
    _seg, recs = _records(s)
    t = Tree()
    for r in recs:
        t.append(hashlib.sha256(b"\x00" + r).digest())
    code, out, _ = _cli(capsysbinary, "audit", "prove-consistency", "8", "40",
                        "--config", str(tmp / "gw.toml"))
    proof = [base64.b64decode(x) for x in out.decode().split()]
    assert code == 0 and proof == t.consistency_proof(8, 40)
    verify_consistency(8, 40, t.root(8), t.root(40), proof)
    code, _, err = _cli(capsysbinary, "audit", "prove-consistency", "9", "99",
                        "--config", str(tmp / "gw.toml"))
    assert code == 2 and "99" in err


def test_bad_input_is_a_clear_error(logdir, capsysbinary, tmp_path):
    tmp, _s = logdir
    cfg = str(tmp / "gw.toml")
    code, _, err = _cli(capsysbinary, "audit", "entry", "4000", "--config", cfg)
    assert code == 2 and "no record 4000" in err
    code, _, err = _cli(capsysbinary, "audit", "verify", str(tmp_path / "nowhere"),
                        "--vkey", "garbage")
    assert code == 2 and "--vkey" in err
    (tmp_path / "p").write_text("not a proof\n\nx")
    code, _, err = _cli(capsysbinary, "audit", "verify-proof", str(tmp_path / "p"),
                        "--config", cfg, "--leaf-hash", "00" * 32)
    assert code == 2 and "tlog-proof" in err


def test_cli_default_config(tmp_path, monkeypatch, capsysbinary):
    """`gateway audit keygen`, then `gateway audit verify` with no arguments, in a fresh dir."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = _cli(capsysbinary, "audit", "keygen")
    vkey = out.decode().strip()
    assert code == 0 and vkey.startswith("gateway.local/audit+") and vkey.count("+") >= 2
    assert (tmp_path / "var/audit/keys/log.skey").stat().st_mode & 0o777 == 0o600
    code, out, _ = _cli(capsysbinary, "audit", "vkey")
    assert out.decode().strip() == vkey
    from gateway.config import load_config
    with AuditLog.open(load_config(None).audit, instance_id="x") as log:
        for i in range(5):
            log.append("decision", {"i": i})
    # The real console script, as an auditor runs it: progress bar on stderr, report on stdout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([GATEWAY, "audit", "verify"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result      OK" in done.stdout and "verify" in done.stderr
    seg = next((tmp_path / "var/audit/log/segments").iterdir())
    data = bytearray(seg.read_bytes())
    data[data.index(b'"i":3') + 4] = ord("4")
    seg.write_bytes(bytes(data))
    code, out, _ = _cli(capsysbinary, "audit", "verify", "--quiet")
    assert code == 1 and b"first bad index 4" in out


@pytest.mark.parametrize("jobs", [1, 2])
def test_chunked_verify_stitches_exactly(logdir, capsysbinary, monkeypatch, jobs):
    """Chunks of 8 records (instead of 32768), checked apart and joined, over segments."""
    from gateway.audit import _verify
    from gateway.audit._keys import load_signer
    from gateway.audit._note import parse_vkey
    monkeypatch.setattr(_verify, "CHUNK", 8)
    _tmp, s = logdir
    s = replace(s, segment_bytes=1500, checkpoint_records=5)
    with AuditLog.open(s, instance_id="t") as log:
        for i in range(30):
            log.append("decision", {"request_id": f"s{i:03d}", "decision": "allow"})
    vkey = parse_vkey(load_signer(s.signing_key).vkey)
    report = _verify.verify_log(s.directory, vkey, jobs=jobs)
    assert report.ok, report.summary()
    assert report.records == 72 and report.segments > 3 and report.checkpoints >= 5
    # Edit record 15 canonically: only record 16's link shows it, and record 16 starts the
    # third chunk, so the stitching between chunks must catch it.
    for _first, path in list_segments(s.directory):
        data = path.read_bytes()
        if b'"r014"' in data:
            path.write_bytes(data.replace(b'"r014"', b'"r914"'))
            break
    report = _verify.verify_log(s.directory, vkey, jobs=jobs)
    assert not report.ok and report.first_bad_index == 15, report.summary()
