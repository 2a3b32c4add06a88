"""The audit log writer: canonical records, group commit, chain, recovery, failures, segments."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import resource
import signal
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import rfc8785

from gateway.audit import AuditLog, AuditLogDamaged, AuditSettings, ensure_keys
from gateway.audit._canonical import EncodingError, check, decode_canonical, encode
from gateway.audit._export import export_log
from gateway.audit._keys import load_signer
from gateway.audit._note import parse_vkey
from gateway.audit._store import list_segments, split_records
from gateway.audit._verify import verify_log
from gateway.errors import AuditUnavailable, GatewayError
from tests.conftest import assert_records_match_schema
from tests.support.waiting import wait_for

DECISION = {
    "caller": {"id": "spiffe://demo.local/svc/scorer", "cert_sha256": "ab" * 32,
               "issuer": "CN=Demo CA", "serial": "0a1b2c"},
    "rpc": "ModelInfer", "action": "infer",
    "model": {"name": "demo-mlp", "version": "1", "digest": "sha256:" + "cd" * 32},
    "decision": "allow", "reason": "policy",
    "policy": {"digest": "ef" * 32, "rule": "p, spiffe://demo.local/svc/scorer, demo-mlp, infer"},
    "request_id": "req-1", "payload": {"hmac": "01" * 32, "size": 123},
    "status": "OK", "latency_us": {"decision": 3, "inference": 40, "total": 120},
}


@pytest.fixture
def settings(tmp_path: Path) -> AuditSettings:
    s = AuditSettings(directory=tmp_path / "log", signing_key=tmp_path / "keys" / "log.skey",
                      payload_key=tmp_path / "keys" / "payload.key", name="test.local/audit",
                      segment_bytes=1 << 20)
    ensure_keys(s)
    return s


def _verifier(s: AuditSettings):
    return parse_vkey(load_signer(s.signing_key).vkey)


def _records(s: AuditSettings) -> list[bytes]:
    out = []
    for _first, path in list_segments(s.directory):
        out.extend(split_records(path.read_bytes())[0])
    return out


def _last_segment(s: AuditSettings) -> Path:
    return list_segments(s.directory)[-1][1]


# -- canonical encoding ---------------------------------------------------------------------

def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**53 - 1, -(2**53 - 1), rng.randrange(-10**9, 10**9)])
    if kind in (2, 3):
        alphabet = "aZ09 \"\\/\b\f\n\r\t\x00\x1f\x7f\u00e9\u2028\u2029\ufeff\U0001f600\ue000"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["a", "B", "_", "z9", "~", "", "caller", "Caller", "a b", "\x7f", "é"[:0] + "id"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_encoding_is_rfc8785_and_json_dumps():
    rng = random.Random(8785)
    values = [DECISION, {}, {"": ""}, {"n": [1, [2, {"x": None}]]}]
    values += [{"r": _random_value(rng)} for _ in range(2000)]
    for v in values:
        check(v)
        ours = encode(v)
        assert ours == rfc8785.dumps(v)
        assert ours == json.dumps(v, sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=False).encode()
        assert decode_canonical(ours) == json.loads(ours)


@pytest.mark.parametrize("bad", [{"x": 1.5}, {"x": 2**53}, {"é": 1}, {"x": b"raw"},
                                 {"x": {1: 2}}, {"x": {"y": float("nan")}}])
def test_values_outside_the_schema_are_refused(bad):
    with pytest.raises(EncodingError):
        check(bad)


@pytest.mark.parametrize("data", [b'{"b":1,"a":2}', b'{"a": 1}', b'{"a":1.0}', b'{"a":1e3}',
                                  b'{"a":1.5}', b'{"a":-0.5}', b'{"a":1e+16}', b'{"a":[2,1.5]}',
                                  b'{"a":{"b":5e-324}}', b'{"\xc3\xa9":1}',
                                  b'{"a":"\\u0041"}', b'{"a":9007199254740992}', b'[1]',
                                  b'{"a":1}\n', b'{"a":"\xff"}'])
def test_non_canonical_bytes_are_rejected(data):
    with pytest.raises(EncodingError):
        decode_canonical(data)


def test_float_scan_passes_plain_records_and_flags_lookalikes():
    from gateway.audit._canonical import float_positions
    assert float_positions(encode(DECISION)) == []
    assert float_positions(b'{"ip":"127.0.0.1","x":"1e-3 ok"}') != []  # walk, then accepted
    decode_canonical(b'{"ip":"127.0.0.1","x":"1e-3 ok"}')


# -- appending ------------------------------------------------------------------------------

def test_append_is_on_disk_chained_and_receipted(settings):
    log = AuditLog.open(settings, instance_id="gw-test")
    receipts = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(50):
            r = log.append("decision", {**DECISION, "request_id": f"{n}-{i}"})
            # Durable before append returns: the bytes are in the segment file now.
            rec = log.entries(r.index, r.index + 1)[0]
            assert hashlib.sha256(b"\x00" + rec).digest() == r.leaf_hash
            with lock:
                receipts.append(r)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.healthy
    log.close()
    assert not log.healthy
    records = _records(settings)
    assert len(records) == 1 + 400 + 1  # log_open, decisions, log_close
    prev = "0" * 64
    for i, rec in enumerate(records):
        obj = json.loads(rec)
        assert (obj["v"], obj["seq"], obj["prev"], obj["instance"]) == (1, i, prev, "gw-test")
        prev = hashlib.sha256(b"\x00" + rec).hexdigest()
    for r in receipts:
        assert hashlib.sha256(b"\x00" + records[r.index]).digest() == r.leaf_hash
    assert sorted(json.loads(records[r.index])["request_id"] for r in receipts) == sorted(
        f"{n}-{i}" for n in range(8) for i in range(50))
    assert [json.loads(records[i])["kind"] for i in (0, -1)] == ["log_open", "log_close"]
    report = verify_log(settings.directory, _verifier(settings))
    assert report.ok, report.summary()
    assert report.records == len(records) == report.latest_checkpoint


def test_reserved_keys_and_bad_values_are_refused(settings):
    with AuditLog.open(settings, instance_id="t") as log:
        with pytest.raises(ValueError, match="reserved"):
            log.append("decision", {"seq": 5})
        with pytest.raises(ValueError, match="float"):
            log.append("decision", {"latency": 1.5})
        log.append("decision", {"ok": True})
    assert verify_log(settings.directory, _verifier(settings)).ok


def test_payload_digest_is_keyed_hmac(settings):
    with AuditLog.open(settings, instance_id="t") as log:
        key = settings.payload_key.read_text().strip()
        import base64
        expect = hmac.new(base64.b64decode(key), b"abcdef", hashlib.sha256).hexdigest()
        assert log.payload_digest(b"abc", b"def") == expect
        assert log.payload_digest(b"abcdef") == expect
        assert log.payload_digest(b"abcdeg") != expect
        assert hashlib.sha256(b"abcdef").hexdigest() != expect


def test_keys_are_private_and_not_overwritten(settings):
    assert settings.signing_key.stat().st_mode & 0o777 == 0o600
    assert settings.payload_key.stat().st_mode & 0o777 == 0o600
    before = settings.signing_key.read_bytes()
    ensure_keys(settings)
    assert settings.signing_key.read_bytes() == before


def test_open_without_keys_says_how_to_make_them(tmp_path):
    s = AuditSettings(directory=tmp_path / "log", signing_key=tmp_path / "none.skey",
                      payload_key=tmp_path / "none.key")
    with pytest.raises(GatewayError, match="audit keygen"):
        AuditLog.open(s, instance_id="t")


# -- recovery -------------------------------------------------------------------------------

def _closed_log(settings: AuditSettings, n: int = 20) -> list[bytes]:
    with AuditLog.open(settings, instance_id="t") as log:
        for i in range(n):
            log.append("decision", {**DECISION, "request_id": str(i)})
    return _records(settings)


def _append_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _data_end(path: Path) -> int:
    return len(path.read_bytes().rstrip(b"\x00"))


@pytest.mark.parametrize("torn", [
    b'{"kind":"decision","seq":22,"ti',            # a record cut mid-write
    bytes([0x8f, 0x01, 0xfe, 0x7b, 0x22]) * 7,      # garbage bytes, no newline
])
def test_torn_tail_is_truncated_and_recorded(settings, torn):
    before = _closed_log(settings)
    seg = _last_segment(settings)
    _append_bytes(seg, _data_end(seg), torn)
    with AuditLog.open(settings, instance_id="t") as log:
        assert log.healthy
    after = _records(settings)
    assert after[:len(before)] == before
    anomaly = json.loads(after[len(before)])
    assert anomaly["kind"] == "anomaly" and anomaly["event"] == "torn-tail-truncated"
    assert anomaly["bytes"] == len(torn) and anomaly["offset"] == _offset_of(before)
    assert torn not in seg.read_bytes()
    assert verify_log(settings.directory, _verifier(settings)).ok


def _offset_of(records: list[bytes]) -> int:
    return sum(len(r) + 1 for r in records)


def test_torn_tail_of_growing_file_is_recovered(settings):
    settings = replace(settings, preallocate=False)
    before = _closed_log(settings)
    seg = _last_segment(settings)
    with open(seg, "ab") as f:
        f.write(b'{"kind":"dec')
    with AuditLog.open(settings, instance_id="t"):
        pass
    assert _records(settings)[:len(before)] == before
    assert verify_log(settings.directory, _verifier(settings)).ok


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["edit-middle", "truncate-checkpointed", "complete-garbage-line",
                                    "gap-then-data", "segment-renamed",
                                    "truncate-and-drop-checkpoint", "foreign-checkpoint"])
def test_other_damage_refuses_to_open(settings, damage):
    records = _closed_log(settings)
    seg = _last_segment(settings)
    end = _offset_of(records)
    if damage == "edit-middle":
        # change a digit of record 5's request id: still canonical JSON, different hash
        off = _offset_of(records[:5]) + records[5].index(b'"request_id":"') + 14
        _flip(seg, off)
        match = "no longer match the signed checkpoint"
    elif damage == "truncate-checkpointed":
        os.truncate(seg, _offset_of(records[:-2]))
        match = "truncated"
    elif damage == "complete-garbage-line":
        _append_bytes(seg, end, b"not json\n")
        match = f"record {len(records)}"
    elif damage == "gap-then-data":
        _append_bytes(seg, end + 64, b'{"a":1}\n')
        match = f"record {len(records)}"
    elif damage == "segment-renamed":
        seg.rename(seg.with_name("00000000000000000007.log"))
        match = "starts at index 7"
    elif damage == "truncate-and-drop-checkpoint":
        # Deleting the latest checkpoint does not unpin the log: the history still signs it.
        os.truncate(seg, _offset_of(records[:-2]))
        (settings.directory / "checkpoint").unlink()
        match = "truncated"
    else:
        from gateway.audit._note import Checkpoint, Signer
        other = Signer.generate(settings.name)
        (settings.directory / "checkpoint").write_text(
            other.sign(Checkpoint(settings.name, 3, bytes(32)).text()))
        match = "another key"
    with pytest.raises(AuditLogDamaged, match=match) as info:
        AuditLog.open(settings, instance_id="t")
    assert info.value.status.name == "UNAVAILABLE"
    assert "gateway audit verify" in info.value.diagnostics()


# -- write failures -------------------------------------------------------------------------

def test_write_failure_is_unavailable_then_recovers(settings):
    settings = replace(settings, preallocate=False, checkpoint_ms=60_000)
    log = AuditLog.open(settings, instance_id="t")
    acked = [log.append("decision", {"i": i}) for i in range(5)]
    seg = _last_segment(settings)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (seg.stat().st_size + 40, hard))
    try:
        with pytest.raises(AuditUnavailable, match="durable"):
            log.append("decision", {**DECISION, "note": "x" * 200})
        assert not log.healthy
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    acked.append(log.append("decision", {"i": "after"}))
    assert log.healthy
    log.close()
    records = _records(settings)
    for r in acked:
        assert hashlib.sha256(b"\x00" + records[r.index]).digest() == r.leaf_hash
    assert not any(b'"note":"xxx' in r for r in records)
    assert verify_log(settings.directory, _verifier(settings)).ok
    AuditLog.open(settings, instance_id="t").close()


# -- segments, export, restore --------------------------------------------------------------

def test_segments_rotate_verify_export_and_restore(settings, tmp_path):
    settings = replace(settings, segment_bytes=8192, checkpoint_records=64)
    with AuditLog.open(settings, instance_id="t") as log:
        for i in range(300):
            log.append("decision", {**DECISION, "request_id": str(i)})
        assert len(log.entries(0, 400)) == log.size
    segs = list_segments(settings.directory)
    assert len(segs) > 5
    for _first, path in segs[:-1]:  # sealed segments hold no zero tail
        assert not path.read_bytes().endswith(b"\x00")
    report = verify_log(settings.directory, _verifier(settings))
    assert report.ok and report.segments == len(segs) and report.checkpoints > 3
    original = _records(settings)

    backup = tmp_path / "backup"
    assert export_log(settings.directory, backup) == len(original)
    assert verify_log(backup, _verifier(settings)).ok
    restored = replace(settings, directory=tmp_path / "restored")
    backup.rename(restored.directory)
    with AuditLog.open(restored, instance_id="t2") as log:
        log.append("decision", {"after": "restore"})
    assert _records(restored)[:len(original)] == original
    assert verify_log(restored.directory, _verifier(settings)).ok


def test_checkpoint_is_published_by_time_and_torn_history_is_repaired(settings):
    import time
    settings = replace(settings, checkpoint_ms=30, checkpoint_records=10_000)
    with AuditLog.open(settings, instance_id="t") as log:
        log.append("decision", {"i": 1})
        deadline = time.monotonic() + 10
        while log.checkpoint() is None or "\n2\n" not in log.checkpoint():
            assert time.monotonic() < deadline, "no checkpoint within 10 s"
            time.sleep(0.01)  # readiness poll of the writer's timer, not synchronisation
        assert (settings.directory / "checkpoint").read_text() == log.checkpoint()
    hist = settings.directory / "checkpoints.jsonl"
    with open(hist, "ab") as f:
        f.write(b'"torn checkpoint li')  # the gateway died while appending a checkpoint
    with AuditLog.open(settings, instance_id="t") as log:
        log.append("decision", {"i": 2})
    assert all(line.startswith(b'"') and line.endswith(b'"')
               for line in hist.read_bytes().splitlines())
    assert verify_log(settings.directory, _verifier(settings)).ok


def test_concurrent_appends_across_a_write_failure(settings):
    """Disk-full style failures under concurrency: failed calls are not in the log, acked ones
    are, the chain stays intact, and the log recovers by itself once writes succeed again."""
    settings = replace(settings, preallocate=False, checkpoint_ms=600_000,
                       checkpoint_records=1_000_000)
    log = AuditLog.open(settings, instance_id="t")
    seg = _last_segment(settings)
    cond = threading.Condition()
    acked: list = []
    failed: list[str] = []

    def worker(n: int) -> None:
        for i in range(40):
            try:
                r = log.append("decision", {**DECISION, "request_id": f"{n}-{i}"})
            except AuditUnavailable:
                with cond:
                    failed.append(f"{n}-{i}")
                    cond.notify_all()
            else:
                with cond:
                    acked.append((r, f"{n}-{i}"))

    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (seg.stat().st_size + 5000, hard))
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    try:
        for t in threads:
            t.start()
        with cond:
            assert cond.wait_for(lambda: len(failed) >= 6, timeout=30)
        assert not log.healthy
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    for t in threads:
        t.join()
    acked.append((log.append("decision", {**DECISION, "request_id": "after"}), "after"))
    assert log.healthy and failed
    log.close()
    records = _records(settings)
    ids = {json.loads(r).get("request_id") for r in records}
    for r, rid in acked:
        assert hashlib.sha256(b"\x00" + records[r.index]).digest() == r.leaf_hash
        assert rid in ids
    assert not ids & set(failed)
    assert verify_log(settings.directory, _verifier(settings)).ok
    AuditLog.open(settings, instance_id="t").close()


def _unwritten_extents(path: Path, length: int) -> list[tuple[int, int]]:
    """(offset, length) of the preallocated-but-unwritten extents in ``path[:length]``
    (Linux FIEMAP); skips the test where the filesystem cannot say."""
    import fcntl
    import struct

    count = 64
    header = struct.pack("=QQLLLL", 0, length, 1, 0, count, 0)  # FIEMAP_FLAG_SYNC
    buf = bytearray(header + bytes(56 * count))
    with open(path, "rb") as f:
        try:
            fcntl.ioctl(f.fileno(), 0xC020660B, buf)  # FS_IOC_FIEMAP
        except OSError as err:
            pytest.skip(f"no FIEMAP on this filesystem: {err}")
    mapped = struct.unpack_from("=L", buf, 20)[0]
    out = []
    for i in range(mapped):
        logical, _physical, size = struct.unpack_from("=QQQ", buf, 32 + 56 * i)
        flags = struct.unpack_from("=L", buf, 32 + 56 * i + 40)[0]
        if flags & 0x800 and logical < length:  # FIEMAP_EXTENT_UNWRITTEN
            out.append((logical, size))
    return out


def test_records_land_in_zero_written_space_not_unwritten_extents(settings):
    # A durable write into an unwritten extent also commits the extent conversion to the
    # journal; the store zero-writes ahead so that a commit's flush carries data alone.
    from gateway.audit._store import ZERO_AHEAD

    settings = replace(settings, segment_bytes=8 * ZERO_AHEAD)
    with AuditLog.open(settings, instance_id="t") as log:
        for _ in range(50):
            log.append("decision", DECISION)
        segment = _last_segment(settings)
        end = segment.read_bytes().rstrip(b"\x00").rfind(b"\n") + 1
        assert _unwritten_extents(segment, end + ZERO_AHEAD // 2) == []
        # ... while the rest of the segment stays merely reserved (no 1 MiB write per commit).
        assert _unwritten_extents(segment, settings.segment_bytes) != []
    records = _records(settings)
    assert len(records) == 52 and verify_log(settings.directory, _verifier(settings)).ok


# -- commit tags: only records the gateway vouched for are adopted --------------------------

@pytest.fixture(params=["direct", "dsync"])
def tag_mode(request, monkeypatch) -> str:
    """Commit tags riding the records' flush (O_DIRECT), or a second O_DSYNC write."""
    from gateway.audit import _store
    monkeypatch.setattr(_store, "DIRECT_TAGS", request.param == "direct")
    return request.param


