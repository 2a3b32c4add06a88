"""The canonical record encoder and decoder against the ``rfc8785`` reference, value by value.

:func:`encode` (the log's append path) checks the value with the walk and writes it with
orjson; :func:`decode_canonical` (``verify``) parses, writes back and compares. These tests
hold both to the reference package and to the walk (:func:`check`, the rule of what a record
may hold) on seeded random values and on the adversarial ones a shortcut could get wrong:
floats that print like integers, NaN (which orjson writes as ``null``), integers just past
2**53, keys whose UTF-16 order differs from their code point order, lone surrogates, escapes,
deep nesting, and types orjson writes natively.
"""

from __future__ import annotations

import datetime
import enum
import json
import random
import uuid
from typing import Any

import pytest
import rfc8785

from gateway.audit._canonical import EncodingError, check, decode_canonical, encode

_CHARS = ["a", "Z", "0", " ", '"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x00", "\x1f",
          "\x7f", "\x80", "\u00e9", "\u2028", "\u2029", "\ufeff", "\ue000", "\uffff",
          "\U0001f600", "\U0010ffff", ".", "-", "+", "e", "E", ":", ",", "{", "}", "[", "]",
          "\ud800", "\udfff"]
_KEYS = ["", "a", "B", "_", "z9", "~", "prev", "seq", "v", "a b", "\x7f", "\x00", "\u00e9",
         "\ue000", "\U0001f600", "\ud800", "1", "10", "2"]


class _Str(str):
    pass


class _Int(int):
    pass


class _Colour(enum.Enum):
    RED = "red"


