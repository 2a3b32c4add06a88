"""Canonical record encoding: RFC 8785 (JSON Canonicalization Scheme) for the value types we allow.

Records hold only objects, arrays, strings, booleans, null and integers in the I-JSON safe range
(|n| <= 2**53 - 1), with ASCII object keys. For exactly these values RFC 8785 reduces to "sorted
keys, no whitespace, minimal string escaping, integers in decimal", which ``orjson`` with
``OPT_SORT_KEYS`` produces byte for byte (tests prove it against the ``rfc8785`` reference
package). orjson is much faster than both ``json.dumps`` and ``rfc8785`` (bench/README.md),
which keeps the append path and ``verify`` cheap. Floats are refused because their RFC 8785 form
(ES6 number serialisation) is not what orjson writes; ASCII keys keep the RFC's UTF-16 key order
equal to orjson's code point order.

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
# Each regex starts with one literal byte, which the engine scans for in C; '+' is rare enough
# to test for first, and "e-" is found from its '-' (the 'e' of hex digests would slow a scan
# led by 'e'). The digit before a hit is checked in Python, on the rare hits only.
_DOT, _PLUS, _MINUS = re.compile(rb"\.\d"), re.compile(rb"e\+\d"), re.compile(rb"-\d")


def float_positions(data: bytes) -> list[int]:
    """Offsets in ``data`` (bytes orjson would write back unchanged) that may be in a float.

    Strings can hold such bytes too ("127.0.0.1"); a hit only means "walk this record".
    """
    hits = [m.start() for m in _DOT.finditer(data)]
    if b"+" in data:
        hits += [m.start() for m in _PLUS.finditer(data)]
    hits += [m.start() - 1 for m in _MINUS.finditer(data) if data[m.start() - 1] == 101]  # 'e'
    return [h for h in hits if h > 0 and 48 <= data[h - 1] <= 57]


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
    _encode: Callable[[Any], bytes] = functools.partial(orjson.dumps,
                                                        option=orjson.OPT_SORT_KEYS)
    #: True when equal bytes after :func:`dumps` can still hide a float or a non-ASCII key only
    #: where :func:`float_positions` or a non-ASCII byte says (orjson); False: walk every record.
    SCAN_ONLY_SUSPECTS = True
else:  # pragma: no cover - see above
    loads = _json_loads
    dumps = _encode = _json_dumps
    SCAN_ONLY_SUSPECTS = False


def encode(record: Mapping[str, Any]) -> bytes:
    """The RFC 8785 canonical bytes of ``record`` (already checked with :func:`check`)."""
    return _encode(record)


def check(value: Any, where: str = "record", depth: int = 0) -> None:
    """Raise :class:`EncodingError` unless ``value`` holds only record-safe JSON values."""
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
            if tv is str or tv is bool or v is None:
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
    if not SCAN_ONLY_SUSPECTS or not data.isascii() or float_positions(data):
        check(obj)
    return obj