def _forge(records: list[bytes], n: int, **fields) -> list[bytes]:
    """``n`` chain-valid records following ``records``, as someone without the keys writes."""
    out: list[bytes] = []
    for _ in range(n):
        last = (records + out)[-1]
        out.append(encode({**DECISION, "request_id": "forged", **fields, "v": 1,
                           "seq": len(records) + len(out),
                           "time_ms": json.loads(last)["time_ms"] + 1, "kind": "decision",
                           "instance": "t", "prev": hashlib.sha256(b"\x00" + last).hexdigest()}))
    return out


def _refused(settings: AuditSettings, *match: str) -> str:
    with pytest.raises(AuditLogDamaged) as info:
        AuditLog.open(settings, instance_id="t")
    for m in match:
        assert m in str(info.value), str(info.value)
    assert info.value.status.name == "UNAVAILABLE"
    return str(info.value)


def test_forged_records_appended_after_a_clean_stop_are_refused(settings, tag_mode):
    records = _closed_log(settings)
    seg = _last_segment(settings)
    forged = _forge(records, 3)
    _append_bytes(seg, _data_end(seg), b"".join(r + b"\n" for r in forged))
    before = seg.read_bytes()
    _refused(settings, "closed cleanly", f"first unprovable record index {len(records)}")
    assert seg.read_bytes() == before  # left in place for investigation, nothing signed
    assert json.loads((settings.directory / "checkpoint").read_text().split("\n")[1]) == \
        len(records)


