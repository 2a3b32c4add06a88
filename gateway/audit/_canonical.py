"""Canonical record encoding: RFC 8785 (JSON Canonicalization Scheme) for the value types we allow.

Records hold only objects, arrays, strings, booleans, null and integers in the I-JSON safe range
(|n| <= 2**53 - 1), with ASCII object keys, nested at most 16 deep. For exactly these values RFC
8785 reduces to "sorted keys, no whitespace, minimal string escaping, integers in decimal", which
``orjson`` with ``OPT_SORT_KEYS`` produces byte for byte (tests prove it against the ``rfc8785``
reference package on seeded random and adversarial values). Floats are refused because their
RFC 8785 form (ES6 number serialisation: 1.0 is "1", 1e16 is "10000000000000000") is not what
orjson writes; ASCII keys keep the RFC's UTF-16 key order equal to orjson's code point order.

Both directions are one orjson call plus the Python walk (:func:`check`) where it is needed:

- :func:`encode` (the log's append path) walks the value, then writes it with orjson. The walk
  is what makes it exact: orjson writes NaN as ``null`` and a ``UUID`` or an enum member as a
  string, which nothing in its output tells from a real ``null`` or string. The log walks only
  the caller's fields (:func:`encode_checked` for the record it builds around them).
- :func:`decode_canonical` (``verify``) parses, writes back and compares byte for byte; the walk
  runs only when the bytes could hide a float or a non-ASCII key.

Without orjson (the standalone verifier, :mod:`gateway.audit.offline`, needs only the standard
library and ``cryptography``) the same rule runs on :mod:`json`: ``sort_keys``, no whitespace,
``ensure_ascii=False`` writes the same string escapes as orjson for every code point (a test
compares them), and every record is walked for floats and huge integers. Slower, same verdicts.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from gateway.errors import AuditDataError

try:
    import orjson
except ImportError:  # pragma: no cover - exercised by a subprocess test that hides orjson
    orjson = None  # type: ignore[assignment]

_MAX_INT = 2**53 - 1
_MAX_DEPTH = 16
# Where a float may sit in bytes that orjson itself wrote: every float it writes holds a digit
# then '.' then a digit ("1.5", "1.0") or a digit then "e+"/"e-" and a digit ("1e+16", "1e-7").
# Each regex starts with one literal byte, which the engine scans for in C ('+' is rare enough
# to test for first, and "e-" is found from its '-': the 'e' of hex digests would slow a scan led
# by 'e'); the lookbehinds, checked only at those bytes, keep the dashes of UUIDs and the dots
# of host names from becoming hits to filter in Python (bench/README.md).
_DOT = re.compile(rb"\.(?<=\d\.)\d")
_PLUS = re.compile(rb"\+(?<=\de\+)\d")
_MINUS = re.compile(rb"-(?<=\de-)\d")


def float_positions(data: bytes) -> list[int]:
    """Offsets in ``data`` (bytes orjson would write back unchanged) that may be in a float.

    Strings can hold such bytes too ("127.0.0.1"); a hit only means "walk this record".
    """
    hits = [m.start() for m in _DOT.finditer(data)]
    if b"+" in data:
        hits += [m.start() for m in _PLUS.finditer(data)]
    hits += [m.start() for m in _MINUS.finditer(data)]
    return hits


def may_hold_float(data: bytes) -> bool:
    """Whether one record's bytes (as orjson writes them) may hold a float; False is certain.

    The cheap test for a single record: every float orjson writes holds ".<digit>" or
    "e+<digit>"/"e-<digit>" (strings may too: True then only means "walk it").
    :func:`float_positions` is the precise scan, for a whole segment at once. Each mark is
    found with a one-byte ``bytes.find`` (vectorised; a regex or a two-byte search walks the
    record byte by byte, several times slower here), and records hold few of them.
    """
    find, end = data.find, len(data) - 1
    for mark, after_e in ((b".", False), (b"+", True), (b"-", True)):
        i = find(mark)
        while 0 < i < end:
            if 48 <= data[i + 1] <= 57 and (not after_e or data[i - 1] == 101):  # digit, 'e'
                return True
            i = find(mark, i + 1)
    return False


class EncodingError(AuditDataError, ValueError):
    """A value cannot be part of a canonical record (float, huge int, non-ASCII key, ...)."""


def _json_loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


if orjson is not None:
    #: Parse record bytes (raises on anything that is not JSON).
    loads: Callable[[bytes], Any] = orjson.loads
    #: Canonical bytes of a parsed value; raises on integers beyond ±(2**53-1) (orjson).
    dumps: Callable[[Any], bytes] = functools.partial(
        orjson.dumps, option=orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER)
    # The walk refuses them first; should one reach orjson, subclasses of str/int/dict/list,
    # dataclasses and datetimes raise here instead of being written as JSON.
    _encode: Callable[[Any], bytes] = functools.partial(
        orjson.dumps, option=orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
        | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_DATETIME)
    #: True when equal bytes after :func:`dumps` can still hide a float or a non-ASCII key only
    #: where :func:`float_positions` or a non-ASCII byte says (orjson); False: walk every record.
    SCAN_ONLY_SUSPECTS = True
else:  # pragma: no cover - see above
    loads = _json_loads
    dumps = _encode = _json_dumps
    SCAN_ONLY_SUSPECTS = False


def encode(record: Mapping[str, Any], where: str = "record") -> bytes:
    """The RFC 8785 canonical bytes of ``record``, or :class:`EncodingError` naming what in it
    cannot be part of a record (a value :func:`check` refuses, or a lone surrogate).

    :func:`check` first, then orjson: for the values the walk lets through, orjson's bytes are
    RFC 8785's (the module docstring). Checking the value rather than orjson's output is what
    makes this exact: orjson writes NaN as ``null`` and a ``UUID`` or an enum as a string,
    which no look at its output could tell from a real ``null`` or string (measured: reading
    the output back to compare costs as much as the walk; bench/README.md).
    """
    check(record, where)
    return encode_checked(record, where)


def encode_checked(record: Mapping[str, Any], where: str = "record") -> bytes:
    """:func:`encode` without the walk, for a value whose parts were already checked: the log
    checks the caller's fields with :func:`check` and adds only its own integers and strings
    (walking those again would cost a third more). Raises :class:`EncodingError` on a lone
    surrogate, the one thing the walk does not look at."""
    try:
        return _encode(record)
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        raise EncodingError(f"{where}: a string holds a lone surrogate") from None


def check(value: Any, where: str = "record", depth: int = 0) -> None:
    """Raise :class:`EncodingError` unless ``value`` holds only record-safe JSON values:
    str, bool, None, int within ±(2**53-1), dict with ASCII str keys, list or tuple, nested at
    most ``_MAX_DEPTH`` containers deep. The error names the value by its path."""
    t = type(value)
    if t is str or t is bool or value is None:
        return
    if t is int:
        if -_MAX_INT <= value <= _MAX_INT:
            return
        raise EncodingError(f"{where}: integer {value} is outside the I-JSON range ±(2**53-1)")
    if depth >= _MAX_DEPTH:
        raise EncodingError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if t is dict:
        for k, v in value.items():
            if type(k) is not str or not k.isascii():
                raise EncodingError(f"{where}: key {k!r} is not an ASCII string")
            tv = type(v)
            # Leaves and in-range integers inline: a call and a path string per value are
            # most of the walk's cost.
            if tv is str or tv is bool or v is None or (
                    tv is int and -_MAX_INT <= v <= _MAX_INT):
                continue
            check(v, f"{where}.{k}", depth + 1)
        return
    if t is list or t is tuple:
        for i, v in enumerate(value):
            check(v, f"{where}[{i}]", depth + 1)
        return
    if t is float:
        raise EncodingError(f"{where}: floats are not allowed in audit records (use integers)")
    raise EncodingError(f"{where}: {t.__name__} is not a JSON string, integer, bool, null, "
                        "object or array")


def decode_canonical(data: bytes) -> dict[str, Any]:
    """Parse record bytes and insist they are exactly the canonical encoding of what they hold.

    Raises :class:`EncodingError` naming what is wrong. orjson itself refuses integers beyond
    53 bits; the walk for floats and non-ASCII keys runs only when a cheap scan of the bytes
    says it could matter. Once the bytes equal orjson's own output, the only values whose RFC
    8785 form could differ are floats (ES6 writes 1.0 as "1", 1e21 as "1e+21") and non-ASCII
    keys (UTF-16 order), so those are all the walk has to find.
    """
    try:
        obj = loads(data)
    except (ValueError, RecursionError) as err:  # orjson.JSONDecodeError is a ValueError
        raise EncodingError(f"not valid JSON ({err})") from None
    if type(obj) is not dict:
        raise EncodingError("not a JSON object")
    try:
        again = dumps(obj)
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        raise EncodingError("an integer is outside the I-JSON range ±(2**53-1)") from None
    except UnicodeEncodeError:
        raise EncodingError("a string holds a lone surrogate") from None
    if again != data:
        raise EncodingError("not in RFC 8785 canonical form")
    if not SCAN_ONLY_SUSPECTS or not data.isascii() or may_hold_float(data):
        check(obj)
    return obj
