"""C2SP signed notes and checkpoints against golang.org/x/mod and transparency-dev vectors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from gateway.audit._note import (
    Checkpoint,
    NoteError,
    Signer,
    open_checkpoint,
    open_note,
    parse_checkpoint,
    parse_skey,
    parse_vkey,
)

# The shared public vectors sit beside the repository (../shared), as in CI.
_VECTOR_FILE = next((p for p in (Path(__file__).resolve().parents[3] / "shared",
                                 Path("/work/shared")) if (p / "testdata").is_dir()),
                    Path("/work/shared")) / "testdata" / "tlog_vectors.json"
VECTORS = json.loads(_VECTOR_FILE.read_text())


@pytest.mark.parametrize("case", VECTORS["signed_notes"]["cases"], ids=lambda c: c["name"])
def test_signed_notes(case):
    note = case["note"] if "note" in case else bytes.fromhex(case["note_hex"])
    verifiers = [parse_vkey(v) for v in case["vkeys"]]
    if not case["expect_valid"]:
        with pytest.raises(NoteError):
            open_note(note, verifiers)
        return
    opened = open_note(note, verifiers)
    assert opened.text == case["expect_text"] if "expect_text" in case else True
    assert list(opened.verified) == case["expect_verified"]
    if "expect_unverified" in case:
        assert list(opened.unverified) == case["expect_unverified"]


@pytest.mark.parametrize("case", VECTORS["note_split"]["cases"], ids=lambda c: c["name"])
def test_note_split_names(case):
    with pytest.raises(NoteError, match="not signed by any known key"):
        open_note(case["note"], [])
    assert case["note"].startswith(case["expect_text"] + "\n")


def test_note_signing_is_byte_exact():
    v = VECTORS["note_signing"]
    signer = parse_skey(v["skey"])
    signed = signer.sign(v["text"])
    assert signed == v["text"] + "\n" + v["expect_signature_line"]
    assert signer.vkey == "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    assert parse_skey(signer.skey).vkey == signer.vkey


@pytest.mark.parametrize("case", VECTORS["vkeys"]["cases"], ids=lambda c: c["vkey"][:30])
def test_vkeys(case):
    if case["expect_valid"]:
        v = parse_vkey(case["vkey"])
        assert v.alg == case.get("expect_type", 1)
    else:
        with pytest.raises(NoteError):
            parse_vkey(case["vkey"])


@pytest.mark.parametrize("case", VECTORS["checkpoints_parse"]["cases"], ids=lambda c: c["desc"])
def test_checkpoint_parse(case):
    if not case["expect_valid"]:
        with pytest.raises(NoteError):
            parse_checkpoint(case["text"], case["hash_len"])
        return
    cp = parse_checkpoint(case["text"], case["hash_len"])
    exp = case.get("expect", {})
    assert cp.origin == exp.get("origin", cp.origin)
    assert cp.size == exp.get("size", cp.size)
    if "root_hex" in exp:
        assert cp.root.hex() == exp["root_hex"]
    assert list(cp.extensions) == exp.get("extensions", list(cp.extensions))
    assert cp.text() == case["text"]


@pytest.mark.parametrize("case", VECTORS["checkpoints_signed"]["cases"], ids=lambda c: c["name"])
def test_signed_checkpoints(case):
    log_key, *others = [parse_vkey(v) for v in case["vkeys"]]
    if not case["expect_valid"]:
        with pytest.raises(NoteError):
            open_checkpoint(case["note"], log_key, case["origin"], others)
        return
    cp, opened = open_checkpoint(case["note"], log_key, case["origin"], others)
    assert cp.size == case["expect_size"] if "expect_size" in case else True
    if "expect_root_b64" in case:
        assert base64.b64encode(cp.root).decode() == case["expect_root_b64"]
    if "expect_verified" in case:
        assert sorted(opened.verified) == sorted(case["expect_verified"])


def test_c2sp_checkpoint_example_key_id():
    ex = VECTORS["c2sp_checkpoint_example"]
    sig = ex["note"].rsplit(" ", 1)[1]
    assert base64.b64decode(sig)[:4].hex() == ex["expect_key_id"]
    assert parse_checkpoint(ex["note"].split("\n\n")[0] + "\n").size == ex["expect_size"]


def test_own_checkpoint_roundtrip_and_tamper():
    signer = Signer.generate("gw.test/audit")
    v = parse_vkey(signer.vkey)
    note = signer.sign(Checkpoint("gw.test/audit", 42, bytes(range(32))).text())
    cp, _ = open_checkpoint(note, v, "gw.test/audit")
    assert (cp.size, cp.root) == (42, bytes(range(32)))
    with pytest.raises(NoteError):
        open_checkpoint(note.replace("\n42\n", "\n43\n"), v, "gw.test/audit")
    other = parse_vkey(Signer.generate("gw.test/audit").vkey)
    with pytest.raises(NoteError):
        open_checkpoint(note, other, "gw.test/audit")
