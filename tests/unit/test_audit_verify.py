"""`gateway audit verify`: each attack on the files is found, named once, and fails.

Exit statuses: 0 every record covered by a verified signature; 1 damage; 3 no damage but
records not covered yet. No mode passes a record that no signature covers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from gateway.audit import AuditLog, AuditLogDamaged, AuditSettings
from gateway.audit._canonical import encode
from gateway.audit._keys import load_signer, vkey_path
from gateway.audit._note import Checkpoint, Signer, parse_vkey
from gateway.audit._store import list_segments, split_records
from gateway.audit._verify import verify_log
from gateway.cli import main
from tests.support.audit import append_decisions, signed_sizes, small_log


@pytest.fixture
def logdir(tmp_path: Path):
    """A closed log of 40 records with checkpoints every 8, and its config file."""
    _config, s = small_log(tmp_path, 38)
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
    # --dir: the log alone, not checked against the configured witness copy unless told to.
    code, out, _ = _cli(capsysbinary, "audit", "verify", "--config", str(tmp / "gw.toml"),
                        "--dir", str(tmp / "log"), "--json", "--quiet", *extra)
    rep = json.loads(out)
    assert rep["status"] == code
    return code, rep


def _kinds(rep: dict) -> list[str]:
    return [f["kind"] for f in rep["findings"]]


def _forge(prev_record: bytes, seq: int, **fields) -> bytes:
    """A record with a perfect chain link to ``prev_record``: only a signature can catch it."""
    last = json.loads(prev_record)
    return encode({"v": 1, "seq": seq, "time_ms": last["time_ms"] + 1, "kind": "decision",
                   "instance": "t", "prev": hashlib.sha256(b"\x00" + prev_record).hexdigest(),
                   "decision": "allow", **fields})


def _rechain(records: list[bytes], start: int) -> list[bytes]:
    """Rewrite records from ``start`` on so every seq and prev link is valid again."""
    out = list(records[:start])
    for r in records[start:]:
        rec = json.loads(r)
        rec["prev"] = hashlib.sha256(b"\x00" + out[-1]).hexdigest() if out else "0" * 64
        out.append(encode(rec))
    return out


def test_clean_log_verifies_and_says_freshness_was_not_checked(logdir, capsysbinary):
    tmp, s = logdir
    code, rep = _verify_json(capsysbinary, tmp)
    # Every checkpoint the log published is verified (how many there are depends on how the
    # writer thread's signing interleaved with the appends: at least the first and the last).
    signed = signed_sizes(s)
    assert code == 0 and rep["ok"] and rep["records"] == 40
    assert rep["checkpoints"] == len(signed) >= 2 and signed[-1] == 40
    assert (rep["covered"], rep["not_covered"], rep["findings"]) == (40, 0, [])
    # An explicit directory is not checked against the configured log's witness copy.
    code, rep = _verify_json(capsysbinary, tmp, "--dir", str(s.directory))
    assert code == 0 and rep["freshness"].startswith("NOT CHECKED")
    code, out, _ = _cli(capsysbinary, "audit", "verify", "--dir", str(s.directory),
                        "--config", str(tmp / "gw.toml"), "--quiet")
    assert code == 0 and b"result      OK" in out and b"freshness   NOT CHECKED" in out


def test_edit_one_byte_is_named_once(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[17] = recs[17].replace(b'"r016"', b'"r916"')  # still canonical; hash differs
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 17 and _kinds(rep) == ["edited"]


def test_edit_of_the_last_record_is_caught_by_the_root(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[-1] = recs[-1].replace(b'"records":40', b'"records":41')  # no successor link
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    lo = signed_sizes(s)[-2]  # the last checkpoint before the edited record still matches
    assert code == 1 and _kinds(rep) == ["edited"] and rep["first_bad_index"] == lo
    assert f"size 40 does not match records {lo}..39" in rep["findings"][0]["message"]


def test_edit_breaking_encoding_is_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[9] = recs[9].replace(b'"decision":"allow"', b'"decision": "allow"')
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 9 and _kinds(rep) == ["edited"]
    assert "canonical" in rep["findings"][0]["message"]


_NOT_CANONICAL = {
    "whitespace": lambda r: r.replace(b'"decision":"allow"', b'"decision": "allow"'),
    "key order": lambda r: b'{"v":1,' + r[1:].replace(b',"v":1}', b"}"),
    "escaped e-acute": lambda r: r.replace(b'"allow"', b'"\\u00e9"'),
    "escaped ASCII": lambda r: r.replace(b'"allow"', b'"\\u0061llow"'),
    "1.0 for 1": lambda r: r.replace(b'"v":1', b'"v":1.0'),
    "1e0 for 1": lambda r: r.replace(b'"v":1', b'"v":1e0'),
    "-0": lambda r: r.replace(b'"decision":"allow"', b'"decision":-0'),
    "duplicate key": lambda r: r.replace(b'"decision":"allow"',
                                         b'"decision":"allow","decision":"allow"'),
    "lone surrogate": lambda r: r.replace(b'"allow"', b'"\\ud800"'),
    "integer past 2**53": lambda r: r.replace(b'"decision":"allow"',
                                              b'"decision":9007199254740993'),
    "float that is an integer": lambda r: r.replace(b'"decision":"allow"',
                                                    b'"decision":1e+16'),
}


@pytest.mark.parametrize("how", sorted(_NOT_CANONICAL))
def test_a_re_chained_record_that_is_not_canonical_is_named_once(logdir, capsysbinary, how):
    """Record 20 holds the same JSON value in a non-canonical spelling (or a value a record
    may not hold), and every record after it is re-chained onto it: only the canonical check
    can name it, at its own index, once; the checkpoints over it fail with it."""
    tmp, s = logdir
    seg, recs = _records(s)
    bad = _NOT_CANONICAL[how](recs[20])
    assert bad != recs[20]
    out = [*recs[:20], bad]
    for r in recs[21:]:
        rec = json.loads(r)
        rec["prev"] = hashlib.sha256(b"\x00" + out[-1]).hexdigest()
        out.append(encode(rec))
    _rewrite(seg, out)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and [(f["kind"], f["index"]) for f in rep["findings"]] == [("edited", 20)]
    assert "record 20 is damaged" in rep["findings"][0]["message"]
    assert rep["covered"] <= 20


def test_deleted_record_is_named_once(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    del recs[12]
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 12 and _kinds(rep) == ["deleted"]


def test_swapped_records_are_one_reorder_not_a_deletion(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[20], recs[21] = recs[21], recs[20]
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 20 and _kinds(rep) == ["reordered"]
    assert "records 20..21" in rep["findings"][0]["message"]


def test_truncated_tail_is_named(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    _rewrite(seg, recs[:35])
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 35 and _kinds(rep) == ["truncated"]


def test_appended_forgery_is_never_ok(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    _rewrite(seg, [*recs, _forge(recs[-1], 40, request_id="forged")])
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 3 and not rep["ok"] and rep["findings"] == []
    assert (rep["covered"], rep["not_covered"]) == (40, 1)
    code, out, err = _cli(capsysbinary, "audit", "verify", "--config", str(tmp / "gw.toml"),
                          "--quiet", "--allow-unsigned-tail")
    assert code == 3 and b"NOT COVERED" in out and b"1 newest record(s) 40..40" in out
    assert "--allow-unsigned-tail is gone" in err


def test_log_without_a_verified_checkpoint_fails(logdir, capsysbinary):
    """A re-chained rewrite with the checkpoints deleted: nothing vouches for any record."""
    tmp, s = logdir
    seg, recs = _records(s)
    recs[5] = recs[5].replace(b'"r004"', b'"x004"')
    _rewrite(seg, _rechain(recs, 5))
    (s.directory / "checkpoint").unlink()
    (s.directory / "checkpoints.jsonl").unlink()
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and _kinds(rep) == ["unsigned"] and rep["covered"] == 0


def test_rechained_rewrite_under_checkpoints_is_named_once(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[19] = recs[19].replace(b'"r018"', b'"x018"')
    _rewrite(seg, _rechain(recs, 19))
    code, rep = _verify_json(capsysbinary, tmp)
    lo = max(n for n in signed_sizes(s) if n <= 19)
    assert code == 1 and _kinds(rep) == ["edited"] and rep["first_bad_index"] == lo


def test_data_hidden_after_a_zero_gap_is_named_once(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    data = seg.read_bytes()
    end = sum(len(r) + 1 for r in recs)
    assert data[end:end + 64] == bytes(64)  # the preallocated tail
    forged = _forge(recs[-1], 40, request_id="hidden") + b"\n"
    with open(seg, "r+b") as f:
        f.seek(end + 64)
        f.write(forged)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and _kinds(rep) == ["damaged"] and rep["first_bad_index"] == 40
    assert "zero-filled gap" in rep["findings"][0]["message"]
    with pytest.raises(AuditLogDamaged, match="zero-filled gap"):  # the same rule at open
        AuditLog.open(s, instance_id="t").close()


def test_garbage_checkpoint_line_is_named_once_and_the_rest_still_verifies(logdir,
                                                                            capsysbinary):
    tmp, s = logdir
    hist = s.directory / "checkpoints.jsonl"
    lines = hist.read_text().splitlines(keepends=True)
    hist.write_text("".join([*lines[:2], "garbage{\n", *lines[2:]]))
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and _kinds(rep) == ["bad-checkpoint"] and rep["bad_checkpoints"] == 1
    assert "line 3" in rep["findings"][0]["message"] and rep["covered"] == 40
    assert rep["checkpoints"] == len(lines)
    # A torn last line (the gateway died writing it) is not damage.
    hist.write_text("".join(lines) + '"half a note')
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 0, rep


def test_bad_checkpoint_signature_is_counted_bad_and_names_an_index(logdir, capsysbinary):
    tmp, s = logdir
    cp = s.directory / "checkpoint"
    cp.write_text(cp.read_text().replace("\n40\n", "\n41\n"))
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and _kinds(rep) == ["bad-checkpoint"] and rep["bad_checkpoints"] == 1
    assert rep["first_bad_index"] == 40
    code, out, _ = _cli(capsysbinary, "audit", "verify", "--config", str(tmp / "gw.toml"),
                        "--quiet")
    assert b"1 BAD" in out and b"first bad index 40" in out and b"None" not in out


def test_fork_is_detected(logdir, capsysbinary):
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
    assert code == 1 and _kinds(rep) == ["fork"]
    code, rep = _verify_json(capsysbinary, tmp, "--since", str(archived))
    assert code == 0 and rep["since"] == 40 and rep["freshness"].startswith("checked")
    # Two signed checkpoints of one size with different roots in the history: a fork.
    hist = s.directory / "checkpoints.jsonl"
    size = signed_sizes(s)[0]
    other = load_signer(s.signing_key).sign(Checkpoint(s.name, size, bytes(32)).text())
    hist.write_text(hist.read_text() + json.dumps(other) + "\n")
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and _kinds(rep) == ["fork"] and rep["first_bad_index"] == size - 1


def test_rollback_to_an_older_copy_fails_against_the_witness(logdir, capsysbinary):
    tmp, s = logdir
    old = tmp / "old-copy"
    shutil.copytree(s.directory, old)
    with AuditLog.open(s, instance_id="t") as log:
        for i in range(5):
            log.append("decision", {"request_id": f"n{i}", "decision": "allow"})
    witness = tmp / "witness.cp"  # what the gateway keeps outside the log directory
    witness.write_bytes((s.directory / "checkpoint").read_bytes())
    code, rep = _verify_json(capsysbinary, tmp, "--witness", str(witness))
    assert code == 0 and rep["freshness"].startswith("checked: the log extends the witness")
    code, rep = _verify_json(capsysbinary, tmp, "--dir", str(old), "--witness", str(witness))
    assert code == 1 and _kinds(rep) == ["rollback"] and rep["first_bad_index"] == 40
    assert rep["freshness"].startswith("FAILED")
    code, rep = _verify_json(capsysbinary, tmp, "--dir", str(old))  # the old copy alone
    assert code == 0 and rep["freshness"].startswith("NOT CHECKED")


def test_wrong_vkey_fails(logdir, capsysbinary):
    tmp, _s = logdir
    code, rep = _verify_json(capsysbinary, tmp, "--vkey",
                             Signer.generate("test.local/audit").vkey)
    assert code == 1 and not rep["ok"] and rep["covered"] == 0
    assert set(_kinds(rep)) == {"unsigned", "bad-checkpoint"}


def test_export_is_verified_with_its_own_key(logdir, capsysbinary, tmp_path):
    tmp, s = logdir
    dest = tmp_path / "export"
    code, _, _ = _cli(capsysbinary, "audit", "export", str(dest), "--config",
                        str(tmp / "gw.toml"))
    assert code == 0 and (dest / "log.vkey").read_bytes() == vkey_path(s.signing_key).read_bytes()
    # No config names this key: the export's own log.vkey is used, and the report says so.
    other = tmp_path / "other.toml"
    other.write_text('[audit]\nsigning_key = "nowhere/log.skey"\n')
    code, rep = _verify_json(capsysbinary, tmp, str(dest), "--config", str(other))
    assert code == 0 and "log.vkey" in rep["key"] and rep["records"] == 40
    # Told otherwise, it uses the given key (and a forged export's key would not match it).
    code, rep = _verify_json(capsysbinary, tmp, str(dest), "--vkey",
                             Signer.generate("test.local/audit").vkey)
    assert code == 1


@pytest.mark.parametrize(("jobs", "chunk"), [(1, None), (2, None), (1, 97), (2, 300)])
def test_segments_are_checked_apart_and_joined_exactly(logdir, monkeypatch, jobs, chunk):
    """Small segments, checked by separate workers, stitched into one tree (and each segment
    read in blocks smaller than a record, or holding a few)."""
    from gateway.audit import _verify
    if chunk is not None:
        monkeypatch.setattr(_verify, "_CHUNK", chunk)
    _tmp, s = logdir
    s = replace(s, segment_bytes=1500, checkpoint_records=5)
    append_decisions(s, 30, "s")
    vkey = parse_vkey(load_signer(s.signing_key).vkey)
    report = verify_log(s.directory, vkey, jobs=jobs)
    assert report.ok, report.summary()
    assert report.records == 72 and report.segments > 3 and report.checkpoints >= 5
    # Edit the last record of a segment canonically: only the next segment's first link
    # shows it, so the join between workers must catch it.
    segments = list_segments(s.directory)
    first, path = segments[2]
    recs = split_records(path.read_bytes())[0]
    target = first + len(recs) - 1
    recs[-1] = recs[-1].replace(b'"decision":"allow"', b'"decision":"alloW"')
    _rewrite(path, recs)
    report = verify_log(s.directory, vkey, jobs=jobs)
    assert report.status == 1 and report.first_bad_index == target, report.summary()
    assert [f.kind for f in report.findings] == ["edited"]
    # A whole segment deleted: named once, where its records were.
    segments[1][1].unlink()
    report = verify_log(s.directory, vkey, jobs=jobs)
    assert report.status == 1 and report.first_bad_index == segments[1][0], report.summary()
    assert [f.kind for f in report.findings] == ["deleted"]


def test_a_witness_that_does_not_verify_fails_freshness(logdir, capsysbinary):
    tmp, s = logdir
    witness = tmp / "witness.cp"
    witness.write_text((s.directory / "checkpoint").read_text().replace("\n40\n", "\n99\n"))
    code, rep = _verify_json(capsysbinary, tmp, "--witness", str(witness))
    assert code == 1 and _kinds(rep) == ["bad-checkpoint"]
    assert rep["freshness"].startswith("FAILED") and "--witness" in rep["findings"][0]["message"]


def test_a_record_with_a_boolean_version_or_a_stray_segment_file_fails(logdir, capsysbinary):
    tmp, s = logdir
    seg, recs = _records(s)
    recs[-1] = recs[-1].replace(b'"v":1', b'"v":true')  # true == 1 in Python: not to verify
    _rewrite(seg, recs)
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and rep["first_bad_index"] == 39 and _kinds(rep) == ["edited"]
    assert "schema version True" in rep["findings"][0]["message"]
    (seg.parent / "extra.log").write_bytes(b"{}\n")
    code, rep = _verify_json(capsysbinary, tmp)
    assert code == 1 and any("unexpected file extra.log" in f["message"]
                             for f in rep["findings"])


# -- the fast path of the record check equals the one rule, record by record --------------------

_CHARS = ['a', 'Z', ' ', '"', '\\', '/', '\x00', '\x1f', '\x7f', '\n', '\t', '\u00e9', '\u2028',
          '\U0001f600', '.', '-', '+', 'e', '1', '0', ':', ',', '{', '}']


def _value(rnd, depth: int = 0):
    kind = rnd.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return "".join(rnd.choice(_CHARS) for _ in range(rnd.randrange(6)))
    if kind == 1:
        return rnd.choice([0, -1, 7, 2**53 - 1, -(2**53 - 1), 10**15])
    if kind == 2:
        return rnd.choice(["127.0.0.1", "1e-3 ok", "v1.0", "x-1", "e+5", "2.5"])
    if kind in (3, 4):
        return rnd.choice([True, False, None, "", "allow", "ab" * 32])
    if kind == 5:
        return rnd.choice([1.5, 1.0, 1e16, 2.5e-5, -0.0])  # never canonical: the walk says so
    if kind == 6:
        return [_value(rnd, depth + 1) for _ in range(rnd.randrange(3))]
    return {rnd.choice(["k", "a", "b", "prev", "seq", "v", "\u00e9t\u00e9", "Z", "z"]):
            _value(rnd, depth + 1) for _ in range(rnd.randrange(4))}


def _mutations(data: bytes) -> list[bytes]:
    """Variants of canonical bytes that are (mostly) not canonical any more."""
    return [data.replace(b":", b": ", 1), data.replace(b",", b" ,", 1),
            data.replace(b'"a"', b'"\\u0061"', 1), data.replace(b"/", b"\\/", 1),
            data.replace(b"\\u001f", b"\\u001F", 1), data.replace(b"\\n", b"\\u000a", 1),
            data.replace(b'"v":1', b'"v":true', 1), data.replace(b'"v":1', b'"v":1.0', 1),
            data.replace(b'"v":1', b'"v":2', 1), data.replace(b'"seq":', b'"seq":-0,"x":', 1),
            data.replace(b'"v":1', b'"v":1E0', 1), data.replace(b"{", b'{"a":1,', 1),
            data.replace(b'"prev"', b'"pre\\u0076"', 1), data.replace(b'"seq"', b'"Seq"', 1),
            data[:-1], data + b" ", b"[" + data + b"]", b'"' + data.hex().encode() + b'"',
            data + b"," + data, b"1", b"[]", data[:len(data) // 2],
            data.replace(b"\\u00e9", "\u00e9".encode(), 1), data.replace(b"\xc3", b"\xff", 1),
            data.replace(b'"k"', b'"\\ud800"', 1), data.replace(b"0,", b"9007199254740993,", 1)]


def _reference(records: list[bytes], start: int) -> tuple[list, list, list]:
    """The one rule, one record at a time: what the fast path must reproduce exactly."""
    from gateway.audit import _canonical
    seqs, prevs, findings = [], [], []
    for k, data in enumerate(records):
        try:
            rec = _canonical.decode_canonical(data)
            if rec.get("v") != 1 or rec.get("v") is True:
                raise _canonical.EncodingError(f"schema version {rec.get('v')!r}, expected 1")
        except _canonical.EncodingError as err:
            findings.append(("edited", start + k, f"record {start + k} is damaged: {err}"))
            seqs.append(start + k)
            prevs.append(None)
            continue
        seqs.append(rec.get("seq"))
        prevs.append(rec.get("prev"))
    return seqs, prevs, findings


def test_fast_record_check_equals_the_rule_on_every_record():
    """Thousands of generated records, canonical and not (escapes, unicode, floats, huge and
    boolean numbers, dotted strings, key order, whitespace): the batch check of ``verify``
    (fast path, segment-wide float scan, walk of suspects) gives the verdict, seq and prev of
    the record-by-record rule for every one of them, in batches of every mix."""
    import random

    import orjson

    from gateway.audit._verify import _check_batch, _suspects
    rnd = random.Random(14)
    records: list[bytes] = []
    for i in range(3000):
        body = {"v": 1, "seq": i, "prev": f"{rnd.getrandbits(256):064x}"}
        body.update({rnd.choice(["a", "k", "z", "w", "\u00e9"]): _value(rnd)
                     for _ in range(rnd.randrange(4))})
        if rnd.random() < 0.1:
            del body[rnd.choice(["v", "seq", "prev"])]
        try:
            data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            continue
        records.append(data)
        if rnd.random() < 0.3:
            records.append(rnd.choice(_mutations(data)))
    records = [r for r in records if b"\n" not in r]  # a segment line holds no newline
    verdicts = {"canonical": 0, "damaged": 0, "suspect": 0}
    sizes = [1] * len(records) + [rnd.choice([2, 7, 64, 500]) for _ in range(60)]
    start = 0
    for n in sizes:  # every record alone, then in batches of mixed records
        start %= len(records)
        batch = records[start:start + n]
        suspects = _suspects(b"".join(r + b"\n" for r in batch), batch)
        assert _check_batch(batch, 1000 + start, suspects) == _reference(batch, 1000 + start)
        bad = {i for _kind, i, _msg in _reference(batch, 0)[2]}
        verdicts["damaged"] += len(bad)
        verdicts["canonical"] += len(batch) - len(bad)
        verdicts["suspect"] += len(suspects)
        start += n
    # The generator reaches every branch: good records, bad ones, and records to walk.
    assert min(verdicts.values()) > 200, verdicts


def test_suspects_are_the_records_a_float_or_non_ascii_byte_is_in():
    from gateway.audit._canonical import float_positions
    from gateway.audit._verify import _suspects
    records = [b'{"a":1}', b'{"a":1.5}', b'{"a":"x"}', '{"\u00e9":1}'.encode(), b'{"a":1e-7}',
               b'{"a":"127.0.0.1"}', b'{"a":2}']
    data = b"".join(r + b"\n" for r in records) + b'{"torn":1.5'
    assert _suspects(data, records) == [1, 3, 4, 5]
    assert [k for k, r in enumerate(records) if float_positions(r) or not r.isascii()] == \
        [1, 3, 4, 5]


def test_suspect_records_are_walked_in_every_batch(tmp_path, monkeypatch):
    """A segment scanned in small batches: each record with a float or a non-ASCII key is
    named once, at its own index, and dotted strings alone are no damage."""
    from gateway.audit import _verify
    monkeypatch.setattr(_verify, "_CHUNK", 256)
    extra = {5: {"ip": "127.0.0.1"}, 6: {"x": 1.5}, 7: {"x": 1.0}, 13: {"\u00e9": 1},
             14: {"v1": "1e-3"}, 20: {"x": 1e16}, 27: {"a": [2.5e-5]}, 29: {"ip": "10.0.0.1"}}
    records, prev = [], "0" * 64
    for i in range(30):
        # orjson's bytes as a forger would write them (encode() refuses floats itself)
        records.append(orjson.dumps({"v": 1, "seq": i, "prev": prev, **extra.get(i, {})},
                                    option=orjson.OPT_SORT_KEYS))
        prev = hashlib.sha256(b"\x00" + records[-1]).hexdigest()
    seg = tmp_path / "seg.log"
    _rewrite(seg, records)
    part = _verify._scan(str(seg), 0, True, ())
    assert [(kind, i) for kind, i, _msg in part.findings] == \
        [("edited", i) for i in (6, 7, 13, 20, 27)]
    assert (part.count, part.breaks, part.runs) == (30, [], [])


def _zero_record(recs: list[bytes], k: int) -> list[bytes]:
    """Record ``k``'s bytes zeroed in place (same length): a zero gap with records after it."""
    return [*recs[:k], bytes(len(recs[k])), *recs[k + 1:]]