@pytest.mark.parametrize("tags", ["kept", "deleted", "zeroed"])
def test_rechained_rewrite_with_checkpoints_deleted_is_refused(settings, tags, tag_mode):
    records = _closed_log(settings)
    # Rewrite history from record 0: every decision becomes a deny, re-chained and renumbered.
    rewritten: list[bytes] = []
    prev = "0" * 64
    for r in records:
        obj = json.loads(r)
        if obj["kind"] == "decision":
            obj["decision"] = "deny"
        obj["prev"] = prev
        rewritten.append(encode(obj))
        prev = hashlib.sha256(b"\x00" + rewritten[-1]).hexdigest()
    seg = _last_segment(settings)
    seg.write_bytes(b"".join(r + b"\n" for r in rewritten))
    (settings.directory / "checkpoint").unlink()
    (settings.directory / "checkpoints.jsonl").unlink()
    tag_file = settings.directory / "commit-tags"
    if tags == "deleted":
        tag_file.unlink()
    elif tags == "zeroed":
        tag_file.write_bytes(bytes(len(tag_file.read_bytes())))
    # The witness would catch this too; take it away to show the tags alone suffice.
    settings.witness_path().unlink()
    if tags == "kept":
        _refused(settings, f"records before index {len(records)} no longer match the last "
                           "commit tag")
    else:
        _refused(settings, "no valid signed checkpoint and no valid commit tag",
                 "first unprovable record index 0")