def _value(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return rnd.choice([None, True, False])
    if kind == 1:
        return rnd.choice([0, -1, 1, 2**53 - 1, -(2**53 - 1), 2**53, -(2**53), 2**63, 10**20,
                           rnd.randrange(-10**15, 10**15)])
    if kind in (2, 3):
        return "".join(rnd.choice(_CHARS) for _ in range(rnd.randrange(8)))
    if kind == 4:  # strings that look like floats, and floats that print like integers
        return rnd.choice(["127.0.0.1", "1e-3", "e+5", "1.0", 1.0, -0.0, 1e16, 2.5e-5, 1e21,
                           float("nan"), float("inf"), float("-inf"), 5e-324])
    if kind == 5:  # values JSON has no type for, or that orjson writes natively
        return rnd.choice([b"raw", {1, 2}, uuid.UUID(int=7), _Colour.RED, _Str("s"), _Int(3),
                           datetime.date(2026, 12, 6), object(), 1j])
    if kind in (6, 7):
        return rnd.choice(["allow", "", "ab" * 32, "spiffe://demo.local/svc/scorer"])
    if kind in (8, 9):
        items = [_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
        return tuple(items) if rnd.random() < 0.2 else items
    return {rnd.choice(_KEYS): _value(rnd, depth + 1) for _ in range(rnd.randrange(5))}


def _deep(n: int) -> Any:
    value: Any = "leaf"
    for i in range(n):
        value = {"k": value} if i % 2 else [value]
    return value


def _walk_allows(value: Any) -> bool:
    """The rule: the walk allows the value and its strings are Unicode text (no lone
    surrogate, which neither UTF-8 nor RFC 8785 can carry)."""
    try:
        check(value)
        rfc8785.dumps(value)
    except (EncodingError, rfc8785.CanonicalizationError):
        return False
    return True


def _lists(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


def _assert_exact(value: Any) -> str:
    """encode(value) is the reference's bytes when the walk allows the value, else it raises."""
    if _walk_allows(value):
        data = encode(value)
        assert data == rfc8785.dumps(value), value
        assert decode_canonical(data) == _lists(value)
        return "encoded"
    with pytest.raises(EncodingError):
        encode(value)
    return "refused"


def test_encode_is_rfc8785_or_refuses_as_the_walk_does_on_seeded_random_values():
    rnd = random.Random(8785)
    verdicts = {"encoded": 0, "refused": 0}
    for _ in range(6000):
        value = {rnd.choice(_KEYS): _value(rnd) for _ in range(rnd.randrange(1, 6))}
        verdicts[_assert_exact(value)] += 1
    # The generator reaches both sides often (it is not just refusing everything).
    assert min(verdicts.values()) > 1000, verdicts


@pytest.mark.parametrize("value", [
    {"x": 1.0}, {"x": -0.0}, {"x": 1e16}, {"x": [2, 2.5e-5]}, {"x": {"y": 5e-324}},
    {"x": float("nan")}, {"x": [float("inf")]}, {"x": None, "y": float("-inf")},
    {"x": 2**53}, {"x": -(2**53)}, {"x": 2**64},
    {"\u00e9": 1}, {"\U0001f600": 1, "\ue000": 2}, {"\ud800": 1},
    {"x": "\ud800"}, {"x": ["ok", "\udfff"]},
    {"x": uuid.UUID(int=1)}, {"x": _Colour.RED}, {"x": _Str("a")}, {"x": _Int(1)},
    {"x": datetime.datetime(2026, 12, 6)}, {"x": b"raw"}, {"x": {1, 2}}, {1: "x"},
    {"x": _deep(16)}, {"x": _deep(40)},
])
def test_values_a_record_cannot_hold_are_refused_by_encode(value):
    assert not _walk_allows(value)
    with pytest.raises(EncodingError):
        encode(value)


@pytest.mark.parametrize("value", [
    {"ip": "127.0.0.1", "x": "1e-3", "y": "e+5", "z": "-1"},  # float look-alikes in strings
    {"x": "\u00e9t\u00e9", "y": "\U0001f600\ue000\u2028"},    # non-ASCII string values
    {"x": (1, (2, "t")), "y": []},                           # tuples are arrays
    {"x": _deep(15)},                                        # 15 levels below the record
    {"x": "\x00\x1f\x7f\"\\/\b\f\n\r\t"},                   # every escape RFC 8785 writes
    {"b": 1, "a": {"d": None, "c": [True, False]}, "": ""},  # key order, empty key
    {"x": 2**53 - 1, "y": -(2**53 - 1), "z": 0},
])
def test_record_safe_values_off_the_fast_path_are_still_encoded_exactly(value):
    assert _walk_allows(value)
    assert encode(value) == rfc8785.dumps(value)
    assert encode(value) == json.dumps(_lists(value), sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False).encode()


def test_int_and_str_enum_members_are_refused_though_orjson_would_write_their_values():
    """They equal their values (orjson and rfc8785 write them as such), but a record holds
    plain JSON types only: the encoder checks the value, not orjson's output."""
    class Level(enum.IntEnum):
        HIGH = 3

    class Word(enum.StrEnum):
        ALLOW = "allow"

    for value in ({"level": Level.HIGH}, {"word": Word.ALLOW}):
        with pytest.raises(EncodingError, match="is not a JSON string"):
            encode(value)


def test_encode_names_the_field_it_refuses():
    with pytest.raises(EncodingError, match=r"decision\.model\.score: floats"):
        encode({"model": {"score": 0.5}}, "decision")
    with pytest.raises(EncodingError, match="lone surrogate"):
        encode({"x": "\ud800"}, "decision")


@pytest.mark.parametrize("data", [
    b'{"a": 1}', b'{"a":1 }', b' {"a":1}', b'{"a":1}\t',             # whitespace
    b'{"b":1,"a":2}', b'{"a":{"y":1,"x":2}}',                         # key order
    b'{"a":1,"a":1}', b'{"a":{"x":1,"x":2}}',                         # duplicate keys
    b'{"a":"\\u00e9"}', b'{"a":"\\u0041"}', b'{"a":"\\/"}',           # escapes not minimal
    b'{"a":"\\u001F"}', b'{"a":"\\u000a"}', b'{"a":"\x1f"}',
    b'{"a":"\\ud800"}', b'{"a":"\\udfff\\ud800"}', b'{"\\ud800":1}',  # lone surrogates
    b'{"a":1.0}', b'{"a":1e0}', b'{"a":1E3}', b'{"a":-0}', b'{"a":01}',  # numbers
    b'{"a":9007199254740992}', b'{"a":-9007199254740992}', b'{"a":18446744073709551616}',
    b'{"a":NaN}', b'{"a":Infinity}', b'{"a":true', b'[1]', b'"x"', b'{"a":1}\n',
    b'{"\xc3\xa9":1}', b'{"a":"\xff"}', b'{"a":"\xed\xa0\x80"}',      # key, bad UTF-8
])
def test_non_canonical_record_bytes_are_refused(data):
    with pytest.raises(EncodingError):
        decode_canonical(data)


def test_decoding_the_encoders_bytes_gives_the_value_back_and_mutations_fail():
    """Every encoded random value decodes to itself; whitespace outside strings, the members in
    another order, or a member repeated makes the bytes non-canonical."""
    rnd = random.Random(15)
    checked = 0
    for _ in range(3000):
        value = {rnd.choice(_KEYS): _value(rnd) for _ in range(rnd.randrange(1, 6))}
        if not _walk_allows(value):
            continue
        data = encode(value)
        assert decode_canonical(data) == _lists(value)
        members = [rfc8785.dumps(k) + b":" + rfc8785.dumps(v) for k, v in sorted(value.items())]
        bad = [b" " + data, data + b" ", data[:1] + b" " + data[1:], data[:-1] + b" }",
               b"{" + b",".join([*members, members[0]]) + b"}"]
        if len(members) > 1:
            bad.append(b"{" + b",".join(reversed(members)) + b"}")
        for variant in bad:
            with pytest.raises(EncodingError):
                decode_canonical(variant)
        checked += 1
    assert checked > 500


def test_the_log_refuses_a_record_it_cannot_encode_and_stays_consistent(tmp_path):
    """A float, a non-ASCII key or a lone surrogate in the fields: EncodingError naming it,
    nothing appended, and the next record chains onto the last good one."""
    from gateway.audit import AuditLog, AuditSettings, ensure_keys
    from gateway.audit._merkle import leaf_hash
    from gateway.audit._store import list_segments, split_records

    s = AuditSettings(directory=tmp_path / "log", signing_key=tmp_path / "keys" / "log.skey",
                      payload_key=tmp_path / "keys" / "payload.key", name="test.local/audit",
                      segment_bytes=1 << 20)
    ensure_keys(s)
    with AuditLog.open(s, instance_id="t") as log:
        log.append("decision", {"request_id": "a"})
        size = log.size
        for fields, match in (({"score": 0.5}, r"decision\.score: floats"),
                              ({"\u00e9": 1}, "not an ASCII string"),
                              ({"note": "x\ud800"}, "lone surrogate"),
                              ({"n": 2**53}, "I-JSON range")):
            with pytest.raises(EncodingError, match=match):
                log.append("decision", fields)
            assert log.size == size
        log.append("decision", {"request_id": "b"})
    records = [r for _first, path in list_segments(s.directory)
               for r in split_records(path.read_bytes())[0]]
    ours = [(k, decode_canonical(r)) for k, r in enumerate(records)
            if decode_canonical(r).get("request_id") in ("a", "b")]
    (k, a), (m, b) = ours
    assert (a["request_id"], b["request_id"], m) == ("a", "b", k + 1)
    assert b["seq"] == a["seq"] + 1 and b["prev"] == leaf_hash(records[k]).hex()