_TAMPER = {
    "clean": lambda recs: recs,
    "edited": lambda recs: [*recs[:17], recs[17].replace(b'"allow"', b'"alloW"'), *recs[18:]],
    "deleted": lambda recs: [*recs[:5], *recs[6:]],
    "swapped": lambda recs: [*recs[:20], recs[21], recs[20], *recs[22:]],
    "not canonical": lambda recs: [*recs[:25], recs[25].replace(b'"v":1', b'"v": 1'),
                                   *recs[26:]],
    "zero gap": lambda recs: _zero_record(recs, 12),
    "duplicated": lambda recs: [*recs[:30], recs[29], *recs[30:]],
    "garbage lines": lambda recs: [b"garbage" if k % 4 == 2 else r for k, r in enumerate(recs)],
}


@pytest.mark.parametrize("how", sorted(_TAMPER))
def test_pieces_of_segments_give_the_verdicts_of_whole_segments(logdir, monkeypatch, how):
    """Two workers share each complete segment in pieces (a few records each here): for every
    attack, the same report as one process checking whole segments, finding for finding."""
    from gateway.audit import _verify
    _tmp, s = logdir
    s = replace(s, segment_bytes=6000, checkpoint_records=7)
    append_decisions(s, 150, "p")
    vkey = parse_vkey(load_signer(s.signing_key).vkey)
    segments = list_segments(s.directory)
    assert len(segments) > 3
    first, path = segments[1]
    recs = split_records(path.read_bytes())[0]
    assert len(recs) > 31
    _rewrite(path, _TAMPER[how](recs))
    monkeypatch.setattr(_verify, "_PIECE", 700)
    assert len(_verify._pieces(path, first, segments[2][0])) > 2   # (garbage: fewer guesses)
    whole = verify_log(s.directory, vkey, jobs=1)
    pieces = verify_log(s.directory, vkey, jobs=2)
    assert whole.status == (0 if how == "clean" else 1), whole.summary()
    assert pieces.findings == whole.findings
    assert (pieces.records, pieces.covered, pieces.not_covered, pieces.status) == (
        whole.records, whole.covered, whole.not_covered, whole.status)