def test_a_tag_from_another_key_proves_nothing(settings):
    records = _closed_log(settings)
    from gateway.audit import _keys
    _keys.commit_key_path(settings.signing_key).unlink()  # the gateway makes a new one
    seg = _last_segment(settings)
    _append_bytes(seg, _data_end(seg), b"".join(r + b"\n" for r in _forge(records, 2)))
    _refused(settings, f"first unprovable record index {len(records)}",
             "no valid commit tag")


_KILL_MID_COMMIT = r"""
import os, signal, sys
from pathlib import Path
from gateway.audit import AuditLog, AuditSettings, _store
_store.DIRECT_TAGS = sys.argv[5] == "direct"
s = AuditSettings(directory=Path(sys.argv[1]), signing_key=Path(sys.argv[2]),
                  payload_key=Path(sys.argv[3]), name=sys.argv[4], segment_bytes=1 << 20)
log = AuditLog.open(s, instance_id="crash")
for i in range(5):
    r = log.append("decision", {"request_id": f"acked-{i}"})
    print(r.index, r.leaf_hash.hex(), flush=True)
store, put_tag = log._store, log._store._put_tag
def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[6] == "records-no-tag":  # the records land, their tag does not
    store._put_tag = lambda slot, data: None
    log.observe_commits(die)  # after the commit, before append returns: never acknowledged
else:  # "tag-no-records": the tag lands first (O_DIRECT), the records never come
    store._put_tag = lambda slot, data: (put_tag(slot, data), die())
log.append("decision", {"request_id": "never-acked"})
"""


def _kill_mid_commit(settings: AuditSettings, mode: str = "direct",
                    point: str = "records-no-tag") -> dict[int, str]:
    """A real process appends 5 records, then is SIGKILLed in its next commit at ``point``
    (its records on disk without their tag, or the tag without the records); returns the
    receipts it was given."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_COMMIT, str(settings.directory),
                           str(settings.signing_key), str(settings.payload_key), settings.name,
                           mode, point],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return {int(i): h for i, h in (line.split() for line in proc.stdout.splitlines())}


def test_the_unacknowledged_commit_of_a_killed_writer_is_cut_and_named(settings, tag_mode):
    _closed_log(settings)
    acked = _kill_mid_commit(settings, tag_mode)
    on_disk = _records(settings)
    assert b'"request_id":"never-acked"' in on_disk[-1]
    first = len(on_disk) - 1
    with AuditLog.open(settings, instance_id="t") as log:
        assert log.healthy
    records = _records(settings)
    for index, leaf in acked.items():
        assert hashlib.sha256(b"\x00" + records[index]).hexdigest() == leaf
    assert not any(b"never-acked" in r for r in records)
    anomaly = json.loads(records[first])
    assert anomaly["kind"] == "anomaly" and anomaly["event"] == "unacknowledged-records-cut"
    assert (anomaly["first"], anomaly["records"]) == (first, 1)
    assert_records_match_schema([anomaly])
    assert anomaly["sha256"] == hashlib.sha256(on_disk[-1] + b"\n").hexdigest()
    assert verify_log(settings.directory, _verifier(settings)).ok


def test_a_tag_written_before_its_records_is_passed_over_after_a_kill(settings):
    """O_DIRECT tags go first: killed between the tag and its records, the log opens on
    the previous tag, with every acknowledged record and nothing of the lost commit."""
    _closed_log(settings)
    acked = _kill_mid_commit(settings, "direct", "tag-no-records")
    size = len(_records(settings))
    assert not any(b"never-acked" in r for r in _records(settings))
    with AuditLog.open(settings, instance_id="t") as log:
        assert log.healthy
    records = _records(settings)
    for index, leaf in acked.items():
        assert hashlib.sha256(b"\x00" + records[index]).hexdigest() == leaf
    assert json.loads(records[size])["kind"] == "log_open"  # nothing to cut
    assert verify_log(settings.directory, _verifier(settings)).ok


def test_records_forged_after_a_crash_are_cut_never_signed(settings):
    _closed_log(settings)
    acked = _kill_mid_commit(settings)
    seg = _last_segment(settings)
    on_disk = _records(settings)
    _append_bytes(seg, _data_end(seg), b"".join(r + b"\n" for r in _forge(on_disk, 4)))
    with AuditLog.open(settings, instance_id="t"):
        pass
    records = _records(settings)
    assert not any(b'"forged"' in r or b"never-acked" in r for r in records)
    for index, leaf in acked.items():
        assert hashlib.sha256(b"\x00" + records[index]).hexdigest() == leaf
    anomaly = json.loads(records[len(on_disk) - 1])
    assert (anomaly["event"], anomaly["records"]) == ("unacknowledged-records-cut", 5)


def test_untagged_records_before_the_last_segment_are_refused(settings):
    settings = replace(settings, segment_bytes=4096)
    records = _closed_log(settings, n=40)
    segs = list_segments(settings.directory)
    assert len(segs) > 2
    # Hide a rewritten tail of the next-to-last segment behind a stale (open) tag: replace
    # the tags by those of a moment when the log was smaller.
    acked = _kill_mid_commit(replace(settings, segment_bytes=1 << 20))
    assert acked
    tags = (settings.directory / "commit-tags").read_bytes()
    AuditLog.open(settings, instance_id="t").close()
    for _ in range(40):  # grow by more segments, then roll the tags back
        with AuditLog.open(settings, instance_id="t") as log:
            log.append("decision", DECISION)
    (settings.directory / "checkpoint").unlink()
    (settings.directory / "checkpoints.jsonl").unlink()
    settings.witness_path().unlink()
    (settings.directory / "commit-tags").write_bytes(tags)
    assert len(_records(settings)) > len(records)
    said = _refused(settings, "first unprovable record index")
    assert "start before the last segment" in said, said


def test_an_old_tags_file_put_back_does_not_pass_forged_records_as_a_crash(settings):
    _kill_mid_commit(settings)  # leaves an open tag: what a crash leaves
    old_tags = (settings.directory / "commit-tags").read_bytes()
    records = _closed_log(settings)  # reopened (cutting the crash tail), closed cleanly
    seg = _last_segment(settings)
    _append_bytes(seg, _data_end(seg), b"".join(r + b"\n" for r in _forge(records, 2)))
    (settings.directory / "commit-tags").write_bytes(old_tags)
    _refused(settings, f"first unprovable record index {len(records)}",
             "older than the latest checkpoint")


def test_a_tag_ahead_of_missing_records_falls_back_only_when_they_are_missing(settings):
    """A power loss may keep the tag of the commit in flight (it rides the records' flush)
    and lose its records: the previous tag stands. Records present but different do not."""
    from gateway.audit import _keys
    from gateway.audit._tags import SLOT_BYTES, CommitTag, latest, seal
    key = _keys.load_hmac_key(_keys.commit_key_path(settings.signing_key), "commit tag")
    records = _closed_log(settings)
    path = settings.directory / "commit-tags"
    last = latest(key, settings.name, [path.read_bytes()[:SLOT_BYTES],
                                       path.read_bytes()[SLOT_BYTES:]])
    pristine = path.read_bytes()

    def put_ahead(size: int) -> None:
        ahead = CommitTag(last.serial + 1, size, "ab" * 32)
        data = bytearray(pristine)
        slot = ahead.serial % 2 * SLOT_BYTES
        data[slot:slot + SLOT_BYTES] = seal(key, settings.name, ahead).ljust(SLOT_BYTES, b"\0")
        path.write_bytes(bytes(data))

    put_ahead(len(records) + 3)  # its 3 records never reached the disk
    with AuditLog.open(settings, instance_id="t"):
        pass
    assert _records(settings)[:len(records)] == records
    records = _records(settings)
    pristine = path.read_bytes()
    last = latest(key, settings.name, [pristine[:SLOT_BYTES], pristine[SLOT_BYTES:]])
    put_ahead(len(records))  # the records are there, but not those the tag names
    _refused(settings, "no longer match the last commit tag")


def test_a_failed_tag_write_fails_the_call_and_the_record_never_surfaces(settings, tag_mode):
    settings = replace(settings, checkpoint_ms=60_000)
    log = AuditLog.open(settings, instance_id="t")
    acked = [log.append("decision", {"i": i}) for i in range(3)]
    store = log._store
    good = os.dup(store._tag_fd)
    os.dup2(os.open(settings.directory / "commit-tags", os.O_RDONLY), store._tag_fd)
    try:
        with pytest.raises(AuditUnavailable, match="durable"):
            log.append("decision", {"i": "lost"})  # its bytes reached the segment, no tag
        assert not log.healthy
    finally:
        os.dup2(good, store._tag_fd)
        os.close(good)
    acked.append(log.append("decision", {"i": "after"}))
    assert log.healthy
    log.close()
    records = _records(settings)
    assert not any(b'"lost"' in r for r in records)
    for r in acked:
        assert hashlib.sha256(b"\x00" + records[r.index]).digest() == r.leaf_hash
    assert verify_log(settings.directory, _verifier(settings)).ok
    AuditLog.open(settings, instance_id="t").close()


def test_tags_cost_one_small_write_in_two_fixed_slots(settings, tag_mode):
    from gateway.audit import _keys
    from gateway.audit._tags import SLOT_BYTES, latest, unseal
    key = _keys.load_hmac_key(_keys.commit_key_path(settings.signing_key), "commit tag")
    records = _closed_log(settings, n=7)
    data = (settings.directory / "commit-tags").read_bytes()
    assert len(data) == 2 * SLOT_BYTES
    assert oct(_keys.commit_key_path(settings.signing_key).stat().st_mode & 0o777) == "0o600"
    slots = [data[:SLOT_BYTES], data[SLOT_BYTES:]]
    tag = latest(key, settings.name, slots)
    assert tag.closed and tag.size == len(records)
    assert tag.head == hashlib.sha256(b"\x00" + records[-1]).hexdigest()
    other = next(t for t in (unseal(key, settings.name, s) for s in slots)
                 if t.serial != tag.serial)
    assert other.serial == tag.serial - 1 and not other.closed  # the log_close commit
    assert unseal(b"k" * 32, settings.name, slots[0]) is None  # another key: no tag


# -- checkpoints on time, and the witness copy against rollback -----------------------------

def _wait_for(predicate, what: str, timeout: float = 15) -> None:
    """The shared wait (tests/support/waiting.py), in this file's argument order."""
    wait_for(what, predicate, timeout)


def _signed_size(path: Path) -> int:
    try:
        return int(path.read_text().split("\n")[1])
    except FileNotFoundError:
        return -1


def test_an_idle_log_signs_each_record_within_the_interval(settings):
    settings = replace(settings, checkpoint_ms=50, checkpoint_records=10_000)
    with AuditLog.open(settings, instance_id="t") as log:
        for i in range(3):
            # A lone call: committed in the caller's own thread, the writer thread idle.
            r = log.append("decision", {"i": i})
            # The witness copy is written last: once it covers the record, both do.
            _wait_for(lambda r=r: _signed_size(settings.witness_path()) > r.index,
                      f"checkpoint covering record {r.index}")
            assert settings.witness_path().read_bytes() == \
                (settings.directory / "checkpoint").read_bytes()


def test_a_busy_log_signs_once_per_interval_not_back_to_back(settings):
    """Records committed while a checkpoint is being signed start the next interval then:
    under steady load the log signs once per interval (each checkpoint is four syncs and two
    renames), not one checkpoint after another as it did when their timer was left stale."""
    import time
    interval = 0.1
    settings = replace(settings, checkpoint_ms=int(interval * 1000), checkpoint_records=10**6)
    history = settings.directory / "checkpoints.jsonl"
    with AuditLog.open(settings, instance_id="t") as log:
        before = len(history.read_bytes().splitlines())
        started = time.monotonic()

        def caller(n: int) -> None:  # steady load for several intervals
            i = 0
            while time.monotonic() - started < 5 * interval:
                log.append("decision", {"caller": n, "i": i})
                i += 1

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        signed = len(history.read_bytes().splitlines()) - before
        elapsed = time.monotonic() - started
        # Each interval checkpoint starts at least one interval after the one before it.
        assert signed <= elapsed / interval + 1, (signed, elapsed)
        # ... and the timer still fires under load: everything gets signed.
        _wait_for(lambda: _signed_size(settings.witness_path()) >= log.size,
                  "a checkpoint covering every record")
    assert verify_log(settings.directory, _verifier(settings)).ok


def test_a_rolled_back_log_is_refused_at_open(settings, tmp_path):
    import shutil
    _closed_log(settings, n=5)
    old = tmp_path / "old-copy"
    shutil.copytree(settings.directory, old)
    old_size = _signed_size(settings.directory / "checkpoint")
    _closed_log(settings, n=5)
    new_size = _signed_size(settings.witness_path())
    assert new_size > old_size
    shutil.rmtree(settings.directory)
    shutil.copytree(old, settings.directory)
    _refused(settings, "older than its witness copy", f"covers {old_size} records",
             f"covers {new_size}")
    # A same-size log with another history (re-signed by the key holder) is refused as well.
    other = replace(settings, directory=tmp_path / "other", witness=tmp_path / "w2")
    _closed_log(other, n=new_size - 2)  # plus log_open and log_close
    assert _signed_size(other.directory / "checkpoint") == new_size
    shutil.rmtree(settings.directory)
    shutil.copytree(other.directory, settings.directory)
    _refused(settings, "does not extend its witness copy")


def test_the_witness_must_live_outside_the_log_directory(settings):
    inside = replace(settings, witness=settings.directory / "witness")
    with pytest.raises(AuditUnavailable, match="inside the log directory"):
        AuditLog.open(inside, instance_id="t")


def test_a_failed_witness_write_stops_acknowledgements_until_it_works(settings):
    import shutil
    settings = replace(settings, checkpoint_ms=50)
    log = AuditLog.open(settings, instance_id="t")
    try:
        witness_dir = settings.witness_path().parent
        shutil.rmtree(witness_dir)
        witness_dir.write_bytes(b"not a directory")  # mkdir and the write now fail
        log.append("decision", {"i": 1})
        _wait_for(lambda: not log.healthy, "unhealthy after a failed witness write")
        with pytest.raises(AuditUnavailable, match="cannot publish"):
            log.append("decision", {"i": "refused"})
        witness_dir.unlink()
        _wait_for(lambda: log.healthy, "healthy once the witness can be written")
        log.append("decision", {"i": 2})
    finally:
        log.close()
    assert not any(b'"refused"' in r for r in _records(settings))
    assert settings.witness_path().read_bytes() == (settings.directory / "checkpoint").read_bytes()
